"""The CUDA C++ backend: csrc/cuda (kernels + torch binding), JIT-built on first use.

Available when the device is a CUDA device, torch is a CUDA build, and the extension builds
(``torch.utils.cpp_extension.load`` with ninja; cached in torch's extension directory afterwards).
The result is cached: a failed build is not retried in the same process.

Eager calls go through a pybind11 function (~0.5 µs per call); while torch.compile traces, the
registered op ``torch.ops.fastpatch.fused_add_norm_cuda`` (with a fake impl) is used instead.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .flat_args import call_flat
from .sources import csrc_dir

_CSRC = csrc_dir()
_CUDA_DIR = _CSRC / "cuda"
# One .cu file per activation dtype: ninja compiles them in parallel.
_SOURCES = [_CUDA_DIR / "binding.cpp", _CUDA_DIR / "fused_add_norm_f32.cu",
            _CUDA_DIR / "fused_add_norm_bf16.cu", _CUDA_DIR / "fused_add_norm_f16.cu"]

_lock = threading.Lock()
_built: Optional[bool] = None
_error: str = ""
_fast = None  # pybind11 function of the built module
_op = None    # torch.ops.fastpatch.fused_add_norm_cuda.default


def _environment_problem(device) -> str:
    """Why this backend cannot run on ``device`` regardless of the build, or ''."""
    device = torch.device(device)
    if device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return ""


def build(verbose: bool = False) -> None:
    """Compile (or load from torch's extension cache) the extension and register its fake impl."""
    global _built, _error, _fast, _op
    with _lock:
        if _built is not None:
            return
        try:
            from torch.utils.cpp_extension import load

            missing = [str(s) for s in _SOURCES if not s.exists()]
            if missing:
                raise FileNotFoundError(f"CUDA sources not found: {missing}")
            # No -std flag: torch picks the standard its own headers need.
            module = load(name="fastpatch_cuda", sources=[str(s) for s in _SOURCES],
                          extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                          extra_include_paths=[str(_CSRC)], is_python_module=True, verbose=verbose)
            _register_fake()
            _fast = module.fused_add_norm
            _op = torch.ops.fastpatch.fused_add_norm_cuda.default
            _built = True
        except Exception as exc:  # any build failure just makes the backend unavailable
            _error = f"{type(exc).__name__}: {exc}"
            _built = False


def _register_fake() -> None:
    # The op only writes into its out-arguments, so the fake impl has nothing to compute; it lets
    # torch.compile trace through the op without running it.
    @torch.library.register_fake("fastpatch::fused_add_norm_cuda")
    def _(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift,
          gate_dir, gate_threshold, gate_mode, index, fire_counts, out, residual_out):
        return None


def is_available(device) -> bool:
    if _built and getattr(device, "type", None) == "cuda":  # hot path: resolve() asks every call
        return True
    if _environment_problem(device):
        return False
    if _built is None:
        build()
    return bool(_built)


def why_unavailable(device) -> str:
    problem = _environment_problem(device)
    if problem:
        return problem
    if _built is None:
        build()
    return _error or "available"


def op():
    """The registered op (``torch.ops.fastpatch.fused_add_norm_cuda.default``); builds it if needed."""
    if _op is None:
        build()
        if not _built:
            raise RuntimeError(f"fastpatch cuda backend failed to build: {_error}")
    return _op


def run(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
        out=None, residual_out=None):
    # Hot path (twice per decoder layer per token): no dicts, no host syncs, only outputs allocated.
    if _fast is None:
        op()
    call = _op if torch.compiler.is_compiling() else _fast
    return call_flat(call, x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index,
                     fire_counts, out, residual_out)
