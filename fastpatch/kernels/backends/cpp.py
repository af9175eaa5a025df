"""The C++ CPU backend: csrc/cpu/fused_add_norm.cpp (kernel) + csrc/cpu/torch_bindings.cpp, JIT-built on first use.

Loading the extension registers the kernel as the CPU implementation of the one op
``torch.ops.fastpatch.fused_add_norm`` (schema and fake: ``library``). Eager calls enter through a
pybind11 function that calls that op through the dispatcher from C++ (~0.5 µs; a dispatcher op called
from Python costs ~4 µs); while torch.compile traces, ``run`` calls the op itself.

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

from . import library
from .calls import NormSpec, invoke
from .sources import csrc_dir

_CSRC = csrc_dir()
_SOURCES = [_CSRC / "cpu" / "fused_add_norm.cpp", _CSRC / "cpu" / "torch_bindings.cpp"]

# at::vec is a header library: the capability macro picks the vector width it compiles to.
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_built: Optional[bool] = None
_error: str = ""
_op = None  # torch.ops.fastpatch.fused_add_norm.default once the CPU kernel is registered
_direct = None  # the op from C++ (pybind11 entry, backend=None): ~0.5 µs per call instead of ~4 µs
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
    """Compile (or load from torch's extension cache) the kernel; loading registers it as the op's CPU
    implementation."""
    global _built, _error, _op, _direct, _module
    with _lock:
        if _built is not None:
            return
        try:
            from torch.utils.cpp_extension import load

            if not all(s.exists() for s in _SOURCES):
                raise FileNotFoundError(f"C++ sources not found under {_CSRC}")
            # A Python module too (not just the op's CPU implementation): see _direct.
            module = load(name="fastpatch_cpu", sources=[str(s) for s in _SOURCES],
                          extra_cflags=["-O3", "-std=c++17", *_simd_flags(), *_openmp_flags()],
                          extra_ldflags=_openmp_flags(),
                          extra_include_paths=[str(_CSRC)], is_python_module=True, verbose=verbose)
            _op = library.OP
            _direct = module.fused_add_norm
            _module = module
            _built = True
        except Exception as exc:  # any build failure just makes the backend unavailable
            _error = f"{type(exc).__name__}: {exc}"
            _built = False


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
    """The op (``torch.ops.fastpatch.fused_add_norm.default``) with its CPU kernel registered; builds it if
    needed."""
    if _op is None:
        build()
        if not _built:
            raise RuntimeError(f"fastpatch cpp backend failed to build: {_error}")
    return _op


def make_plan(weight, bias, norm: NormSpec, args, hidden: int):
    """A C++ plan holding a call's checked, unchanging arguments (see fastpatch/kernels/ops.py; ``args``:
    the bank's KernelArgs or None): ``plan.run(x, residual, index, fire_counts, out, residual_out,
    check_index) -> bool``, which calls the op through the dispatcher from C++."""
    if _module is None:
        op()
    bank = (None,) * 8 if args is None else args[:8]
    return _module.Plan(weight, bias, norm.eps, norm.kind, norm.weight_offset, *bank, hidden)


def built_with_openmp() -> bool:
    """Whether the built kernel can spread rows over torch's threads."""
    if _module is None:
        op()
    return bool(_module.built_with_openmp())


def launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
           gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    """The op's flat arguments (see ``library``), eagerly: the C++ entry, which dispatches the op from C++."""
    if _direct is None:
        op()
    _direct(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
            gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out)


def run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
    # Hot path (twice per decoder layer per token): no dicts, no host syncs, only outputs allocated.
    # Eager calls enter the op from C++ (the pybind11 entry); torch.compile must see the op itself (it
    # has the fake impl), and is_compiling() is a constant while tracing.
    if _op is None:
        op()
    return invoke(_op if torch.compiler.is_compiling() else _direct, x2d, residual2d, weight, bias, norm, args,
                  index, fire_counts, out, residual_out)
