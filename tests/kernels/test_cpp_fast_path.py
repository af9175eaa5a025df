"""The public op's fast path (fastpatch/kernels/ops.py, _Plan): a repeated call with the same weight,
bias, bank and fire_counts objects skips check_inputs. It must give the checked path's results, see
every per-call input, and never reuse a plan for a different object (ids reused after GC)."""
from __future__ import annotations

import gc

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import ops
from fastpatch.kernels.backends import cpp

from casegen import DTYPES, assert_matches_reference, make_case, poisoned_like

if not cpp.is_available("cpu"):  # pragma: no cover - a machine without a C++ toolchain
    pytest.skip(f"cpp backend unavailable: {cpp.why_unavailable('cpu')}", allow_module_level=True)


def call(case, backend="cpp", **kw):
    kw = {**case.kwargs(), **kw}
    out, res_out = poisoned_like(case.x), poisoned_like(case.x)
    return fp.fused_add_norm(case.x, case.residual, case.weight, out=out, residual_out=res_out,
                             backend=backend, **kw)


@pytest.fixture
def no_checked_path(monkeypatch):
    """After this is armed, a call that reaches check_inputs fails the test."""
    def armed():
        def refuse(*args, **kwargs):
            raise AssertionError("the call went through check_inputs")
        monkeypatch.setattr(ops, "check_inputs", refuse)
    return armed


@pytest.mark.parametrize("backend", ("cpp", None))
@pytest.mark.parametrize("kind, gated, index_mode", [
    (None, False, "none"), ("steer", False, "none"), ("lowrank", False, "none"), ("mix", True, "mixed"),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_second_call_takes_the_fast_path_and_matches(dtype, kind, gated, index_mode, backend, no_checked_path):
    case = make_case(37, 97, dtype, kind=kind, gated=gated, index_mode=index_mode, num_patches=4, seed=3)
    first = call(case, backend)
    no_checked_path()
    second = call(case, backend)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert_matches_reference(case, *second)


def test_outputs_allocated_on_the_fast_path(no_checked_path):
    case = make_case(5, 64, torch.bfloat16, kind="steer")
    fp.fused_add_norm(case.x, case.residual, case.weight, **case.kwargs())
    no_checked_path()
    out, res_out = fp.fused_add_norm(case.x, case.residual, case.weight, **case.kwargs())
    assert out.shape == case.x.shape and out.dtype == case.x.dtype
    assert_matches_reference(case, out, res_out)


def test_in_place_like_vllm(no_checked_path):
    case = make_case(6, 64, torch.float32, kind="lowrank")
    expected = case.expected()
    x, res = case.x.clone(), case.residual.clone()
    fp.fused_add_norm(x.clone(), res.clone(), case.weight, **case.kwargs())
    no_checked_path()
    out, res_out = fp.fused_add_norm(x, res, case.weight, out=x, residual_out=res, **case.kwargs())
    assert out is x and res_out is res
    torch.testing.assert_close(res.double(), expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.double(), expected[0], rtol=1e-5, atol=1e-5)


def test_new_bank_with_a_reused_id_is_not_served_an_old_plan():
    # Banks created and dropped one after another often get the same id(); each must be read afresh.
    x, res, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    ids = set()
    for k in range(20):
        shift = torch.full((32,), float(k))
        bank = fp.PatchBank(fp.Steer(shift), 32)
        ids.add(id(bank))
        fp.fused_add_norm(x, res, w, bank=bank, backend="cpp")  # records a plan
        _, res_out = fp.fused_add_norm(x, res, w, bank=bank, backend="cpp")  # uses it
        torch.testing.assert_close(res_out, x + res + k)
        del bank
        gc.collect()
    assert len(ids) < 20, "no id was reused; the test did not exercise what it is for"


def test_plan_dies_with_its_objects():
    x, w = torch.randn(2, 16), torch.randn(16)
    bank = fp.PatchBank(fp.Steer(torch.randn(16)), 16)
    before = len(ops._plans)
    fp.fused_add_norm(x, None, w, bank=bank, backend="cpp")
    assert len(ops._plans) == before + 1
    del bank
    gc.collect()
    assert len(ops._plans) == before  # and with it the reference to the bank's tensors


def test_new_weight_object_is_checked_again():
    x = torch.randn(3, 16)
    fp.fused_add_norm(x, None, torch.randn(16), backend="cpp")
    with pytest.raises(ValueError, match="weight must have shape"):
        fp.fused_add_norm(x, None, torch.randn(17), backend="cpp")


def test_weight_values_are_read_every_call():
    x, w = torch.randn(3, 16), torch.ones(16)
    a, _ = fp.fused_add_norm(x, None, w, backend="cpp")
    w.mul_(2)
    b, _ = fp.fused_add_norm(x, None, w, backend="cpp")
    torch.testing.assert_close(b, 2 * a)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=str)
def test_index_edited_in_place_is_range_checked(index_dtype):
    case = make_case(8, 32, torch.float32, kind="steer", index_mode="mixed", num_patches=3)
    index = case.index.to(index_dtype)
    call(case, index=index)
    call(case, index=index)  # fast path
    index[5] = 3  # out of range for P = 3
    with pytest.raises(ValueError, match=r"index values must lie in \[-1, 3\)"):
        call(case, index=index)
    index[5] = -2
    with pytest.raises(ValueError, match="index values"):
        call(case, index=index)


def test_index_unchecked_when_switched_off(monkeypatch):
    case = make_case(8, 32, torch.float32, kind="steer", index_mode="mixed", num_patches=3)
    call(case)
    monkeypatch.setattr(ops.config, "check_index_values", False)
    bad = case.index.clone()
    bad[::2] = 7  # kernels treat out-of-range entries as "no patch"
    got = call(case, index=bad)
    off = case.index.clone()
    off[::2] = -1
    case.index = off
    assert_matches_reference(case, *got)


def test_non_contiguous_inputs_still_work_after_a_plan():
    case = make_case(6, 16, torch.float32, kind="steer")
    call(case)
    x = case.x.T.contiguous().T  # same values, column-major
    res = case.residual.T.contiguous().T
    out, res_out = fp.fused_add_norm(x, res, case.weight, backend="cpp", **case.kwargs())
    assert_matches_reference(case, out, res_out)


def test_leading_dims_after_a_plan():
    case = make_case(12, 16, torch.float32, kind="steer")
    call(case)
    out, res_out = fp.fused_add_norm(case.x.view(3, 4, 16), case.residual.view(3, 4, 16), case.weight,
                                     backend="cpp", **case.kwargs())
    assert out.shape == (3, 4, 16)
    assert_matches_reference(case, out.view(12, 16), res_out.view(12, 16))


def test_fire_counts_on_the_fast_path():
    case = make_case(64, 32, torch.float32, kind="mix", gated=True, index_mode="mixed", num_patches=6)
    counts = torch.zeros(6, dtype=torch.int32)
    call(case, fire_counts=counts)
    call(case, fire_counts=counts)
    expected = torch.zeros(6, dtype=torch.int32)
    case.expected(fire_counts=expected)
    assert torch.equal(counts, 2 * expected)


def test_kernel_is_built_with_openmp_when_torch_uses_it():
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's CPU parallel backend is not OpenMP here")
    assert cpp.built_with_openmp()


def test_leading_dims_take_the_fast_path(no_checked_path):
    case = make_case(12, 16, torch.bfloat16, kind="mix", gated=True, index_mode="mixed", num_patches=4)
    x, res, idx = case.x.view(3, 4, 16), case.residual.view(3, 4, 16), case.index.view(3, 4)
    kw = dict(case.kwargs(), index=idx)
    fp.fused_add_norm(x, res, case.weight, backend="cpp", **kw)
    no_checked_path()
    out, res_out = fp.fused_add_norm(x, res, case.weight, backend="cpp", **kw)
    assert out.shape == (3, 4, 16)
    assert_matches_reference(case, out.view(12, 16), res_out.view(12, 16))
    kw["index"] = case.index  # [rows] is accepted for a 3-D x too
    out, res_out = fp.fused_add_norm(x, res, case.weight, backend="cpp", **kw)
    assert_matches_reference(case, out.view(12, 16), res_out.view(12, 16))


def test_declined_calls_do_not_rebuild_the_plan():
    case = make_case(6, 16, torch.float32, kind="steer")
    call(case)
    plans = dict(ops._plans)
    x = case.x.T.contiguous().T  # non-contiguous: the plan declines, the checked path runs
    fp.fused_add_norm(x, case.residual, case.weight, backend="cpp", **case.kwargs())
    assert all(ops._plans.get(k) is v for k, v in plans.items())
