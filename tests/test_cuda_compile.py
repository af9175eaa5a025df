"""CUDA backend checks that need no GPU: nvcc compile of every kernel for sm_80 and sm_90a (no
spills), the host-side launch plan and patch maths under g++, and a syntax check of the torch
binding against this torch's headers."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def _cuda_include_dirs() -> list[str]:
    """The CUDA toolkit's include folders, as nvcc itself reports them (nvcc may be a wrapper)."""
    if not NVCC:
        return []
    out = subprocess.run([NVCC, "-v", "-x", "cu", "-E", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    dirs = []
    for line in out.splitlines():
        if line.startswith("#$ INCLUDES=") or line.startswith("#$ SYSTEM_INCLUDES="):
            parts = line.split("=", 1)[1].replace('"', " ").split()
            dirs += [p[2:] if p.startswith("-I") else p for p in parts if p not in ("-isystem",)]
    return [d for d in dirs if Path(d).is_dir()]


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: cannot compile the CUDA kernels here")
def test_kernels_compile_without_spills():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "cuda_compile_check.py")],
                          capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    # 3 activation dtypes x 2 vector widths x 3 layouts x patched/unpatched, for 2 architectures.
    rows = [line for line in proc.stdout.splitlines() if "fused_add_norm_kernel<" in line]
    assert len(rows) == 72, report
    assert "OK: no compile errors, no spills" in proc.stdout


@pytest.mark.skipif(GXX is None, reason="g++ not on PATH")
def test_launch_plan_and_patch_math_on_host(tmp_path):
    exe = tmp_path / "host_plan_test"
    build = subprocess.run([GXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}",
                            str(CSRC / "cuda" / "host_plan_test.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout


@pytest.mark.skipif(GXX is None or NVCC is None, reason="needs g++ and the CUDA headers (nvcc)")
def test_binding_parses_against_torch_headers():
    """binding.cpp cannot be linked without a CUDA torch, but it can be type-checked: the CPU wheel
    ships the c10/cuda headers (minus the generated cmake macros)."""
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include_dirs()
    if not cuda_inc:
        pytest.skip("could not locate the CUDA include folder from nvcc -v")
    cmd = [GXX, "-fsyntax-only", "-std=c++17", "-w", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           "-DTORCH_EXTENSION_NAME=fastpatch_cuda", f"-I{CSRC}",
           f"-I{sysconfig.get_paths()['include']}", *[f"-I{p}" for p in include_paths()],
           *[f"-I{p}" for p in cuda_inc], str(CSRC / "cuda" / "binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
