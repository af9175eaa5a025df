#!/usr/bin/env python
"""One command for a machine with a CUDA GPU: correctness tests, kernel timings, model benchmark.

    python benchmarks/gpu_check.py                 # everything; exits 0 with a message without a GPU
    python benchmarks/gpu_check.py --skip-tests    # timings only
    python benchmarks/gpu_check.py --dry-run       # tiny grid on CPU through the Triton interpreter

Steps:
1. ``pytest -m "gpu or not slow" tests`` (every GPU backend against the reference).
2. Kernel timings, bf16, N × D grid, for every backend in ``fastpatch.kernels.backends.available("cuda")``
   (new backends are picked up automatically) plus ``torch_unfused`` (the same maths as separate
   torch ops, HF style); patch variants: none / steer / rank-16 low-rank / gated steer / a 64-patch
   steering bank with a mixed per-row index. Roof: a device ``copy_`` moving the same bytes
   (8·N·D: read x and residual, write out and residual_out, 2 bytes each).
3. ``python -m fastpatch bench --device cuda`` when that command exists.
Writes ``benchmarks/results/gpu_check_<device>_<date>.json`` and a ``.md`` table next to it.
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
NS = (1, 8, 64, 512, 4096, 16384)
DS = (2048, 4096, 8192)
VARIANTS = ("none", "steer", "lowrank16", "gated", "bank64_mixed")
REFERENCE_MAX_ELEMENTS = 1 << 24  # the float64 reference gathers [N, R, D]: keep it to small shapes


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny grid on CPU through the Triton interpreter (checks this script's logic)")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--skip-model-bench", action="store_true")
    ap.add_argument("--backends", nargs="+", help="only these backends (default: all available + torch_unfused)")
    ap.add_argument("--ns", type=int, nargs="+")
    ap.add_argument("--ds", type=int, nargs="+")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return ap.parse_args(argv)


# --- cases -----------------------------------------------------------------------------------------

def make_bank(D, variant, device, dtype, seed=0):
    """The PatchBank a timing variant uses (None for "none")."""
    import torch

    import fastpatch as fp

    gen = torch.Generator().manual_seed(seed * 7919 + D)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if variant == "none":
        return None
    if variant == "steer":
        bank = fp.PatchBank([fp.Steer(randn(D), scale=0.5)], D)
    elif variant == "lowrank16":
        bank = fp.PatchBank([fp.LowRank(randn(D, 16) / D**0.5, randn(16, D) / 4, bias=randn(16) * 0.1)], D)
    elif variant == "gated":
        bank = fp.PatchBank([fp.Gated(fp.Steer(randn(D), scale=0.5), randn(D), 0.0, metric="cosine")], D)
    elif variant == "bank64_mixed":
        bank = fp.PatchBank([fp.Steer(randn(D), scale=0.5) for _ in range(64)], D)
    else:
        raise ValueError(variant)
    return bank.to(device, dtype)


def make_inputs(N, D, variant, device, dtype, bank=None):
    """(x, residual, weight, bank, index) for one timing case; random data made on the device
    (16384 × 8192 float64 on the host would take seconds per case)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(N * 31 + D)
    x = torch.randn(N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    r = torch.randn(N, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=gen, device=device, dtype=torch.float32)).to(dtype)
    if bank is None:
        bank = make_bank(D, variant, device, dtype)
    index = None
    if variant == "bank64_mixed":
        index = torch.randint(-1, 64, (N,), generator=gen, device=device)
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


# --- timing ----------------------------------------------------------------------------------------

def bench_ms(fn, device, reps):
    """Median milliseconds per call: triton.testing.do_bench on CUDA, wall clock on CPU."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100))
        except Exception:
            import torch

            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def implementations(device, only=None):
    """name -> callable(x, r, w, bank, index): every available fastpatch backend plus torch_unfused."""
    import fastpatch as fp
    from fastpatch.kernels import backends

    names = list(backends.available(device))
    if "triton" not in names:  # CPU preference lists omit triton; the dry run still exercises it
        try:
            if backends.load("triton").is_available(device):
                names.append("triton")
        except ImportError:
            pass
    impls = {}
    for name in names:
        impls[name] = (lambda nm: lambda x, r, w, bank, index: fp.fused_add_norm(
            x, r, w, bank=bank, index=index, backend=nm))(name)
    impls["torch_unfused"] = torch_unfused
    if only:
        impls = {k: v for k, v in impls.items() if k in only}
    return impls


def run_timings(device, ns, ds, variants, only=None, reps=20, log=print):
    import fastpatch as fp

    # The index check syncs the host: not part of the kernel. Restored afterwards so a caller in
    # the same process (the test suite) keeps its checks.
    saved = fp.config.check_index_values
    fp.config.check_index_values = False
    try:
        return _run_timings(device, ns, ds, variants, only, reps, log)
    finally:
        fp.config.check_index_values = saved


def _run_timings(device, ns, ds, variants, only, reps, log):
    import torch

    dtype = torch.bfloat16
    impls = implementations(device, only)
    rows = []
    for D in ds:
        banks = {v: make_bank(D, v, device, dtype) for v in variants}
        for N in ns:
            cases = {v: make_inputs(N, D, v, device, dtype, bank=banks[v]) for v in variants}
            src = torch.empty(2 * N * D, dtype=dtype, device=device)
            dst = torch.empty_like(src)
            copy_ms = bench_ms(lambda: dst.copy_(src), device, reps)
            nbytes = 8 * N * D
            for name, fn in impls.items():
                base_ms = None
                for variant in variants:
                    x, r, w, bank, index = cases[variant]
                    row = dict(backend=name, variant=variant, N=N, D=D, dtype="bf16", bytes=nbytes,
                               copy_ms=copy_ms, roof_GBps=nbytes / copy_ms / 1e6)
                    if name == "reference" and N * D * 16 > REFERENCE_MAX_ELEMENTS:  # rank-16 gather
                        row.update(ms=None, skipped="reference: shape too large for the float64 oracle")
                        rows.append(row)
                        continue
                    try:
                        ms = bench_ms(lambda: fn(x, r, w, bank, index), device, reps)
                    except Exception as exc:  # one failing backend must not hide the others
                        row.update(ms=None, error=f"{type(exc).__name__}: {exc}"[:300])
                        rows.append(row)
                        log(f"  {name} {variant} N={N} D={D}: ERROR {row['error']}")
                        continue
                    if variant == "none":
                        base_ms = ms
                    row.update(ms=ms, GBps=nbytes / ms / 1e6, frac_of_roof=copy_ms / ms,
                               vs_unpatched=(ms / base_ms) if base_ms else None)
                    rows.append(row)
                    log(f"  {name:14} {variant:13} N={N:6} D={D:5} {ms * 1e3:9.1f} µs  "
                        f"{row['GBps']:8.1f} GB/s  {100 * row['frac_of_roof']:5.1f}% of copy")
            del cases, src, dst
    return rows


# --- steps -----------------------------------------------------------------------------------------

def run_tests(log=print) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or not slow", "-q", "-p", "no:cacheprovider", "tests"]
    log("$ " + " ".join(cmd))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr)[-4000:]
    log(tail)
    summary = [ln for ln in tail.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return dict(command=" ".join(cmd), returncode=proc.returncode, seconds=round(time.perf_counter() - start, 1),
                summary=summary[-1] if summary else None, tail=tail)


def model_bench_available() -> bool:
    proc = subprocess.run([sys.executable, "-m", "fastpatch", "bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    return proc.returncode == 0


def run_model_bench(device, out_dir: Path, log=print) -> dict:
    if not model_bench_available():
        log("python -m fastpatch bench: not available here, skipped")
        return dict(skipped="python -m fastpatch bench is not available")
    cmd = [sys.executable, "-m", "fastpatch", "bench", "--device", device, "--out", str(out_dir)]
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    out = (proc.stdout + proc.stderr)[-8000:]
    log(out)
    return dict(command=" ".join(cmd), returncode=proc.returncode, output_tail=out)


def environment(device) -> dict:
    import torch

    env = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
               torch=torch.__version__, cuda=torch.version.cuda, host=platform.node(), device_type=device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
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
             f"torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}", ""]
    if report.get("tests"):
        lines += [f"Tests: `{report['tests']['command']}` → rc {report['tests']['returncode']}, "
                  f"{report['tests']['summary']}", ""]
    lines += ["| backend | variant | N | D | µs | GB/s | % of copy roof | × unpatched |", "|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        if r.get("ms") is None:
            lines.append(f"| {r['backend']} | {r['variant']} | {r['N']} | {r['D']} | "
                         f"{r.get('error') or r.get('skipped')} | | | |")
            continue
        ratio = f"{r['vs_unpatched']:.2f}" if r.get("vs_unpatched") else ""
        lines.append(f"| {r['backend']} | {r['variant']} | {r['N']} | {r['D']} | {r['ms'] * 1e3:.1f} | "
                     f"{r['GBps']:.0f} | {100 * r['frac_of_roof']:.0f} | {ratio} |")
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
    ns = args.ns or ((1, 8) if args.dry_run else NS)
    ds = args.ds or ((64,) if args.dry_run else DS)
    report = dict(environment=environment(device), tests=None, timings=[], model_bench=None)
    print(f"gpu_check on {report['environment']['device_name']}: torch {report['environment']['torch']}, "
          f"triton {report['environment']['triton']}, CUDA {report['environment']['cuda']}")
    if not args.skip_tests:
        report["tests"] = run_tests()
    report["timings"] = run_timings(device, ns, ds, args.variants, only=args.backends,
                                    reps=3 if args.dry_run else 20)
    if not args.skip_model_bench:
        stamp = report["environment"]["date"][:19].replace(":", "").replace("-", "")
        report["model_bench"] = run_model_bench(device, args.out_dir / f"model_bench_{device}_{stamp}")
    path = write_report(report, args.out_dir)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    failed = report["tests"] is not None and report["tests"]["returncode"] != 0
    errors = [r for r in report["timings"] if r.get("error")]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
