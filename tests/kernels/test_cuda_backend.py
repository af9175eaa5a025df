"""The CUDA backend on a GPU against the float64 reference, through the public op with poisoned
outputs (run by ``pytest -m gpu`` / benchmarks/gpu_check.py; skipped without a CUDA device).

On a machine with a CUDA device and a CUDA torch the backend must build: a failed build fails
``test_backend_builds`` loudly instead of skipping everything.

The grid it shares with the other backends (dtype × rows {1,3,64,257} × hidden {1,64,768,4097} ×
kind × gate × index × norm × residual: small product, all-pairs cover, gate modes and the
``-m "gpu and slow"`` full product) is tests/kernels/test_backend_grid.py; here are the tests
specific to this backend: the launch layouts (warp / block / streaming), fire counts, bank dtypes,
aliasing, misaligned views, streams, CUDA-graph capture, opcheck and torch.compile.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels.backends import cuda

from casegen import DTYPES, NORMS, TOLERANCES, assert_matches_reference, check, make_case, poisoned_like, run_backend

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cuda.is_available("cuda"), f"cuda backend did not build: {cuda.why_unavailable('cuda')}"


def test_backend_builds():
    assert cuda.is_available(torch.device("cuda"))
    assert "cuda" in fp.backends.available("cuda")


def _case(N, D, dtype, kind, gated, index_mode, norm="rms", residual=True, seed=0, **kw):
    if gated and D == 1:
        kw.setdefault("metric", "projection")  # every cosine is ±1 at D = 1
    return make_case(N, D, dtype, kind=kind, gated=gated, index_mode=index_mode, norm=norm, residual=residual,
                     num_patches=6 if kind == "mix" else 3, seed=seed, device="cuda", **kw)


# --- layouts and edge cases ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", (4096, 8192, 8193, 16400, 32768))
def test_wide_rows_block_and_streaming(dtype, D):
    """Register-cached block rows and rows too wide for the cache (re-read between passes)."""
    for norm in NORMS:
        check("cuda", 3, D, dtype, "mix", True, "mixed", norm, True, seed=D, device="cuda")


def test_fire_counts_match_reference():
    for N, D, dtype in ((257, 64, torch.float32), (64, 4097, torch.bfloat16), (33, 2048, torch.float16)):
        case = _case(N, D, dtype, "mix", True, "mixed", seed=N)
        fc = torch.zeros(6, dtype=torch.int32, device="cuda")
        ref = torch.zeros(6, dtype=torch.int32)
        out, res_out = run_backend(case, "cuda", fire_counts=fc)
        case.expected(fire_counts=ref)
        assert fc.cpu().tolist() == ref.tolist() and int(ref.sum()) > 0
        assert_matches_reference(case, out, res_out)


def test_large_rank_and_bank_dtypes():
    for D in (64, 1536):
        check("cuda", 64, D, torch.float32, "lowrank", True, "mixed", "rms", True, rank=20, device="cuda")
    for x_dtype, bank_dtype in itertools.product(DTYPES, DTYPES):
        check("cuda", 16, 256, x_dtype, "loreft", True, "mixed", "layer", True, bank_dtype=bank_dtype,
              device="cuda")


def test_weight_dtype_offset_and_none():
    case = _case(8, 512, torch.bfloat16, "steer", False, "none")
    for weight, offset in ((None, 0.0), (None, 0.5), (case.weight.float(), 1.0), (case.weight, -0.25)):
        kw = case.kwargs()
        out, res_out = fp.fused_add_norm(case.x, case.residual, weight, weight_offset=offset, backend="cuda", **kw)
        exp_out, exp_res = fp.reference.fused_add_norm(case.x.cpu(), case.residual.cpu(),
                                                       None if weight is None else weight.cpu(), exact=True,
                                                       weight_offset=offset,
                                                       **dict(kw, bank=case.bank.to("cpu")))
        rtol, atol = TOLERANCES[torch.bfloat16]
        torch.testing.assert_close(res_out.cpu().double(), exp_res, rtol=rtol, atol=atol)
        torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)


@pytest.mark.parametrize("D", (64, 4096))
def test_outputs_may_alias_inputs(D):
    case = _case(37, D, torch.bfloat16, "mix", True, "mixed", "layer")
    exp_out, exp_res = (t.cpu() for t in case.expected())
    x, res = case.x.clone(), case.residual.clone()
    out, res_out = fp.fused_add_norm(x, res, case.weight, out=x, residual_out=res, backend="cuda", **case.kwargs())
    assert out.data_ptr() == x.data_ptr() and res_out.data_ptr() == res.data_ptr()
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(res.cpu().double(), exp_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(x.cpu().double(), exp_out, rtol=rtol, atol=atol)


def test_misaligned_view_uses_scalar_path():
    case = _case(6, 512, torch.float16, "loreft", True, "mixed")
    buf = torch.empty(case.x.numel() + 1, dtype=case.x.dtype, device="cuda")
    buf[1:] = case.x.reshape(-1)
    case.x = buf[1:].view(case.x.shape)
    out, res_out = run_backend(case, "cuda")
    assert_matches_reference(case, out, res_out)


def test_out_of_range_index_is_no_patch():
    case = _case(8, 64, torch.float32, "steer", False, "mixed")
    case.index = torch.tensor([0, -1, 3, 99, -7, 2, 1, 2**40], dtype=torch.int64, device="cuda")
    fp.config.check_index_values = False
    try:
        fc = torch.zeros(3, dtype=torch.int32, device="cuda")
        out, res_out = run_backend(case, "cuda", fire_counts=fc)
    finally:
        fp.config.check_index_values = True
    assert fc.cpu().tolist() == [1, 1, 1]
    assert_matches_reference(case, out, res_out)


def test_int32_index_and_3d_input():
    case = _case(12, 768, torch.bfloat16, "mix", True, "mixed")
    x3, r3 = case.x.view(3, 4, 768), case.residual.view(3, 4, 768)
    idx = case.index.to(torch.int32).view(3, 4)
    out, res_out = fp.fused_add_norm(x3, r3, case.weight, bank=case.bank, index=idx, backend="cuda")
    assert out.shape == (3, 4, 768)
    assert_matches_reference(case, out.view(12, 768), res_out.view(12, 768))


def test_runs_on_the_current_side_stream():
    case = _case(64, 1024, torch.float16, "lowrank", True, "mixed")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were copied on the default stream
    with torch.cuda.stream(stream):
        out, res_out = run_backend(case, "cuda")
    stream.synchronize()
    assert_matches_reference(case, out, res_out)


def test_cuda_graph_capture():
    """Launch-only: capturable, and replays read the current contents of the captured buffers."""
    case = _case(64, 2048, torch.bfloat16, "mix", True, "mixed")
    out, res_out = poisoned_like(case.x), poisoned_like(case.x)
    fc = torch.zeros(6, dtype=torch.int32, device="cuda")
    kwargs = dict(case.kwargs(), out=out, residual_out=res_out, fire_counts=fc, backend="cuda")
    fp.fused_add_norm(case.x, case.residual, case.weight, **kwargs)  # warm-up outside the capture
    torch.cuda.synchronize()
    fc.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fp.fused_add_norm(case.x, case.residual, case.weight, **kwargs)
    out.fill_(float("nan"))
    res_out.fill_(float("nan"))
    fc.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref_fc = torch.zeros(6, dtype=torch.int32)
    case.expected(fire_counts=ref_fc)
    assert fc.cpu().tolist() == ref_fc.tolist()
    assert_matches_reference(case, out, res_out)
    # New inputs in the same buffers: the replay sees them.
    new = _case(64, 2048, torch.bfloat16, "mix", True, "mixed", seed=5)
    case.x.copy_(new.x)
    case.residual.copy_(new.residual)
    graph.replay()
    torch.cuda.synchronize()
    exp_out, exp_res = fp.reference.fused_add_norm(case.x.cpu(), case.residual.cpu(), case.weight.cpu(),
                                                   exact=True, **dict(case.kwargs(), bank=case.bank.to("cpu"),
                                                                      index=case.index.cpu()))
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(res_out.cpu().double(), exp_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol)


def test_opcheck_and_torch_compile():
    case = _case(16, 256, torch.float32, "loreft", True, "mixed", "layer")
    b = case.bank
    args = (case.x, case.residual, case.weight, case.bias, 1e-6, 1, 0.0, b.down, b.bias, b.up, b.shift,
            b.gate_dir, b.gate_threshold, b.gate_mode, b.act_threshold, case.index,
            torch.zeros(3, dtype=torch.int32, device="cuda"),
            torch.empty_like(case.x), torch.empty_like(case.x))
    torch.library.opcheck(cuda.op(), args)

    def f(x, residual, weight, bias):
        return fp.fused_add_norm(x, residual, weight, bias=bias, norm="layer", bank=b, index=case.index,
                                 backend="cuda")

    compiled = torch.compile(f, fullgraph=True)
    out, res_out = compiled(case.x, case.residual, case.weight, case.bias)
    assert_matches_reference(case, out, res_out)
