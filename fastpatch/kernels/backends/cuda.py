"""The CUDA C++ backend: csrc/cuda (kernels + torch binding), JIT-built on first use.

Available when the device is a CUDA device, torch is a CUDA build, and the extension builds
(``torch.utils.cpp_extension.load`` with ninja; cached in ``build_directory()`` afterwards).
The result is cached: a failed build is not retried in the same process.

A build takes minutes (4 translation units, each instantiating the kernel template for its
dtype): when no cached build is found, a message says so on stderr before it starts and a line
every 30 s while it runs; ``fastpatch build --cuda`` (or :func:`build`) does it ahead of time.
``FASTPATCH_CUDA_BUILD=0`` never compiles: without a cached build the backend is unavailable
(``backend=None`` then uses Triton alone).

The extension registers nothing with the dispatcher: its kernel is one of the two the CUDA
implementation of the one op ``torch.ops.fastpatch.fused_add_norm`` chooses between per shape
(``backends.choose_cuda``), through :func:`launch` (a pybind11 function, ~0.5 µs per call). ``run``
calls the op with ``backend="cuda"``, eager or compiled.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from . import library
from .calls import invoke
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


def environment_problem(device) -> str:
    """Why this backend cannot run on ``device`` regardless of the build, or ''."""
    device = torch.device(device)
    if device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return ""


_NAME = "fastpatch_cuda"
_HEADERS = ("kernels.cuh", "launch.h", "launch_plan.h", "params.h")
_PROGRESS_EVERY_S = 30.0


def build_directory() -> Path:
    """Where the extension is built and cached: the folder torch's JIT would use
    (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions/py<ver>_cu<ver>``) + ``fastpatch_cuda``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{accel}")
    return Path(root) / _NAME


def is_cached() -> bool:
    """True if a built library newer than every source is in ``build_directory()``: loading it takes
    a second. (torch still checks the sources' hash and rebuilds if they changed.)"""
    folder = build_directory()
    libs = list(folder.glob(f"{_NAME}*.so")) if folder.is_dir() else []
    sources = _SOURCES + [_CUDA_DIR / h for h in _HEADERS] + [_CSRC / "patch_math.h"]
    newest = max((s.stat().st_mtime for s in sources if s.exists()), default=0.0)
    return any(lib.stat().st_mtime >= newest for lib in libs)


def _say(message: str) -> None:
    print(f"fastpatch: {message}", file=sys.stderr, flush=True)


def build(verbose: bool = False, quiet: bool = False) -> None:
    """Compile (or load from the cache) the extension.

    verbose: show the compiler commands and output. quiet: no progress lines (they go to stderr
    and only appear when a compile is needed)."""
    global _built, _error, _fast
    with _lock:
        if _built is not None:
            return
        stop = threading.Event()
        start = time.perf_counter()
        announce = not quiet and not is_cached()
        try:
            from torch.utils.cpp_extension import load

            missing = [str(s) for s in _SOURCES if not s.exists()]
            if missing:
                raise FileNotFoundError(f"CUDA sources not found: {missing}")
            if os.environ.get("FASTPATCH_CUDA_BUILD", "1") == "0" and not is_cached():
                announce = False
                raise RuntimeError("no cached build and FASTPATCH_CUDA_BUILD=0 forbids compiling one "
                                   "(run `fastpatch build --cuda`)")
            folder = build_directory()
            folder.mkdir(parents=True, exist_ok=True)
            if announce:
                arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU's"
                _say(f"compiling the CUDA backend (csrc/cuda, {len(_SOURCES)} files, {arch} arch) into {folder}; "
                     "this takes a few minutes once, later runs load the cached build. Prebuild with "
                     "`fastpatch build --cuda`; `backend=\"triton\"` needs no build.")
                threading.Thread(target=_progress, args=(stop, start), daemon=True).start()
            # No -std flag: torch picks the standard its own headers need.
            module = load(name=_NAME, sources=[str(s) for s in _SOURCES],
                          extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"],
                          extra_include_paths=[str(_CSRC)], build_directory=str(folder),
                          is_python_module=True, verbose=verbose)
            _fast = module.fused_add_norm
            _built = True
            if announce:
                _say(f"CUDA backend built in {time.perf_counter() - start:.0f} s")
        except Exception as exc:  # any build failure just makes the backend unavailable
            _error = f"{type(exc).__name__}: {exc}"
            _built = False
            if announce:
                _say(f"CUDA backend build failed after {time.perf_counter() - start:.0f} s "
                     f"(the triton backend is used instead): {_error[:500]}")
        finally:
            stop.set()


def _progress(stop: threading.Event, start: float) -> None:
    while not stop.wait(_PROGRESS_EVERY_S):
        _say(f"still compiling the CUDA backend ({time.perf_counter() - start:.0f} s)")


def is_available(device) -> bool:
    if _built and getattr(device, "type", None) == "cuda":  # hot path: resolve() asks every call
        return True
    if environment_problem(device):
        return False
    if _built is None:
        build()
    return bool(_built)


def why_unavailable(device) -> str:
    problem = environment_problem(device)
    if problem:
        return problem
    if _built is None:
        build()
    return _error or "available"


def op():
    """The op (``torch.ops.fastpatch.fused_add_norm.default``) once this extension is built; builds it if
    needed (call with ``backend="cuda"`` to force this kernel)."""
    if _fast is None:
        build()
        if not _built:
            raise RuntimeError(f"fastpatch cuda backend failed to build: {_error}")
    return library.OP


def launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
           gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    """The op's flat arguments (see ``library``) run by this kernel (the op's CUDA implementation calls it)."""
    if _fast is None:
        op()
    _fast(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
          gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out)


def run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
    return invoke(library.OP, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out,
                  "cuda")
