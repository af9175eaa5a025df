"""`fastpatch build [--cuda] [--cpp]`: compile the C++/CUDA kernels now instead of on first use."""
from __future__ import annotations

import sys
import time

NAME = "build"
HELP = "compile the CUDA and C++ kernels ahead of time (cached for later runs)"
DESCRIPTION = """\
Compile fastpatch's native kernels now, so that the first patched forward does not stop for the
build. Each backend is built once per torch/CUDA/Python version and cached in torch's extension
folder (shown below); later imports load the cached library in about a second.

  --cuda   the CUDA backend (csrc/cuda, nvcc + ninja; a few minutes; needs a CUDA torch and a GPU
           or TORCH_CUDA_ARCH_LIST)
  --cpp    the C++ CPU backend (csrc/cpu; under a minute)

With neither flag, every backend that can be built on this machine is built. The Triton kernels
need no build step (triton compiles each specialisation on first launch, into ~/.triton/cache).
Exit status 1 if a backend that was asked for by flag cannot be built.

example:
  fastpatch build            # whatever this machine supports
  fastpatch build --cuda -v  # show the compiler commands
"""


def add_arguments(p) -> None:
    p.add_argument("--cuda", action="store_true", help="build the CUDA backend")
    p.add_argument("--cpp", action="store_true", help="build the C++ CPU backend")
    p.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands and output")


def _build(name: str, device: str, verbose: bool) -> tuple[bool, str]:
    from fastpatch.kernels import backends

    module = backends.load(name)
    problem = module.environment_problem(device) if hasattr(module, "environment_problem") else ""
    if problem:
        return False, problem
    start = time.perf_counter()
    module.build(verbose=verbose)
    reason = module.why_unavailable(device)
    where = f" ({module.build_directory()})" if hasattr(module, "build_directory") else ""
    if reason == "available":
        return True, f"ready in {time.perf_counter() - start:.1f} s{where}"
    return False, reason


def run(args) -> int:
    asked = [name for name, flag in (("cuda", args.cuda), ("cpp", args.cpp)) if flag]
    targets = asked or ["cuda", "cpp"]
    status = 0
    for name in targets:
        ok, message = _build(name, "cuda" if name == "cuda" else "cpu", args.verbose)
        print(f"{name}: {'built' if ok else 'not built'}: {message}")
        sys.stdout.flush()
        if not ok and name in asked:
            status = 1
    return status
