"""The first-use self-test (fastpatch/kernels/backends/selftest.py) and the loud fallbacks of resolve().

A wrong kernel is simulated by wrapping a backend's ``run``: the self-test calls ``module.run`` by
attribute, so the wrapper is what it checks, exactly as a miscompiled build would be.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastpatch as fp
from casegen import assert_matches_reference, make_case
from fastpatch.core.patches import GATE_NONE, GATE_COSINE_ABOVE, GATE_COSINE_BELOW, GATE_PROJECTION_ABOVE, \
    GATE_PROJECTION_BELOW
from fastpatch.kernels import backends
from fastpatch.kernels.backends import cpp, reference_backend, selftest

CPU = torch.device("cpu")

if not cpp.is_available("cpu"):
    pytest.skip(f"cpp backend unavailable: {cpp.why_unavailable('cpu')}", allow_module_level=True)


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Every test starts with nothing resolved, tested or warned about, and leaves it so: later tests
    must resolve the real (unwrapped) kernels again."""
    monkeypatch.delenv(selftest.ENV, raising=False)
    backends.forget()
    yield
    backends.forget()


def wrong_by(delta):
    """A cpp run whose normed output is off by ``delta`` (a wrong kernel)."""
    real = cpp.run

    def run(*args, **kwargs):
        out, res = real(*args, **kwargs)
        out += delta
        return out, res
    return run


def fastpatch_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, backends.FastpatchWarning)]


def test_wrong_kernel_is_refused_and_backend_none_falls_back(monkeypatch):
    monkeypatch.setattr(cpp, "run", wrong_by(1e-2))
    case = make_case(6, 64, torch.float32, kind="lowrank", index_mode="mixed", gated=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, res = fp.fused_add_norm(case.x, case.residual, case.weight, **case.kwargs())
    assert_matches_reference(case, out, res)  # the next backend (the reference) ran, not the wrong kernel
    assert backends.resolve(None, CPU, torch.float32) is reference_backend
    texts = fastpatch_warnings(record)
    refusal = next(t for t in texts if "failed its self-test" in t)
    # names the backend, the device, the error against its tolerance, the fix and the opt-out
    for part in ("the cpp backend", "on cpu", "max error 0.01 vs tolerance", "uses 'reference' instead",
                 "fastpatch build", "FASTPATCH_SELFTEST=0"):
        assert part in refusal, (part, refusal)
    slow = next(t for t in texts if "runs the float64 reference" in t)
    assert "cpp: refused" in slow


def test_named_wrong_backend_raises(monkeypatch):
    monkeypatch.setattr(cpp, "run", wrong_by(1e-2))
    case = make_case(3, 32, torch.float32)
    with pytest.raises(backends.SelfTestError, match=r"cpp backend failed its self-test .* on cpu .*"
                                                     r"refusing to run backend='cpp'"):
        fp.fused_add_norm(case.x, case.residual, case.weight, backend="cpp", **case.kwargs())
    with pytest.raises(backends.SelfTestError):  # and every later call too, without a second test
        fp.fused_add_norm(case.x, case.residual, case.weight, backend="cpp", **case.kwargs())
    assert selftest.calls == 1


def test_crashing_kernel_is_refused(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(cpp, "run", crash)
    with pytest.warns(backends.FastpatchWarning, match="crashed: RuntimeError: illegal memory access"):
        assert backends.resolve(None, CPU, torch.float32) is reference_backend


def test_unwritten_row_and_wrong_fire_counts_are_caught(monkeypatch):
    real = cpp.run

    def skips_last_row(*args, **kwargs):
        out, res = real(*args, **kwargs)
        res[-1] = 0.0
        return out, res

    monkeypatch.setattr(cpp, "run", skips_last_row)
    result = selftest.run("cpp", cpp, CPU, (torch.float32,))
    assert not result.ok and "residual_out" in result.worst

    def no_fire_counts(*args, **kwargs):
        out, res = real(*args, **kwargs)
        if args[7] is not None:  # fire_counts: run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, ...)
            args[7].zero_()
        return out, res

    monkeypatch.setattr(cpp, "run", no_fire_counts)
    result = selftest.run("cpp", cpp, CPU, (torch.float32,))
    assert not result.ok and "fire counts" in result.error


def test_build_failure_warns_once_with_reason_and_fix(monkeypatch, caplog):
    monkeypatch.setattr(cpp, "is_available", lambda device: False)
    monkeypatch.setattr(cpp, "why_unavailable",
                        lambda device: "RuntimeError: Ninja is required to load C++ extensions")
    case = make_case(4, 32, torch.float32)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.float32, torch.bfloat16, torch.float16):
            fp.fused_add_norm(case.x.to(dtype), case.residual.to(dtype), case.weight.to(dtype), **case.kwargs())
        backends.resolve(None, CPU)  # what apply() and vLLM's install do (every dtype)
    texts = fastpatch_warnings(record)
    assert len(texts) == 1, texts
    for part in ("backend=None runs the float64 reference", "Ninja is required", "pip install ninja",
                 "fastpatch doctor", "backend='reference'"):
        assert part in texts[0], (part, texts[0])
    # an application that configured logging gets the same line once in its log
    assert [r.getMessage() for r in caplog.records if r.name == "fastpatch"] == texts


def test_backend_named_reference_does_not_warn(monkeypatch):
    monkeypatch.setattr(cpp, "is_available", lambda device: False)
    case = make_case(2, 16, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.FastpatchWarning)
        fp.fused_add_norm(case.x, case.residual, case.weight, backend="reference", **case.kwargs())


def test_self_test_runs_once_per_backend_device_dtype(monkeypatch):
    counted = []
    real = selftest.run

    def counting(backend, module, device, dtypes=selftest.DTYPES):
        counted.append((backend, tuple(dtypes)))
        return real(backend, module, device, dtypes)

    monkeypatch.setattr(selftest, "run", counting)
    case = make_case(4, 48, torch.float32, kind="steer", index_mode="mixed")
    for _ in range(5):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, r, w = case.x.to(dtype), case.residual.to(dtype), case.weight.to(dtype)
            fp.fused_add_norm(x, r, w, **case.kwargs())
            fp.fused_add_norm(x, r, w, backend="cpp", **case.kwargs())
    backends.prepare("cpu")
    # cpp is one build for every dtype: its first use tests all three, once
    assert counted == [("cpp", selftest.DTYPES)]


def test_triton_is_tested_per_dtype_as_used():
    if not backends.load("triton").is_available("cpu"):
        pytest.skip("triton interpreter not available")
    case = make_case(3, 32, torch.float32)
    for dtype in (torch.float32, torch.float32, torch.bfloat16):
        x, r, w = case.x.to(dtype), case.residual.to(dtype), case.weight.to(dtype)
        out, res = fp.fused_add_norm(x, r, w, backend="triton", **case.kwargs())
    assert selftest.calls == 2  # float32 once, bfloat16 once
    assert {d for (name, _, d) in selftest._results if name == "triton"} == {torch.float32, torch.bfloat16}


def test_opt_out_skips_the_self_test(monkeypatch):
    monkeypatch.setenv(selftest.ENV, "0")
    monkeypatch.setattr(cpp, "run", wrong_by(1e-2))
    assert backends.resolve(None, CPU, torch.float32) is cpp  # not tested, so not refused
    assert selftest.calls == 0


def test_self_test_passes_on_every_backend_here():
    names = ["reference", "cpp"] + (["triton"] if backends.load("triton").is_available("cpu") else [])
    for name in names:
        result = selftest.run(name, backends.load(name), CPU)
        assert result.ok and result.ratio < 1, (name, result.describe())
        assert result.cases == 4 * len(selftest.DTYPES)  # bank, activation, layer, plain


def test_self_test_cases_cover_every_gate_mode_index_and_norm():
    cases = selftest._cases(torch.bfloat16, CPU, small=False)
    modes = {int(m) for c in cases if c.bank is not None for m in c.bank.gate_mode}
    assert modes == {GATE_NONE, GATE_COSINE_ABOVE, GATE_COSINE_BELOW, GATE_PROJECTION_ABOVE, GATE_PROJECTION_BELOW}
    index = next(c.index for c in cases if c.index is not None)
    assert int(index.min()) == -1 and set(range(5)) <= set(index.tolist())
    assert {c.norm_kind for c in cases} == {0, 1}
    assert any(c.bank is not None and c.index is None for c in cases)
    assert any(c.bank is not None and c.bank.dtype == torch.bfloat16 for c in cases)
    # the gates both fire and hold back within the bank case, so a flipped comparison shows
    bank_case = next(c for c in cases if c.count_fires)
    fires = torch.zeros(bank_case.bank.num_patches, dtype=torch.int32)
    fp.reference.fused_add_norm(bank_case.x, bank_case.residual, bank_case.weight, bank=bank_case.oracle_bank,
                                index=bank_case.index, fire_counts=fires)
    rows = torch.bincount(bank_case.index[bank_case.index >= 0].long(), minlength=5)
    assert (fires[1:] > 0).any() and (fires[1:] < rows[1:]).any(), (fires, rows)
