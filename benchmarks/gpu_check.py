#!/usr/bin/env python
"""One command for a machine with a CUDA GPU: build, GPU tests, checked kernel timings, benchmarks.

    python benchmarks/gpu_check.py                      # every part, at most ~9 min (part time limits)
    python benchmarks/gpu_check.py --parts kernels      # one part (rerun what failed or ran out of time)
    python benchmarks/gpu_check.py --quick              # smaller timing grid (~1 min)
    python benchmarks/gpu_check.py --dry-run            # tiny grid on CPU through the Triton interpreter

Parts (``--parts``, in this order; each has a time limit, ``--budget-s`` scales them all):

- ``build``: builds the CUDA backend (``fastpatch build --cuda``) and reports how long it took; if
  it fails or runs out of time, later parts run with ``FASTPATCH_CUDA_BUILD=0`` (Triton only).
- ``tests``: ``pytest -m gpu tests``: every GPU-marked test (kernels at real shapes against the
  float64 reference, a bf16 Llama fused vs hooks, CUDA-graph capture, each backend's GPU grid).
- ``kernels``: timings of what ``fastpatch.apply`` launches: banks in the activations' dtype,
  ``backend=None`` (the per-shape choice, recorded per row as ``chose``), next to each backend
  named explicitly, the same maths as separate torch ops (``torch_unfused``) and vLLM's
  ``fused_add_rms_norm`` when vLLM is importable. Every case's output is first compared with the
  float64 reference (all rows up to 2^25 elements, else three 1024-row ranges). Each timed call
  follows an L2 flush (a 256 MiB write) and is timed with CUDA events (median of ``--reps``).
  GB/s counts x, residual, out, residual_out (4·N·D elements) plus the bank bytes read; the roof
  is a device ``copy_`` of 2·N·D elements (the same 4·N·D traffic), timed the same way.
- ``bench``: the pytest-benchmark suite ``benchmarks/test_bench_gpu.py`` (saved JSON, comparable
  with ``--benchmark-compare``).
- ``model``: ``fastpatch bench`` on a bf16 Llama (hidden 2048, 8 layers, random weights): HF eager
  vs hooks vs fused patches, prefill and decode.

Results go to ``benchmarks/results/gpu_check_<device>_<date>.json`` and ``.md``, rewritten after
every part (a part cut short by its time limit leaves what it had).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("build", "tests", "kernels", "bench", "model")
# Seconds per part at the default budget (520 s: a 10-minute command limit with room to spare).
PART_SECONDS = {"build": 170, "tests": 150, "kernels": 120, "bench": 40, "model": 40}
DEFAULT_BUDGET_S = sum(PART_SECONDS.values())

NS = (1, 8, 64, 512, 4096, 16384)
DS = (4096, 2048, 8192, 16384)  # 4096 first: the targets are measured there
QUICK_NS = (1, 64, 4096)
QUICK_DS = (4096,)
VARIANTS = ("none", "steer", "lowrank16", "lowrank128", "gated", "bank256_mixed", "bank16_lowrank_mixed")
# Extra dtypes are timed at these shapes only (bf16 gets the whole grid).
OTHER_DTYPE_SHAPES = ((1, 4096), (4096, 4096))
FLUSH_BYTES = 256 << 20      # > the 50 MiB L2 of an H100/H200
FULL_CHECK_ELEMENTS = 1 << 25
CHECK_RANGE_ROWS = 1024
TOLERANCES = {"float32": (1e-4, 1e-4), "bfloat16": (2e-2, 3e-2), "float16": (3e-3, 4e-3)}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny grid on CPU through the Triton interpreter (checks this script's logic)")
    ap.add_argument("--quick", action="store_true", help="small timing grid (D 4096, N 1/64/4096)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help=f"total seconds for all parts (default {DEFAULT_BUDGET_S}); split as {PART_SECONDS}")
    ap.add_argument("--impls", nargs="+",
                    help="only these implementations (auto, cuda, triton, reference, torch_unfused, vllm)")
    ap.add_argument("--ns", type=int, nargs="+")
    ap.add_argument("--ds", type=int, nargs="+")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPE_NAMES), default=["bf16", "fp16", "fp32"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    # kept for old command lines
    ap.add_argument("--skip-tests", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-model-bench", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backends", nargs="+", dest="impls", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.skip_tests:
        args.parts = [p for p in args.parts if p != "tests"]
    if args.skip_model_bench:
        args.parts = [p for p in args.parts if p != "model"]
    return args


# --- cases -----------------------------------------------------------------------------------------

def make_bank(D, variant, device, dtype, seed=0):
    """The PatchBank a timing variant uses (None for "none"), in ``dtype`` as apply() builds it."""
    import torch

    import fastpatch as fp

    gen = torch.Generator().manual_seed(seed * 7919 + D)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def lowrank(r):
        return fp.LowRank(randn(D, r) / D**0.5, randn(r, D) / (4 * r**0.5), bias=randn(r) * 0.1)

    if variant == "none":
        return None
    if variant == "steer":
        patches = [fp.Steer(randn(D), scale=0.5)]
    elif variant == "lowrank16":
        patches = [lowrank(16)]
    elif variant == "lowrank128":
        patches = [lowrank(128)]
    elif variant == "gated":
        patches = [fp.Gated(fp.Steer(randn(D), scale=0.5), randn(D), 0.0, metric="cosine")]
    elif variant == "bank256_mixed":
        patches = [fp.Steer(randn(D), scale=0.5) for _ in range(256)]
    elif variant == "bank16_lowrank_mixed":
        patches = [lowrank(16) for _ in range(16)]
    else:
        raise ValueError(variant)
    return fp.PatchBank(patches, D, device=device, dtype=dtype)


def make_inputs(N, D, variant, device, dtype, bank=None):
    """(x, residual, weight, bank, index) for one case; random data made on the device
    (16384 × 16384 float64 on the host would take seconds per case)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(N * 31 + D)
    x = torch.randn(N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    r = torch.randn(N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=gen, device=device, dtype=torch.float32)).to(dtype)
    if bank is None:
        bank = make_bank(D, variant, device, dtype)
    index = None
    if bank is not None and bank.num_patches > 1:
        index = torch.randint(-1, bank.num_patches, (N,), generator=gen, device=device)
    return x, r, w, bank, index


def torch_unfused(x, r, w, bank, index, eps=1e-6):
    """The same maths as separate torch ops (what a model without fastpatch would run)."""
    import torch

    h = x.float() + r.float()
    if bank is not None:
        N = h.shape[0]
        if index is None:
            k = torch.zeros(N, dtype=torch.long, device=h.device)
            valid = torch.ones(N, dtype=torch.bool, device=h.device)
        else:
            valid = (index >= 0) & (index < bank.num_patches)
            k = torch.where(valid, index, torch.zeros_like(index)).long()
        delta = bank.shift[k].float() if bank.has_shift else torch.zeros_like(h)
        if bank.rank:
            if bank.num_patches == 1:
                z = h @ bank.down[0].float().t() + bank.bias[0].float()
                delta = delta + z @ bank.up[0].float()
            else:
                z = torch.einsum("nd,nrd->nr", h, bank.down[k].float()) + bank.bias[k].float()
                delta = delta + torch.einsum("nr,nrd->nd", z, bank.up[k].float())
        fires = valid
        if bank.has_gate:
            proj = (h * bank.gate_dir[k].float()).sum(-1)
            cos = proj / h.norm(dim=-1).clamp_min(1e-30)
            mode = bank.gate_mode[k]
            metric = torch.where((mode == 1) | (mode == 2), cos, proj)
            above = (mode == 1) | (mode == 3)
            thr = bank.gate_threshold[k]
            fires = fires & ((mode == 0) | torch.where(above, metric > thr, metric < thr))
        h = h + fires.unsqueeze(-1).float() * delta
    res = h.to(x.dtype)
    y = res.float()
    out = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)
    return out, res


def vllm_kernel():
    """vLLM's in-place ``fused_add_rms_norm(x, residual, weight, eps)`` op, or None."""
    try:
        import torch

        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)
        return torch.ops._C.fused_add_rms_norm
    except Exception:
        return None


# --- correctness of a timed case --------------------------------------------------------------------

def check_rows(N):
    """Row ranges compared with the reference: all rows, or three 1024-row ranges (start, middle,
    end; 32-aligned so the tile kernel's blocks are covered whole, the last partial block too)."""
    return [(0, N)] if N <= 3 * CHECK_RANGE_ROWS else [
        (0, CHECK_RANGE_ROWS), ((N // 2) // 32 * 32, (N // 2) // 32 * 32 + CHECK_RANGE_ROWS),
        (N - CHECK_RANGE_ROWS, N)]


def check_case(out, res, x, r, w, bank, index, eps=1e-6) -> dict:
    """Compare (out, residual_out) with the float64 reference; returns {ok, max_excess, rows_checked}.

    max_excess: the largest |got − want| − (atol + rtol·|want|) (≤ 0 passes), the rule of
    torch.testing.assert_close with casegen's tolerances."""
    import torch

    from fastpatch.core import reference

    rtol, atol = TOLERANCES[str(x.dtype).replace("torch.", "")]
    N, D = x.shape
    ranges = check_rows(N) if N * D > FULL_CHECK_ELEMENTS else [(0, N)]
    worst, checked = -float("inf"), 0
    rank = bank.rank if bank is not None else 0
    step = max(1, (1 << 26) // (max(rank, 1) * D))  # the reference gathers [rows, rank, D] float64
    for lo, hi in ranges:
        for s in range(lo, hi, step):
            e = min(hi, s + step)
            want_out, want_res = reference.fused_add_norm(
                x[s:e], r[s:e], w, bank=bank, index=None if index is None else index[s:e], eps=eps, exact=True)
            for got, want in ((out[s:e], want_out), (res[s:e], want_res)):
                excess = (got.double() - want).abs() - (atol + rtol * want.abs())
                worst = max(worst, float(torch.nan_to_num(excess, nan=float("inf")).max()))
            checked += e - s
    return dict(ok=worst <= 0, max_excess=worst, rows_checked=checked)


# --- timing ----------------------------------------------------------------------------------------

class Timer:
    """Median device time of one call, after an L2 flush, by CUDA events (wall clock on CPU)."""

    def __init__(self, device, reps):
        import torch

        self.device, self.reps = device, reps
        self.flush = torch.empty(FLUSH_BYTES if device == "cuda" else 1 << 16, dtype=torch.int8, device=device)

    def ms(self, fn) -> float:
        import torch

        fn()  # warm-up (JIT compiles, allocator)
        if self.device != "cuda":
            times = []
            for _ in range(self.reps):
                self.flush.zero_()
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            self.flush.zero_()  # the next call reads from HBM, not from L2
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def implementations(device, only=None):
    """name -> callable(x, r, w, bank, index) returning (out, residual_out)."""
    import fastpatch as fp
    from fastpatch.kernels import backends

    names = ["auto"] + list(backends.available(device))
    if "triton" not in names:  # CPU preference lists omit triton; the dry run still exercises it
        try:
            if backends.load("triton").is_available(device):
                names.append("triton")
        except ImportError:
            pass
    impls = {}
    for name in names:
        if device == "cpu" and name == "auto":
            continue  # the per-shape choice exists on CUDA only
        impls[name] = (lambda nm: lambda x, r, w, bank, index: fp.fused_add_norm(
            x, r, w, bank=bank, index=index, backend=nm))(None if name == "auto" else name)
    impls["torch_unfused"] = torch_unfused
    vk = vllm_kernel() if device == "cuda" else None
    if vk is not None:
        def vllm_fused(x, r, w, bank, index):
            if bank is not None:
                raise NotImplementedError("vLLM's kernel has no patch")
            vk(x, r, w, 1e-6)  # in place: r <- x + r, x <- norm(r)·w
            return x, r
        impls["vllm"] = vllm_fused
    if only:
        impls = {k: v for k, v in impls.items() if k in only}
    return impls


def chosen_backend(device, x, bank, index) -> str | None:
    """The backend ``backend=None`` (what apply() uses) picks for this call."""
    import torch

    from fastpatch.kernels import backends

    impl = backends.resolve(None, torch.device(device))
    if isinstance(impl, backends.PerShape):
        return impl.choose(x, bank, index)
    return backends.name_of(impl)


def grid(ns, ds, dtypes):
    """(dtype, N, D) cases: bf16 on the whole N × D grid, other dtypes at OTHER_DTYPE_SHAPES."""
    for dtype in dtypes:
        if dtype == "bf16" or len(ns) * len(ds) <= 2:
            shapes = [(N, D) for D in ds for N in ns]
        else:
            shapes = [(N, D) for N, D in OTHER_DTYPE_SHAPES if N in ns and D in ds] or [(ns[0], ds[0])]
        for N, D in shapes:
            yield dtype, N, D


def run_timings(device, ns, ds, dtypes, variants, only=None, reps=30, deadline=None, log=print):
    import fastpatch as fp

    # The index range check syncs the host: not part of the kernel (apply() builds valid indices).
    # Restored afterwards so a caller in the same process (the test suite) keeps its checks.
    saved = fp.config.check_index_values
    fp.config.check_index_values = False
    try:
        return _run_timings(device, ns, ds, dtypes, variants, only, reps, deadline, log)
    finally:
        fp.config.check_index_values = saved


def _bank_bytes(bank) -> int:
    if bank is None:
        return 0
    parts = [bank.gate_mode]
    if bank.rank:
        parts += [bank.down, bank.up, bank.bias]
    if bank.has_shift:
        parts.append(bank.shift)
    if bank.has_gate:
        parts += [bank.gate_dir, bank.gate_threshold]
    return sum(t.numel() * t.element_size() for t in parts)


def _too_big_for(name, N, D, bank) -> str | None:
    if name == "reference" and N * D * max(1, bank.rank if bank else 1) > (1 << 22):
        return "reference: shape too large for the float64 oracle"
    if name == "torch_unfused" and bank is not None and bank.rank and bank.num_patches > 1 \
            and N * bank.rank * D > (1 << 28):
        return "torch_unfused: the per-row [N, rank, D] gather would not fit"
    return None


def _run_timings(device, ns, ds, dtypes, variants, only, reps, deadline, log):
    import torch

    impls = implementations(device, only)
    timer = Timer(device, reps)
    rows = []
    banks = {}
    for dtype_name, N, D in grid(ns, ds, dtypes):
        if deadline is not None and time.monotonic() > deadline:
            rows.append(dict(skipped=f"time limit reached before dtype={dtype_name} N={N} D={D}"))
            log(f"  time limit reached: stopping before {dtype_name} N={N} D={D}")
            break
        dtype = getattr(torch, DTYPE_NAMES[dtype_name])
        itemsize = torch.tensor([], dtype=dtype).element_size()
        src = torch.empty(2 * N * D, dtype=dtype, device=device)
        dst = torch.empty_like(src)
        copy_ms = timer.ms(lambda dst=dst, src=src: dst.copy_(src))  # bound now: both are deleted below
        del src, dst
        for variant in variants:
            key = (D, variant, dtype_name)
            if key not in banks:
                banks[key] = make_bank(D, variant, device, dtype)
            x, r, w, bank, index = make_inputs(N, D, variant, device, dtype, bank=banks[key])
            nbytes = 4 * N * D * itemsize + D * itemsize + _bank_bytes(bank)
            base = dict(variant=variant, N=N, D=D, dtype=dtype_name, bytes=nbytes, copy_ms=copy_ms,
                        copy_GBps=4 * N * D * itemsize / copy_ms / 1e6)
            choice = chosen_backend(device, x, bank, index) if "auto" in impls else None
            for name, fn in impls.items():
                row = dict(base, impl=name, chose=choice if name == "auto" else None)
                if name == "vllm" and bank is not None:
                    continue
                reason = _too_big_for(name, N, D, bank)
                if reason:
                    rows.append(dict(row, ms=None, skipped=reason))
                    continue
                try:
                    xi, ri = (x.clone(), r.clone()) if name == "vllm" else (x, r)
                    out, res = fn(xi, ri, w, bank, index)
                    row.update(check_case(out, res, x, r, w, bank, index))
                    del out, res
                    if not row["ok"]:
                        row.update(ms=None, error=f"output differs from the reference (max excess "
                                                  f"{row['max_excess']:.3g})")
                        log(f"  {name} {dtype_name} {variant} N={N} D={D}: WRONG {row['error']}")
                        rows.append(row)
                        continue
                    ms = timer.ms(lambda: fn(xi, ri, w, bank, index))  # noqa: F821 - runs before the del below
                except Exception as exc:  # one failing implementation must not hide the others
                    row.update(ms=None, error=f"{type(exc).__name__}: {exc}"[:300])
                    rows.append(row)
                    log(f"  {name} {dtype_name} {variant} N={N} D={D}: ERROR {row['error']}")
                    continue
                row.update(ms=ms, GBps=nbytes / ms / 1e6, frac_of_copy=copy_ms / ms * nbytes / (4 * N * D * itemsize))
                rows.append(row)
                log(f"  {name:13} {row['chose'] or '':7} {dtype_name} {variant:20} N={N:6} D={D:6} "
                    f"{ms * 1e3:9.1f} µs {row['GBps']:8.1f} GB/s {100 * row['frac_of_copy']:5.1f}% of copy")
            del x, r, w, index
    _add_ratios(rows)
    return rows


def targets(rows) -> list:
    """The issue's GPU targets, read off the timing rows of ``backend=None`` (what apply() runs)."""
    def ms(variant, N, D=4096, dtype="bf16", impl="auto"):
        for r in rows:
            if tuple(r.get(k) for k in ("impl", "variant", "N", "D", "dtype")) == (impl, variant, N, D, dtype):
                return r
        return None

    out = []
    for N in (4096, 16384):
        steer, none, low, bank = (ms(v, N) for v in ("steer", "none", "lowrank16", "bank256_mixed"))
        if steer and steer.get("ms"):
            out.append(dict(target=f"steer ≥ 90% of copy bandwidth (N={N}, D=4096, bf16)",
                            value=round(steer["frac_of_copy"], 3), met=steer["frac_of_copy"] >= 0.9))
        if steer and none and steer.get("ms") and none.get("ms"):
            out.append(dict(target=f"steer ≤ 1.02× unpatched (N={N})", value=round(steer["ms"] / none["ms"], 3),
                            met=steer["ms"] / none["ms"] <= 1.02))
        if low and none and low.get("ms") and none.get("ms"):
            out.append(dict(target=f"rank-16 ≤ 1.10× unpatched (N={N})", value=round(low["ms"] / none["ms"], 3),
                            met=low["ms"] / none["ms"] <= 1.10))
        if bank and steer and bank.get("ms") and steer.get("ms"):
            out.append(dict(target=f"256 patches in one batch ≤ 1.05× one patch (N={N})",
                            value=round(bank["ms"] / steer["ms"], 3), met=bank["ms"] / steer["ms"] <= 1.05))
    return out


def _add_ratios(rows):
    """× unpatched: each row's time over the same implementation's unpatched time at that shape."""
    base = {(r["impl"], r["dtype"], r["N"], r["D"]): r["ms"] for r in rows
            if r.get("variant") == "none" and r.get("ms")}
    for r in rows:
        b = base.get((r.get("impl"), r.get("dtype"), r.get("N"), r.get("D")))
        r["vs_unpatched"] = (r["ms"] / b) if (b and r.get("ms")) else None


# --- the other parts -------------------------------------------------------------------------------

def _subprocess(cmd, timeout, log, env=None) -> dict:
    """Run ``cmd`` with a time limit; on timeout its whole process group (ninja, nvcc, pytest
    workers) is killed, not just the direct child."""
    import signal

    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        rc = f"timeout after {timeout:.0f} s"
    tail = (text or "")[-6000:]
    log(tail)
    return dict(command=" ".join(cmd), returncode=rc, seconds=round(time.perf_counter() - start, 1), tail=tail)


def part_build(device, limit, log) -> dict:
    if device != "cuda":
        return dict(skipped="no CUDA device")
    return _subprocess([sys.executable, "-m", "fastpatch", "build", "--cuda"], limit, log)


GPU_TEST_FILES = ("tests/kernels/test_gpu_choice.py", "tests/integrations/hf/test_gpu_model.py",
                  "tests/kernels/test_gpu_kernels.py")


def part_tests(device, limit, log) -> dict:
    """The GPU tests written for real shapes and models first (65% of the limit), then every other
    gpu-marked test (each backend's grid on CUDA) in what is left."""
    start = time.monotonic()
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations=10"]
    first = _subprocess(base + list(GPU_TEST_FILES), 0.65 * limit, log)
    rest_args = [a for f in GPU_TEST_FILES for a in ("--ignore", f)]
    second = _subprocess(base + rest_args + ["tests"], max(30.0, limit - (time.monotonic() - start)), log)
    runs = [first, second]
    for run in runs:
        summary = [ln for ln in run["tail"].splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        run["summary"] = summary[-1] if summary else None
    ok = all(r["returncode"] == 0 for r in runs)
    return dict(command=" ; ".join(r["command"] for r in runs), returncode=0 if ok else 1,
                seconds=round(time.monotonic() - start, 1), summary=" | ".join(str(r["summary"]) for r in runs),
                runs=runs)


def part_bench(device, limit, out_dir, stamp, log) -> dict:
    out = out_dir / f"pytest_benchmark_gpu_{stamp}.json"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_bench_gpu.py", "-q", "-p", "no:cacheprovider",
           "--benchmark-only", f"--benchmark-json={out}", "--benchmark-group-by=group",
           "--benchmark-columns=min,median,max,rounds"]
    result = _subprocess(cmd, limit, log)
    result["json"] = str(out.relative_to(ROOT)) if out.exists() else None
    return result


def part_model(device, limit, out_dir, stamp, log, dry_run=False) -> dict:
    folder = out_dir / f"model_bench_{device}_{stamp}"
    if dry_run:
        size = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
                "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--variants", "hf_eager",
                "fastpatch_steer"]
    else:
        size = ["--dtype", "bf16", "--hidden", "2048", "--layers", "8", "--heads", "16", "--kv-heads", "8",
                "--intermediate", "5632", "--prompt-len", "256", "--new-tokens", "64", "--repeats", "3"]
    cmd = [sys.executable, "-m", "fastpatch", "bench", "--device", device, *size, "--out", str(folder),
           "--no-progress"]
    return _subprocess(cmd, limit, log)


def environment(device) -> dict:
    import torch

    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, cuda=torch.version.cuda, host=platform.node(), device_type=device)
    for name in ("triton", "transformers", "vllm"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            env[name] = None
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip() or None
    except OSError:
        env["git"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"sm_{props.major}{props.minor}",
                   memory_GiB=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count)
    else:
        env["device_name"] = f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    return env


def markdown(report) -> str:
    env = report["environment"]
    lines = [f"# fastpatch GPU check: {env.get('device_name')} ({env['date']})", "",
             f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, transformers "
             f"{env.get('transformers')}, vllm {env.get('vllm')}, git {env.get('git')}", ""]
    for part in ("build", "tests", "bench", "model"):
        p = report.get(part)
        if p:
            lines += [f"**{part}**: `{p.get('command', '')}` → {p.get('returncode', p.get('skipped'))}"
                      f" in {p.get('seconds')} s {p.get('summary') or ''}", ""]
    if report.get("targets"):
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |" for t in report["targets"]]
        lines.append("")
    timings = report.get("timings") or []
    if timings:
        lines += ["Kernel timings (median after an L2 flush; GB/s counts x, residual, out, residual_out and "
                  "the bank; % of copy: against a device copy of the same activation bytes).", "",
                  "| impl | chose | dtype | variant | N | D | µs | GB/s | % of copy | × unpatched | checked rows |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timings:
        if "impl" not in r:
            lines.append(f"| {r.get('skipped')} |||||||||||")
            continue
        head = f"| {r['impl']} | {r.get('chose') or ''} | {r['dtype']} | {r['variant']} | {r['N']} | {r['D']} |"
        if r.get("ms") is None:
            lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | | |")
            continue
        ratio = f"{r['vs_unpatched']:.3f}" if r.get("vs_unpatched") else ""
        lines.append(f"{head} {r['ms'] * 1e3:.1f} | {r['GBps']:.0f} | {100 * r['frac_of_copy']:.0f} | {ratio} | "
                     f"{r.get('rows_checked')} |")
    return "\n".join(lines) + "\n"


def write_report(report, out_dir: Path) -> Path:
    env = report["environment"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env.get("device_name") or env["device_type"]).strip("-").lower()
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_check_{slug}_{stamp}.json"
    path.write_text(json.dumps(report, indent=1))
    path.with_suffix(".md").write_text(markdown(report))
    return path


def main(argv=None) -> int:
    args = _parse(argv)
    if args.dry_run:
        # the interpreter must be on before any @triton.jit decorator runs (before fastpatch imports)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine, nothing to check (use --dry-run to exercise the script "
              "on CPU through the Triton interpreter).")
        return 0
    sys.path.insert(0, str(ROOT))
    device = "cpu" if args.dry_run else "cuda"
    ns = args.ns or ((1, 8) if args.dry_run else QUICK_NS if args.quick else NS)
    ds = args.ds or ((64,) if args.dry_run else QUICK_DS if args.quick else DS)
    scale = args.budget_s / DEFAULT_BUDGET_S
    report = dict(environment=environment(device), parts=list(args.parts), timings=[])
    env = report["environment"]
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    print(f"gpu_check on {env['device_name']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; "
          f"parts {' '.join(args.parts)}", flush=True)
    path = None
    for part in args.parts:
        limit = PART_SECONDS[part] * scale
        print(f"== {part} (limit {limit:.0f} s)", flush=True)
        if part == "build":
            report["build"] = part_build(device, limit, print)
            if report["build"].get("returncode") not in (None, 0):
                # A half-finished build must not restart (for minutes) inside a later part: the
                # parts below use the Triton backend alone.
                os.environ["FASTPATCH_CUDA_BUILD"] = "0"
                print("gpu_check: the CUDA build did not finish; later parts run without the cuda backend")
        elif part == "tests":
            report["tests"] = part_tests(device, limit, print) if not args.dry_run else dict(skipped="dry run")
        elif part == "kernels":
            report["timings"] = run_timings(device, ns, ds, args.dtypes, args.variants, only=args.impls,
                                            reps=3 if args.dry_run else args.reps,
                                            deadline=time.monotonic() + limit)
            report["targets"] = targets(report["timings"])
            for t in report["targets"]:
                print(f"  target {t['target']}: {t['value']} {'met' if t['met'] else 'NOT met'}")
        elif part == "bench":
            report["bench"] = part_bench(device, limit, args.out_dir, stamp, print) if not args.dry_run else \
                dict(skipped="dry run")
        elif part == "model":
            report["model"] = part_model(device, limit, args.out_dir, stamp, print, dry_run=args.dry_run)
        path = write_report(report, args.out_dir)  # after every part: a later timeout keeps this
    print(f"wrote {path} and {path.with_suffix('.md')}")
    failed = [p for p in ("build", "tests", "bench", "model")
              if report.get(p) and report[p].get("returncode") not in (None, 0)]
    errors = [r for r in report["timings"] if r.get("error")]
    if failed or errors:
        print(f"gpu_check: failed parts {failed}, {len(errors)} timing cases with errors")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
