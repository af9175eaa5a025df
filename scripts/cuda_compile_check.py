#!/usr/bin/env python3
"""Compile every CUDA source under csrc/cuda with nvcc for sm_80 and sm_90a, no GPU needed.

Prints registers, stack frame and spill stores/loads for every kernel instantiation (from
``ptxas -v``) and exits non-zero on a compile error or on spills in a kernel the dispatcher
launches (every ``fused_add_norm_kernel`` instantiation is reachable from ``launch_typed``).

Flags mirror what torch.utils.cpp_extension passes for .cu files (the __CUDA_NO_HALF_* macros),
so a source that compiles here also compiles in the JIT build on a GPU machine.

    python scripts/cuda_compile_check.py [--nvcc PATH] [--jobs N] [--arch sm_80 ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
TORCH_LIKE_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# Kernels the dispatcher launches: spills there fail the check.
DISPATCHED = re.compile(r"fused_add_norm_kernel")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_one(nvcc: str, source: Path, arch: str, outdir: str):
    cmd = [nvcc, "-c", str(source), "-o", os.path.join(outdir, f"{source.stem}.{arch}.o"),
           "-std=c++17", "-O3", f"-I{CSRC}", *TORCH_LIKE_DEFINES, "-gencode", ARCHS[arch],
           "-Xptxas", "-v"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return source, arch, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def parse_ptxas(text: str):
    """[(mangled name, arch, registers, stack, spill stores, spill loads)] from ptxas -v output."""
    rows, current = [], None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "stack": 0, "st": 0, "ld": 0, "regs": None}
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack"], current["st"], current["ld"] = map(int, m.groups())
            continue
        m = _REGS.search(line)
        if m:
            current["regs"] = int(m.group(1))
            rows.append(current)
            current = None
    return rows


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """fused_add_norm_kernel<__nv_bfloat16, 8, 1, true>(...) -> the template arguments."""
    name = name.replace("fastpatch::cuda::", "")
    return name.split("(")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    ap.add_argument("--jobs", type=int, default=max(2, os.cpu_count() or 2))
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS))
    ap.add_argument("--source", action="append", help="only these .cu files (names under csrc/cuda)")
    args = ap.parse_args(argv)
    if not args.nvcc:
        print("nvcc not found on PATH", file=sys.stderr)
        return 2
    archs = args.arch or list(ARCHS)
    sources = sorted(s for s in (CSRC / "cuda").glob("*.cu") if not args.source or s.name in args.source)
    if not sources:
        print(f"no .cu sources under {CSRC / 'cuda'}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda sa: compile_one(args.nvcc, sa[0], sa[1], tmp),
                                [(s, a) for s in sources for a in archs]))
    failed = False
    rows = []
    for source, arch, rc, text, secs in results:
        rel = source.relative_to(ROOT)
        if rc != 0:
            failed = True
            print(f"COMPILE ERROR {rel} [{arch}] (exit {rc}):\n{text}", file=sys.stderr)
            continue
        print(f"compiled {rel} [{arch}] in {secs:.1f} s")
        rows += [dict(r, source=source.name) for r in parse_ptxas(text)]
    names = demangle(sorted({r["name"] for r in rows}))
    spilled = []
    print(f"\n{'kernel':<72} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8}")
    for r in sorted(rows, key=lambda r: (names[r["name"]], r["arch"])):
        pretty = short(names[r["name"]])
        print(f"{pretty:<72} {r['arch']:<7} {r['regs']:>4} {r['stack']:>5} {r['st']:>8} {r['ld']:>8}")
        if DISPATCHED.search(pretty) and (r["st"] or r["ld"] or r["stack"]):
            spilled.append(f"{pretty} [{r['arch']}]")
    print(f"\n{len(rows)} kernel instantiations, {len(sources)} sources x {len(archs)} archs, "
          f"{time.perf_counter() - t0:.1f} s")
    if spilled:
        print("SPILLS in dispatched kernels:\n  " + "\n  ".join(spilled), file=sys.stderr)
    if failed or spilled:
        return 1
    if not rows:
        print("no kernels found in ptxas output", file=sys.stderr)
        return 1
    print("OK: no compile errors, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
