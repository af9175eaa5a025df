"""The C++ CPU backend against the float64 reference, through the public op with poisoned outputs:
what is specific to it (bank and affine dtypes, fire counts, aliasing, bad indices, threads, opcheck,
torch.compile). The grid it shares with the other backends (dtype × rows × hidden × kind × gate ×
index × norm × residual, its all-pairs cover and ``-m slow`` full product) is
tests/kernels/test_backend_grid.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import backends
from fastpatch.kernels.backends import cpp

from casegen import (DTYPES, GATED, NORMS, TOLERANCES, assert_matches_reference, check, make_case, poisoned_like,
                     run_backend)

if not cpp.is_available("cpu"):  # pragma: no cover - a machine without a C++ toolchain
    pytest.skip(f"cpp backend unavailable: {cpp.why_unavailable('cpu')}", allow_module_level=True)

# --- parameter dtypes, affine variants --------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("kind", ("steer", "lowrank", "mix"))
def test_bank_in_activation_dtype(dtype, kind):
    for gated, index_mode, D in itertools.product(GATED, ("none", "mixed"), (64, 773)):
        check("cpp", 17, D, dtype, kind, gated, index_mode, "rms", True, bank_dtype=dtype)


def test_bank_in_a_third_dtype_takes_the_fp32_path():
    # fp16 bank with bf16 activations: converted to fp32 inside the op, still correct
    check("cpp", 9, 130, torch.bfloat16, "mix", True, "mixed", "layer", True, bank_dtype=torch.float16)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_fp32_norm_affine_with_low_precision_x(dtype, norm):
    case = make_case(11, 300, dtype, kind="lowrank", gated=True, index_mode="mixed", norm=norm)
    case.weight = case.weight.float()
    if case.bias is not None:
        case.bias = case.bias.float()
    assert_matches_reference(case, *run_backend(case, "cpp"))


def test_mixed_weight_and_bias_dtypes():
    case = make_case(5, 96, torch.bfloat16, kind="steer", norm="layer")
    case.bias = case.bias.float()  # weight stays bf16
    assert_matches_reference(case, *run_backend(case, "cpp"))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_none_and_offset(dtype, norm):
    case = make_case(6, 200, dtype, kind="clamp", norm=norm)
    for weight, offset in ((None, 0.0), (None, 0.5), (case.weight, 1.0)):
        out = poisoned_like(case.x)
        res_out = poisoned_like(case.x)
        o, r = fp.fused_add_norm(case.x, case.residual, weight, bias=case.bias, norm=norm, eps=case.eps,
                                 bank=case.bank, weight_offset=offset, out=out, residual_out=res_out,
                                 backend="cpp")
        eo, er = fp.reference.fused_add_norm(case.x, case.residual, weight, bias=case.bias, norm=norm,
                                             eps=case.eps, bank=case.bank, weight_offset=offset, exact=True)
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(r.double(), er, rtol=rtol, atol=atol)
        torch.testing.assert_close(o.double(), eo, rtol=rtol, atol=atol)


def test_rank_zero_bank_with_gate_only_shift():
    # A bank of steers: rank 0, so no down/up tensors reach the kernel at all.
    case = make_case(40, 513, torch.float32, kind="steer", gated=True, index_mode="mixed", num_patches=4)
    assert case.bank.rank == 0
    assert_matches_reference(case, *run_backend(case, "cpp"))


def test_ablate_bank_has_no_shift():
    case = make_case(8, 64, torch.float32, kind="ablate", index_mode="mixed")
    assert not case.bank.has_shift
    assert_matches_reference(case, *run_backend(case, "cpp"))


def test_zero_row_has_cosine_zero():
    D = 32
    x = torch.zeros(2, D)
    cond = torch.randn(D)
    bank = fp.PatchBank([fp.Gated(fp.Steer(torch.randn(D)), cond, -0.5, metric="cosine", fire="above"),
                         fp.Gated(fp.Steer(torch.randn(D)), cond, 0.5, metric="cosine", fire="above")], D)
    idx = torch.tensor([0, 1])
    counts = torch.zeros(2, dtype=torch.int32)
    o, r = fp.fused_add_norm(x, None, torch.ones(D), bank=bank, index=idx, fire_counts=counts, backend="cpp")
    eo, er = fp.reference.fused_add_norm(x, None, torch.ones(D), bank=bank, index=idx)
    torch.testing.assert_close(r, er)
    torch.testing.assert_close(o, eo, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == [1, 0]  # cos(0, c) = 0: above −0.5, not above 0.5


# --- fire counts, aliasing, bad indices ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", (1, 64, 257))
def test_fire_counts_match_reference(dtype, N):
    case = make_case(N, 256, dtype, kind="mix", gated=True, index_mode="mixed", num_patches=7, seed=N)
    counts = torch.full((7,), 5, dtype=torch.int32)  # counts accumulate onto what is there
    expected = torch.full((7,), 5, dtype=torch.int32)
    out, res_out = run_backend(case, "cpp", fire_counts=counts)
    case.expected(fire_counts=expected)
    assert counts.tolist() == expected.tolist()
    assert_matches_reference(case, out, res_out)


def test_fire_counts_ungated_index_none():
    case = make_case(33, 64, torch.float32, kind="lowrank", index_mode="none")
    counts = torch.zeros(1, dtype=torch.int32)
    run_backend(case, "cpp", fire_counts=counts)
    assert counts.tolist() == [33]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("aliasing", ("out=x,res_out=residual", "out=residual,res_out=x"))
@pytest.mark.parametrize("N, D", ((1, 64), (257, 4097)))
def test_outputs_may_alias_inputs(dtype, aliasing, N, D):
    case = make_case(N, D, dtype, kind="mix", gated=True, index_mode="mixed", num_patches=5, seed=3)
    exp_out, exp_res = case.expected()
    x, residual = case.x.clone(), case.residual.clone()
    out, res_out = (x, residual) if aliasing == "out=x,res_out=residual" else (residual, x)
    o, r = fp.fused_add_norm(x, residual, case.weight, out=out, residual_out=res_out, backend="cpp",
                             **case.kwargs())
    assert o.data_ptr() == out.data_ptr() and r.data_ptr() == res_out.data_ptr()
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(r.double(), exp_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(o.double(), exp_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=str)
def test_out_of_range_index_is_no_patch(index_dtype, monkeypatch):
    monkeypatch.setattr(fp.config, "check_index_values", False)
    case = make_case(8, 100, torch.float32, kind="mix", gated=True, index_mode="mixed", num_patches=3)
    bad = torch.tensor([0, 3, -2, 1, 1 << 30, -(1 << 30), 2, -1], dtype=index_dtype)
    counts = torch.zeros(3, dtype=torch.int32)
    out = poisoned_like(case.x)
    res_out = poisoned_like(case.x)
    fp.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank, index=bad, fire_counts=counts,
                      out=out, residual_out=res_out, backend="cpp")
    cleaned = torch.where((bad >= 0) & (bad < 3), bad, torch.full_like(bad, -1))
    expected_counts = torch.zeros(3, dtype=torch.int32)
    eo, er = fp.reference.fused_add_norm(case.x, case.residual, case.weight, bank=case.bank, index=cleaned,
                                         fire_counts=expected_counts)
    torch.testing.assert_close(res_out, er, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, eo, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == expected_counts.tolist()


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=str)
def test_int32_and_int64_index_agree(index_dtype):
    case = make_case(50, 64, torch.float32, kind="mix", gated=True, index_mode="mixed", num_patches=4)
    case.index = case.index.to(index_dtype)
    assert_matches_reference(case, *run_backend(case, "cpp"))


def test_leading_dims_and_no_outputs_given():
    case = make_case(12, 64, torch.bfloat16, kind="lowrank", index_mode="mixed")
    x3, r3 = case.x.view(3, 4, 64), case.residual.view(3, 4, 64)
    o, r = fp.fused_add_norm(x3, r3, case.weight, bank=case.bank, index=case.index.view(3, 4), backend="cpp")
    assert o.shape == (3, 4, 64) and r.shape == (3, 4, 64)
    assert_matches_reference(case, o.view(12, 64), r.view(12, 64))


def test_zero_rows():
    x = torch.randn(0, 64)
    o, r = fp.fused_add_norm(x, x.clone(), torch.ones(64), backend="cpp")
    assert o.shape == (0, 64) and r.shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, gated, index_mode, N, D", [
    (None, False, "none", 1031, 97),        # unpatched rows, odd width: vector tails
    ("steer", False, "none", 257, 4097),
    ("lowrank", False, "none", 301, 577),   # row blocks of one patch split across threads
    ("mix", True, "mixed", 257, 1024),
])
def test_threads_do_not_change_results(dtype, kind, gated, index_mode, N, D):
    # Rows are split between threads at different places with 1, 2 and 3 threads; every row must
    # come out bit-identical (each row is computed by one thread, blocks never mix rows' sums).
    case = make_case(N, D, dtype, kind=kind, gated=gated, index_mode=index_mode, num_patches=6)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            counts = torch.zeros(case.bank.num_patches if case.bank else 0, dtype=torch.int32)
            out = run_backend(case, "cpp", fire_counts=counts if case.bank else None)
            results.append((*out, counts))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert_matches_reference(case, *results[0][:2])


# --- registration: availability, opcheck, torch.compile --------------------------------------------

def test_is_available_only_for_cpu():
    assert cpp.is_available("cpu") and cpp.is_available(torch.device("cpu"))
    assert not cpp.is_available("meta")
    assert "CPU" in cpp.why_unavailable("meta")
    assert backends.available("cpu")[0] == "cpp"


def _op_args(case, fire_counts=None):
    bank = case.bank
    norm_kind = 0 if case.norm == "rms" else 1
    out, res_out = torch.empty_like(case.x), torch.empty_like(case.x)
    if bank is None:
        return (case.x, case.residual, case.weight, case.bias, case.eps, norm_kind, 0.0,
                None, None, None, None, None, None, None, None, None, None, out, res_out)
    lr = bank.rank > 0
    return (case.x, case.residual, case.weight, case.bias, case.eps, norm_kind, 0.25,
            bank.down if lr else None, bank.bias if lr else None, bank.up if lr else None,
            bank.shift if bank.has_shift else None, bank.gate_dir if bank.has_gate else None,
            bank.gate_threshold if bank.has_gate else None, bank.gate_mode, bank.act_threshold, case.index,
            fire_counts,
            out, res_out)


@pytest.mark.parametrize("setup", [
    dict(kind=None),
    dict(kind="steer", norm="layer", residual=False),
    dict(kind="mix", gated=True, index_mode="mixed", num_patches=5, counts=True),
    dict(kind="lowrank", dtype=torch.bfloat16, bank_dtype=torch.bfloat16, index_mode="mixed"),
    dict(kind="actmix", index_mode="mixed", num_patches=4, counts=True),
], ids=("no-bank", "steer-layer", "mix-gated-counts", "bf16-lowrank", "activations"))
def test_opcheck(setup):
    setup = dict(setup)
    counts = torch.zeros(setup.pop("num_patches", 3), dtype=torch.int32) if setup.pop("counts", False) else None
    dtype = setup.pop("dtype", torch.float32)
    case = make_case(6, 40, dtype, num_patches=len(counts) if counts is not None else 3, **setup)
    torch.library.opcheck(cpp.op(), _op_args(case, counts))


@pytest.mark.parametrize("kind, gated", [(None, False), ("mix", True), ("lowrank", False)])
def test_torch_compile_fullgraph_matches_eager(kind, gated):
    case = make_case(10, 96, torch.float32, kind=kind, gated=gated,
                     index_mode="none" if kind in (None, "lowrank") else "mixed", num_patches=5)

    def step(x, residual, weight, bank, index):
        return fp.fused_add_norm(x, residual, weight, eps=1e-6, bank=bank, index=index, backend="cpp")

    eager = step(case.x, case.residual, case.weight, case.bank, case.index)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(case.x, case.residual, case.weight, case.bank, case.index)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
