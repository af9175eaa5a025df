"""The C++ CPU backend: csrc/cpu/fused_add_norm.cpp, JIT-built on first use.

The kernel is compiled for the SIMD level torch itself picked for this CPU (AVX512, AVX2 or the
portable default), never with -march=native: the flags are part of torch's extension-cache hash,
so a cache shared with a different machine rebuilds instead of running foreign instructions.

It is built with OpenMP when torch's own CPU parallel backend is OpenMP (the default wheels): then
at::parallel_for in the kernel runs on torch's thread pool, honouring torch.set_num_threads(), and
the extension links the libgomp that torch already loaded (same soname, one runtime). Without
OpenMP at::parallel_for would run every call on the calling thread.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from .flat_args import call_flat
from .sources import csrc_dir

_CSRC = csrc_dir()
_SOURCES = [_CSRC / "cpu" / "fused_add_norm.cpp"]

# at::vec is a header library: the capability macro picks the vector width it compiles to.
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_built: Optional[bool] = None
_error: str = ""
_op = None  # torch.ops.fastpatch_cpp.fused_add_norm.default once built
_direct = None  # the same kernel as a pybind11 function: ~0.5 µs per call instead of ~4 µs
_module = None  # the extension module (also Plan, built_with_openmp)


def build_directory():
    """Where torch's JIT builds and caches this extension: ``$TORCH_EXTENSIONS_DIR/fastpatch_cpu``, or
    torch's default root + ``py<ver>_<accelerator>/fastpatch_cpu`` (the rule of torch's
    ``_get_build_directory``, which creates the folder, so it is restated here instead of called)."""
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accel = f"rocm{torch.version.hip.replace('.', '')}"
        else:
            accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{accel}")
    return Path(root) / "fastpatch_cpu"


def _simd_flags() -> list[str]:
    if os.environ.get("FASTPATCH_CPU_PORTABLE"):  # escape hatch: build the portable kernel
        return []
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return []
    # AVX512 torch capability strings include e.g. "AVX512" and "AVX512_BF16"-style suffixes.
    if capability.startswith("AVX512"):
        return _SIMD_FLAGS["AVX512"]
    if capability.startswith("AVX2"):
        return _SIMD_FLAGS["AVX2"]
    return []


def _openmp_flags() -> list[str]:
    if os.environ.get("FASTPATCH_CPU_NO_OPENMP"):  # escape hatch: single-threaded kernel
        return []
    try:
        uses_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    except Exception:  # pragma: no cover
        return []
    return ["-fopenmp"] if uses_openmp else []


def build(verbose: bool = False) -> None:
    """Compile (or load from torch's extension cache) the kernel and register its fake impl."""
    global _built, _error, _op, _direct, _module
    with _lock:
        if _built is not None:
            return
        try:
            from torch.utils.cpp_extension import load

            if not all(s.exists() for s in _SOURCES):
                raise FileNotFoundError(f"C++ sources not found under {_CSRC}")
            # A Python module too (not just the TORCH_LIBRARY op): see _direct.
            module = load(name="fastpatch_cpu", sources=[str(s) for s in _SOURCES],
                          extra_cflags=["-O3", "-std=c++17", *_simd_flags(), *_openmp_flags()],
                          extra_ldflags=_openmp_flags(),
                          extra_include_paths=[str(_CSRC)], is_python_module=True, verbose=verbose)
            _register_fake()
            _op = torch.ops.fastpatch_cpp.fused_add_norm.default
            _direct = module.fused_add_norm
            _module = module
            _built = True
        except Exception as exc:  # any build failure just makes the backend unavailable
            _error = f"{type(exc).__name__}: {exc}"
            _built = False


def _register_fake() -> None:
    # The op only writes into its out-arguments, so the fake impl has nothing to compute; it lets
    # torch.compile trace through the op without running it.
    @torch.library.register_fake("fastpatch_cpp::fused_add_norm")
    def _(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift,
          gate_dir, gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out):
        return None


def is_available(device) -> bool:
    if torch.device(device).type != "cpu":
        return False
    if _built is None:
        build()
    return bool(_built)


def why_unavailable(device) -> str:
    if torch.device(device).type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if _built is None:
        build()
    return _error or "available"


def op():
    """The registered op (``torch.ops.fastpatch_cpp.fused_add_norm.default``); builds it if needed."""
    if _op is None:
        build()
        if not _built:
            raise RuntimeError(f"fastpatch cpp backend failed to build: {_error}")
    return _op


def make_plan(weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir, gate_threshold,
              gate_mode, act_threshold, hidden):
    """A C++ plan holding a call's checked, unchanging arguments (see fastpatch/kernels/ops.py):
    ``plan.run(x, residual, index, fire_counts, out, residual_out, check_index) -> bool``."""
    if _module is None:
        op()
    return _module.Plan(weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
                        gate_threshold, gate_mode, act_threshold, hidden)


def built_with_openmp() -> bool:
    """Whether the built kernel can spread rows over torch's threads."""
    if _module is None:
        op()
    return bool(_module.built_with_openmp())


def run(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
        out=None, residual_out=None):
    # Hot path (twice per decoder layer per token): no dicts, no host syncs, only outputs allocated.
    # Eager calls go straight to the pybind11 binding; torch.compile must see the dispatcher op
    # (it has the fake impl), and is_compiling() is a constant while tracing.
    if _op is None:
        op()
    call = _op if torch.compiler.is_compiling() else _direct
    return call_flat(call, x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index,
                     fire_counts, out, residual_out)
