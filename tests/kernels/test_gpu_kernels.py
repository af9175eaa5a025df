"""Every CUDA path at real shapes against the float64 reference (marked ``gpu``; skipped without CUDA).

Hidden sizes 2048–16384, rows 1–16384, ranks 1–128 (R_PAD 16–128 tile configs, the chunked row
kernel above D 4096), bf16/fp16/fp32 with banks in the activations' dtype (what ``apply()``
builds), through the public op with NaN-poisoned outputs, for ``backend=None`` (the per-shape
choice) and each CUDA backend by name. Run by ``benchmarks/gpu_check.py`` (``pytest -m gpu``).
"""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import backends
from fastpatch.core import reference

from casegen import TOLERANCES, make_case, poisoned_like

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32

# (N, D, dtype, kind, rank, index_mode, patches, gated, norm): sampled so that every N, D, dtype and
# rank class meets several kernel paths; comments name the Triton path the dispatcher picks.
CASES = [
    (1, 2048, bf16, "steer", 4, "none", 1, False, "rms"),             # decode, row single pass
    (1, 16384, bf16, "lowrank", 128, "none", 1, True, "rms"),         # decode, chunked row, rank 128
    (8, 4096, fp16, "mix", 16, "mixed", 8, True, "rms"),              # decode batch, 8 patches
    (64, 4096, bf16, "lowrank", 16, "none", 1, False, "rms"),         # tile R_PAD 16, the smallest N
    (4096, 4096, bf16, "lowrank", 128, "none", 1, True, "layer"),     # tile R_PAD 128
    (4096, 2048, fp32, "lowrank", 64, "none", 1, False, "rms"),       # tile, fp32 dots
    (16384, 4096, bf16, "steer", 4, "all_off", 3, False, "rms"),      # 16k rows, index all off
    (16384, 2048, bf16, "loreft", 8, "none", 1, True, "rms"),         # tile rank 8, gated
    (512, 8192, bf16, "lowrank", 32, "index1", 1, False, "rms"),      # tile, one patch + on/off index
    (512, 16384, fp16, "lowrank", 16, "mixed", 16, False, "rms"),     # 16 low-rank patches, mixed index
    (4096, 8192, fp32, "ablate", 1, "none", 1, True, "layer"),        # chunked row, rank 1
    (3, 16384, fp32, "clamp", 1, "none", 1, False, "rms"),
    (257, 4097, bf16, "lowrank", 24, "none", 1, False, "rms"),        # odd D (no vector path), tile
    (4096, 4096, bf16, "lowrank", 1, "none", 1, False, "rms"),        # rank 1: row kernel
    (1024, 4096, fp16, "mix", 4, "mixed", 256, False, "rms"),         # 256 patches in one batch
]


def _backends():
    names = [None] + [n for n in ("cuda", "triton") if n in backends.available("cuda")]
    return [pytest.param(n, id=n or "auto") for n in names]


def _case(N, D, dtype, kind, rank, index_mode, P, gated, norm, seed):
    mode = "mixed" if index_mode == "index1" else index_mode
    case = make_case(N, D, dtype, kind=kind, rank=rank, gated=gated, index_mode=mode, norm=norm,
                     num_patches=P, seed=seed, device="cuda", bank_dtype=dtype)
    if index_mode == "index1":  # a one-patch bank switched on/off per row
        case.bank = fp.PatchBank(case.bank.patches[:1], D, device="cuda", dtype=dtype)
        case.index = torch.randint(-1, 1, (N,), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    return case


def assert_close_chunked(case, out, res):
    """Compare with the float64 reference row chunk by row chunk (its [rows, rank, D] gather of a
    16384 × 128 × 4096 case would not fit otherwise)."""
    rtol, atol = TOLERANCES[case.x.dtype]
    N, D = case.x.shape
    rank = case.bank.rank if case.bank is not None else 1
    step = max(1, (1 << 26) // (max(rank, 1) * D))
    for s in range(0, N, step):
        e = min(N, s + step)
        want_out, want_res = reference.fused_add_norm(
            case.x[s:e], None if case.residual is None else case.residual[s:e], case.weight, bias=case.bias,
            eps=case.eps, norm=case.norm, bank=case.bank, index=None if case.index is None else case.index[s:e],
            exact=True)
        torch.testing.assert_close(res[s:e].double(), want_res, rtol=rtol, atol=atol,
                                   msg=lambda m: f"residual_out rows {s}:{e}: {m}")
        torch.testing.assert_close(out[s:e].double(), want_out, rtol=rtol, atol=atol,
                                   msg=lambda m: f"out rows {s}:{e}: {m}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("i", range(len(CASES)),
                         ids=[f"N{c[0]}-D{c[1]}-{str(c[2])[6:]}-{c[3]}-r{c[4]}-{c[5]}-P{c[6]}" for c in CASES])
def test_real_shapes(i, backend):
    N, D, dtype, kind, rank, index_mode, P, gated, norm = CASES[i]
    case = _case(N, D, dtype, kind, rank, index_mode, P, gated, norm, seed=i)
    out, res = poisoned_like(case.x), poisoned_like(case.x)
    fp.fused_add_norm(case.x, case.residual, case.weight, out=out, residual_out=res, backend=backend,
                      **case.kwargs())
    assert_close_chunked(case, out, res)


@pytest.mark.parametrize("backend", _backends())
def test_fire_counts_at_prefill_size(backend):
    case = _case(4096, 4096, bf16, "lowrank", 16, "none", 1, True, "rms", seed=7)
    counts = torch.zeros(1, dtype=torch.int32, device="cuda")
    expected = torch.zeros(1, dtype=torch.int32)
    out, res = fp.fused_add_norm(case.x, case.residual, case.weight, fire_counts=counts, backend=backend,
                                 **case.kwargs())
    case.expected(fire_counts=expected)
    assert counts.cpu().tolist() == expected.tolist() and 0 < int(expected[0]) < 4096


def test_op_level_decode_step_in_a_cuda_graph():
    """A decode step's fused calls (2 per layer, steer + per-row index into a 4-patch bank) captured
    in a CUDA graph with backend=None, replayed on new inputs, equal to eager calls."""
    D, B, L = 4096, 8, 4
    gen = torch.Generator().manual_seed(0)
    bank = fp.PatchBank([fp.Steer(torch.randn(D, generator=gen, dtype=torch.float64)) for _ in range(4)], D,
                        device="cuda", dtype=bf16)
    index = torch.tensor([0, 1, 2, 3, -1, 0, 1, 2], device="cuda")
    weights = [torch.rand(D, device="cuda", dtype=bf16) + 0.5 for _ in range(2 * L)]
    x = torch.randn(B, D, device="cuda", dtype=bf16)
    residual = torch.randn(B, D, device="cuda", dtype=bf16)

    def step(x, residual):
        h, r = x, residual
        for w in weights:
            h, r = fp.fused_add_norm(h, r, w, bank=bank, index=index)
        return h, r

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(x, residual)  # JIT compiles and builds outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, res_g = step(x, residual)
    x.copy_(torch.randn_like(x))
    residual.copy_(torch.randn_like(residual))
    graph.replay()
    out_e, res_e = step(x, residual)
    torch.testing.assert_close(out_g, out_e, rtol=0, atol=0)
    torch.testing.assert_close(res_g, res_e, rtol=0, atol=0)
