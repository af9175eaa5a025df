"""The triton backend against the float64 reference: what is specific to it.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no CUDA), ~2-6 ms per program, so shapes stay small and every kernel path (row
single-pass, row chunked, tl.dot tile, tile grouped by patch) is forced explicitly here, with fire
counts, aliasing, bad indices, the dispatcher, opcheck and torch.compile. The grid it shares with
the other backends (dtype × rows × hidden × kind × gate × index × norm × residual, at the
interpreter's sizes) is tests/kernels/test_backend_grid.py. Tests with the ``cuda`` device param
are marked ``gpu`` and run the same on a GPU (benchmarks/gpu_check.py runs ``pytest -m gpu tests``).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import backends
from casegen import DTYPES, TOLERANCES, assert_matches_reference, check, make_case, run_backend

triton_backend = pytest.importorskip("fastpatch.kernels.backends.triton_backend")
from fastpatch.kernels.triton_ops import dispatch  # noqa: E402

gpu = pytest.mark.gpu


def _device_params():
    return [pytest.param("cpu", id="interp"), pytest.param("cuda", id="cuda", marks=gpu)]


def _device_for(dev):
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not triton_backend.is_available(torch.device(dev)):
        pytest.skip(triton_backend.why_unavailable(torch.device(dev)))
    return dev


@pytest.fixture(params=_device_params())
def device(request):
    return _device_for(request.param)


def _id(v):
    return str(v).replace("torch.", "")


# --- weight variants ------------------------------------------------------------------------------

def test_no_patch_and_no_weight(device):
    case = make_case(4, 70, torch.float16, kind=None, device=device)
    out, res = fp.fused_add_norm(case.x, case.residual, None, eps=case.eps, backend="triton")
    exp_out, exp_res = fp.reference.fused_add_norm(case.x, case.residual, None, eps=case.eps, exact=True)
    rtol, atol = TOLERANCES[torch.float16]
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)


def test_weight_offset_and_fp32_weight(device):
    case = make_case(3, 64, torch.bfloat16, kind="steer", device=device)
    w32 = case.weight.float()
    out, res = fp.fused_add_norm(case.x, case.residual, w32, weight_offset=1.0, backend="triton", **case.kwargs())
    exp_out, exp_res = fp.reference.fused_add_norm(case.x, case.residual, w32, weight_offset=1.0, exact=True,
                                                   **case.kwargs())
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=rtol, atol=atol)


# --- fire counts, aliasing, bad index -------------------------------------------------------------

@pytest.mark.parametrize("path", ("row", "tile"))
def test_fire_counts(device, path):
    if path == "row":
        case = make_case(17, 64, torch.float32, kind="mix", gated=True, index_mode="mixed", num_patches=4,
                         device=device)
    else:
        case = make_case(70, 48, torch.float32, kind="lowrank", rank=16, gated=True, device=device)
    P = case.bank.num_patches
    counts = torch.full((P,), 5, dtype=torch.int32, device=device)
    expected = torch.full((P,), 5, dtype=torch.int32)
    out, res = run_backend(case, "triton", fire_counts=counts)
    case.expected(fire_counts=expected)
    assert_matches_reference(case, out, res)
    assert counts.cpu().tolist() == expected.tolist()
    assert 5 < int(expected.sum()) < 5 * P + case.x.shape[0]  # some rows fired, some did not


@pytest.mark.parametrize("alias", ("out=x,res=residual", "out=residual,res=x", "res=x"))
@pytest.mark.parametrize("path", ("single", "chunked", "tile", "tile-chunked"))
def test_outputs_may_alias_inputs(device, alias, path, monkeypatch):
    if path == "chunked":
        monkeypatch.setattr(dispatch, "MAX_SINGLE_PASS_D", 32)
        monkeypatch.setattr(dispatch, "CHUNK_D", 32)
    if path == "tile":  # one chunk (D 80) and, with the limit shrunk, three passes
        case = make_case(66, 80, torch.bfloat16, kind="lowrank", rank=16, gated=True, norm="layer", device=device)
    elif path == "tile-chunked":
        monkeypatch.setattr(dispatch, "ONE_CHUNK_MAX_D", 32)
        case = make_case(66, 80, torch.bfloat16, kind="lowrank", rank=16, gated=True, norm="layer", device=device)
    else:
        case = make_case(4, 80, torch.bfloat16, kind="mix", gated=True, index_mode="mixed", norm="layer",
                         device=device)
    exp_out, exp_res = case.expected()
    x, r = case.x.clone(), case.residual.clone()
    targets = {"out=x,res=residual": (x, r), "out=residual,res=x": (r, x), "res=x": (None, x)}[alias]
    out, res = fp.fused_add_norm(x, r, case.weight, out=targets[0], residual_out=targets[1], backend="triton",
                                 **case.kwargs())
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=_id)
def test_out_of_range_index_means_no_patch(device, index_dtype, monkeypatch):
    monkeypatch.setattr(fp.config, "check_index_values", False)
    case = make_case(6, 64, torch.float32, kind="steer", index_mode="mixed", num_patches=3, device=device)
    bad = torch.tensor([3, -2, 2**31 - 1 if index_dtype == torch.int32 else 2**40, -(2**31), 0, 100],
                       dtype=index_dtype, device=device)
    out, res = fp.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank, index=bad, eps=case.eps,
                                 backend="triton")
    clean = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1)).long()
    exp_out, exp_res = fp.reference.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank,
                                                   index=clean, eps=case.eps, exact=True)
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=1e-4, atol=1e-4)


# --- each kernel path explicitly ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rank,index_mode,norm,D", [(16, "none", "rms", 96), (24, "index1", "layer", 96),
                                                    (40, "none", "layer", 96), (16, "none", "layer", 200)])
def test_tile_dot_path(device, dtype, rank, index_mode, norm, D, monkeypatch):
    """Prefill rows with rank >= 8: tl.dot tiles (rank padded to 16/32/64); D 96 keeps the row block
    on chip (one chunk: x, residual read once); D 200 with the one-chunk limit lowered takes three
    passes over chunks (the interpreter is slow on wide rows; tests/kernels/test_gpu_kernels.py runs real ones)."""
    if D == 200:
        monkeypatch.setattr(dispatch, "ONE_CHUNK_MAX_D", 64)
    N = 70
    kind = "loreft" if rank == 24 else "lowrank"
    case = make_case(N, D, dtype, kind=kind, rank=rank, gated=(rank != 40), norm=norm, device=device,
                     bank_dtype=dtype)
    if index_mode == "index1":  # a one-patch bank with a per-row on/off index stays on the tile kernel
        gen = torch.Generator().manual_seed(1)
        case.index = torch.randint(-1, 1, (N,), generator=gen).to(device)
    for dot_fp32 in (False, True):  # the GPU picks the 16-bit config, the interpreter the fp32 one
        cfg = dispatch.select(N, D, case.bank.rank, case.index is not None, case.bank.num_patches,
                              dot_fp32 or dtype == torch.float32)
        assert cfg.kernel == "tile" and cfg.R_PAD == dispatch.rank_pad(case.bank.rank) and not cfg.GROUPED
        assert cfg.ONE_CHUNK == (D < 200 and not cfg.DOT_FP32)
    out, res = run_backend(case, "triton")
    assert_matches_reference(case, out, res)


@pytest.mark.parametrize("D", (80, 150), ids=("one-chunk", "chunked"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_tile_grouped_by_patch(device, dtype, D, monkeypatch):
    """A per-row index into a bank of several low-rank patches (with shifts and per-patch gates):
    the tile kernel loops over the patches present in each block. Rows come in runs (as sequences
    do) plus a random tail, so blocks hold one patch, several, or none. D 150: three passes (the
    one-chunk limit lowered)."""
    if D == 150:
        monkeypatch.setattr(dispatch, "ONE_CHUNK_MAX_D", 64)
    N = 70
    case = make_case(N, D, dtype, kind="lowrank", rank=16, gated=True, index_mode="mixed", num_patches=5,
                     norm="layer" if D == 80 else "rms", device=device, bank_dtype=dtype, seed=3)
    runs = torch.tensor([2] * 20 + [-1] * 12 + [4] * 16 + [0] * 2, dtype=torch.int64)
    case.index = torch.cat([runs, case.index[len(runs):].cpu()]).to(device)
    cfg = dispatch.select(N, D, 16, True, 5, dtype == torch.float32)
    assert cfg.kernel == "tile" and cfg.GROUPED and cfg.ONE_CHUNK == (D == 80 and dtype != torch.float32)
    counts = torch.zeros(5, dtype=torch.int32, device=device)
    expected = torch.zeros(5, dtype=torch.int32)
    out, res = run_backend(case, "triton", fire_counts=counts)
    case.expected(fire_counts=expected)
    assert_matches_reference(case, out, res)
    assert counts.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("D", (80, 150), ids=("one-chunk", "chunked"))
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_tile_activations(device, dtype, D, monkeypatch):
    """Per-component activations on the tl.dot tile kernel: a JumpReLU patch on every row (not grouped)
    and identity / ReLU / JumpReLU / steer patches by a per-row index incl. −1 (grouped). The bank stays
    float32 so the reference reads the same θ-relative z (a 16-bit bank would round z by more than the
    margin casegen keeps from every jump)."""
    if D == 150:
        monkeypatch.setattr(dispatch, "ONE_CHUNK_MAX_D", 64)
    N = 70
    single = make_case(N, D, dtype, kind="jumprelu", rank=16, device=device, seed=5)
    mixed = make_case(N, D, dtype, kind="actmix", rank=16, index_mode="mixed", num_patches=4, gated=True,
                      device=device, seed=6)
    for case, grouped in ((single, False), (mixed, True)):
        cfg = dispatch.select(N, D, case.bank.rank, case.index is not None, case.bank.num_patches, True)
        assert cfg.kernel == "tile" and cfg.GROUPED == grouped
        assert case.bank.has_activation and case.bank.act_threshold is not None
        out, res = run_backend(case, "triton")
        assert_matches_reference(case, out, res)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=_id)
def test_tile_grouped_out_of_range_index_means_no_patch(device, index_dtype, monkeypatch):
    monkeypatch.setattr(fp.config, "check_index_values", False)
    case = make_case(66, 48, torch.float32, kind="lowrank", rank=16, index_mode="mixed", num_patches=3,
                     device=device)
    big = 2**31 - 1 if index_dtype == torch.int32 else 2**40
    bad = torch.tensor([3, -2, big, -(2**31), 0, 100, 2, 1] * 8 + [1, big], dtype=index_dtype, device=device)
    assert dispatch.select(66, 48, 16, True, 3, True).GROUPED
    out, res = fp.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank, index=bad, eps=case.eps,
                                 backend="triton")
    clean = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1)).long()
    exp_out, exp_res = fp.reference.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank,
                                                   index=clean, eps=case.eps, exact=True)
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=1e-4, atol=1e-4)


def test_index_into_many_patches_with_steers_takes_row_kernel(device):
    case = make_case(70, 64, torch.float16, kind="mix", index_mode="mixed", num_patches=3,
                     device=device, bank_dtype=torch.float16)
    assert case.bank.rank < dispatch.TILE_MIN_RANK and dispatch.select(70, 64, case.bank.rank, True, 3).kernel == "row"
    out, res = run_backend(case, "triton")
    assert_matches_reference(case, out, res)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind,gated,norm", [("mix", True, "layer"), ("lowrank", False, "rms"),
                                             ("steer", True, "rms"), ("actmix", True, "layer")])
def test_chunked_row_path(device, dtype, kind, gated, norm, monkeypatch):
    """D above the single-pass limit: multi-pass over chunks (limits shrunk so the interpreter is quick)."""
    monkeypatch.setattr(dispatch, "MAX_SINGLE_PASS_D", 64)
    monkeypatch.setattr(dispatch, "CHUNK_D", 64)
    cfg = dispatch.select(3, 150, 4)
    assert cfg.kernel == "row" and not cfg.SINGLE_PASS
    check("triton", device=device, N=3, D=150, dtype=dtype, kind=kind, gated=gated, norm=norm,
          index_mode="mixed" if kind in ("mix", "actmix") else "none", residual=dtype != torch.float16,
          num_patches=4 if kind == "actmix" else 3)


def test_real_chunked_width(device):
    """D > MAX_SINGLE_PASS_D with the real chunk width (one row: the interpreter is slow)."""
    D = dispatch.MAX_SINGLE_PASS_D + 5
    assert not dispatch.select(1, D, 4).SINGLE_PASS
    check("triton", device=device, N=1, D=D, dtype=torch.float32, kind="lowrank", gated=True, norm="layer")


# --- dispatcher, availability, torch.compile ------------------------------------------------------

def test_all_configs_covers_select():
    configs = set(dispatch.all_configs())
    rng = random.Random(0)
    for _ in range(3000):
        N = rng.choice([1, 2, 7, 63, 64, 65, 500, 4096, 16384])
        D = rng.randint(1, 3 * dispatch.MAX_SINGLE_PASS_D)
        rank = rng.randint(0, dispatch.MAX_ENUMERATED_RANK)
        P = rng.choice([1, 2, 64])
        cfg = dispatch.select(N, D, rank, rng.random() < 0.5, P)
        assert cfg in configs, cfg
    kernels = {c.kernel for c in configs}
    assert kernels == {"row", "tile"}
    assert any(c.SINGLE_PASS for c in configs) and any(c.kernel == "row" and not c.SINGLE_PASS for c in configs)


def test_availability_messages():
    assert "triton" in backends.available("cuda") or not torch.cuda.is_available()
    if triton_backend.interpreting():
        assert triton_backend.is_available("cpu")
    else:
        assert "TRITON_INTERPRET" in triton_backend.why_unavailable("cpu")
    assert not triton_backend.is_available("meta")


def test_torch_compile_goes_through_custom_op(device):
    case = make_case(4, 64, torch.float32, kind="steer", gated=True, index_mode="mixed", device=device)

    def f(x, r, w, idx):
        out, res = fp.fused_add_norm(x, r, w, bank=case.bank, index=idx, eps=case.eps, backend="triton")
        return out * 2, res

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    if device == "cpu":
        backends.prepare("cpu", "triton")  # initialised, so the refusal below is the compile one
        # The one op's CPU implementation is the C++ kernel: interpreted Triton cannot be traced, and naming it
        # under compile must refuse with the reason rather than run another backend silently.
        with pytest.raises(Exception, match="no compiled form"):
            compiled(case.x, case.residual, case.weight, case.index)
        return
    out, res = compiled(case.x, case.residual, case.weight, case.index)
    exp_out, exp_res = case.expected()
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cpu().double(), 2 * exp_out, rtol=1e-4, atol=2e-4)


def test_opcheck(device):
    if device == "cpu":
        pytest.skip("the one op's CPU implementation is the C++ kernel "
                    "(tests/kernels/test_cpp_backend.py opchecks it); "
                    "interpreted Triton is reached by name only, outside the op")
    case = make_case(3, 32, torch.float32, kind="lowrank", rank=2, gated=True, device=device)
    b = case.bank
    out, res = torch.empty_like(case.x), torch.empty_like(case.x)
    args = (case.x, case.residual, case.weight, None, 1e-6, 0, 0.0, b.down, b.bias, b.up, None, b.gate_dir,
            b.gate_threshold, b.gate_mode, b.act_threshold, None, None, out, res, "triton")
    torch.library.opcheck(torch.ops.fastpatch.fused_add_norm.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# --- benchmarks/gpu_check.py: its CPU-side logic through the interpreter ------------------------

def test_gpu_check_dry_run(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    rc = gpu_check.main(["--dry-run", "--parts", "kernels", "--impls", "triton", "torch_unfused",
                         "--ns", "1", "--ds", "32", "--dtypes", "bf16", "--variants", "none", "steer",
                         "bank256_mixed", "--out-dir", str(tmp_path)])
    assert rc == 0
    (report_path,) = tmp_path.glob("gpu_check_*.json")
    report = json.loads(report_path.read_text())
    assert report["environment"]["torch"] == torch.__version__
    rows = report["timings"]
    assert {r["impl"] for r in rows} == {"triton", "torch_unfused"}
    # every timed case was checked against the float64 reference first
    assert len(rows) == 2 * 3 and all(r["ok"] and r["rows_checked"] == 1 and r["ms"] > 0 and r["GBps"] > 0
                                      for r in rows)
    assert all(r["vs_unpatched"] for r in rows if r["variant"] != "none")
    assert "| impl | chose |" in report_path.with_suffix(".md").read_text()
    # the targets are read off backend=None rows at D 4096
    fake = [dict(impl="auto", variant=v, N=4096, D=4096, dtype="bf16", ms=t, frac_of_copy=f)
            for v, t, f in (("none", 1.0, 0.95), ("steer", 1.01, 0.93), ("lowrank16", 1.2, 0.8),
                            ("bank256_mixed", 1.02, 0.9))]
    got = {t["target"].split(" (")[0]: (t["value"], t["met"]) for t in gpu_check.targets(fake)}
    assert got == {"steer ≥ 90% of copy bandwidth": (0.93, True), "steer ≤ 1.02× unpatched": (1.01, True),
                   "rank-16 ≤ 1.10× unpatched": (1.2, False),
                   "256 patches in one batch ≤ 1.05× one patch": (1.01, True)}
    # torch_unfused computes what the reference does (it is timed as the unfused baseline)
    x, r, w, bank, index = gpu_check.make_inputs(5, 48, "bank256_mixed", "cpu", torch.float32)
    out, res = gpu_check.torch_unfused(x, r, w, bank, index)
    exp_out, exp_res = fp.reference.fused_add_norm(x, r, w, bank=bank, index=index)
    torch.testing.assert_close(res, exp_res, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, exp_out, rtol=1e-4, atol=1e-4)


def test_gpu_check_catches_a_wrong_output(monkeypatch):
    """The check that guards every timed case fails a result that differs from the reference."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "FULL_CHECK_ELEMENTS", 1000)  # large cases check three row ranges
    x, r, w, bank, index = gpu_check.make_inputs(7000, 8, "lowrank16", "cpu", torch.bfloat16)
    out, res = gpu_check.torch_unfused(x, r, w, bank, index)
    good = gpu_check.check_case(out, res, x, r, w, bank, index)
    assert good["ok"] and good["rows_checked"] == 3 * gpu_check.CHECK_RANGE_ROWS
    bad = out.clone()
    bad[-1, 3] += 1.0  # the last row: inside the checked end range
    assert not gpu_check.check_case(bad, res, x, r, w, bank, index)["ok"]
