"""Kernel-level GPU benchmarks in pytest-benchmark: fastpatch vs torch ops vs HF-style hooks vs
vLLM's kernel, grouped per dtype and shape.

    pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-group-by=group \\
        --benchmark-json=benchmarks/results/bench_gpu.json
    pytest benchmarks/test_bench_gpu.py --benchmark-only --benchmark-compare   # against the last saved run

Each round: an L2 flush (256 MiB write) in ``setup``, then one call and a device synchronize,
timed on the host; small shapes therefore include ~5–10 µs of launch + sync (the event-timed
device times are in ``benchmarks/gpu_check.py``'s kernels part). Every implementation's output
is compared with the same maths in fp32 torch ops before it is timed. Skipped without CUDA.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import fastpatch as fp  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

SHAPES = [("bf16", 1, 4096), ("bf16", 4096, 4096), ("bf16", 16384, 4096), ("fp16", 4096, 4096),
          ("fp32", 4096, 4096)]
VARIANTS = ("none", "steer", "lowrank16", "bank256_mixed")
FLUSH = torch.empty(gpu_check.FLUSH_BYTES, dtype=torch.int8, device="cuda")
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def hooks_style(x, r, w, bank, index, eps=1e-6):
    """What a model with a forward hook runs: HF's dtype-rounded add, the hook's add, HF's RMSNorm."""
    h = x + r
    if bank is not None:
        h = h + bank.shift[0]  # a steering hook adds one vector (one-patch steer banks only)
    y = h.float()
    return (w * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)), h


def _impls():
    impls = {"fastpatch": lambda x, r, w, bank, index: fp.fused_add_norm(x, r, w, bank=bank, index=index),
             "torch_ops": gpu_check.torch_unfused, "hooks": hooks_style}
    vk = gpu_check.vllm_kernel()
    if vk is not None:
        impls["vllm"] = lambda x, r, w, bank, index: (vk(x, r, w, 1e-6), (x, r))[1]
    return impls


IMPLS = _impls()


def _flush():
    FLUSH.zero_()
    torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype_name,N,D", SHAPES, ids=[f"{d}-N{n}-D{h}" for d, n, h in SHAPES])
def test_fused_add_norm(benchmark, dtype_name, N, D, variant, impl):
    if impl == "vllm" and variant != "none":
        pytest.skip("vLLM's kernel applies no patch")
    if impl == "hooks" and variant not in ("none", "steer"):
        pytest.skip("the hook baseline is a steering hook")
    dtype = getattr(torch, gpu_check.DTYPE_NAMES[dtype_name])
    x, r, w, bank, index = gpu_check.make_inputs(N, D, variant, "cuda", dtype)
    fp.config.check_index_values = False  # a host sync, not part of the kernel
    fn = IMPLS[impl]
    want_out, want_res = gpu_check.torch_unfused(x, r, w, bank, index)
    xi, ri = (x.clone(), r.clone()) if impl == "vllm" else (x, r)
    out, res = fn(xi, ri, w, bank, index)
    torch.testing.assert_close(res.float(), want_res.float(), rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(out.float(), want_out.float(), rtol=TOL[dtype], atol=2 * TOL[dtype])

    def call():
        fn(xi, ri, w, bank, index)
        torch.cuda.synchronize()

    benchmark.group = f"{dtype_name} N={N} D={D} {variant}"
    benchmark.extra_info.update(bytes=4 * N * D * x.element_size(), device=torch.cuda.get_device_name())
    benchmark.pedantic(call, setup=_flush, rounds=30, warmup_rounds=3)
    fp.config.check_index_values = True
