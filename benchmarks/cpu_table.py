"""Run the CPU kernel suite (benchmarks/test_cpu_kernels.py) and/or render its pytest-benchmark JSON as
a markdown table with every variant's time relative to vLLM's fused_add_rms_norm kernel.

    python benchmarks/cpu_table.py --run                  # run the suite, write results/cpu_kernels_<UTC date>.*
    python benchmarks/cpu_table.py --run -- -k 1x576      # extra pytest arguments after --
    python benchmarks/cpu_table.py results/cpu_kernels_X.json [--stat min]   # render a saved run

Targets (issue 13): the public op with a steer <= 1.0x vLLM's unpatched kernel in every group, with a
rank-16 patch <= 1.5x. Compare two saved runs with pytest-benchmark itself:
    python -m pytest benchmarks/test_cpu_kernels.py --benchmark-only --benchmark-compare=<old.json>
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ("fastpatch[none]", "fastpatch[steer]", "fastpatch[rank16]", "cpp_backend[steer]",
           "cpp_backend[rank16]", "torch_ops[none]", "torch_ops[steer]", "hf_hook[steer]",
           # SAE feature clamps (fastpatch.sae, #17 item 5): Encoded of rank 1 / 8 / 32
           "fastpatch[sae1]", "fastpatch[sae8]", "fastpatch[sae32]", "torch_ops[sae8]")
TARGETS = {"fastpatch[steer]": 1.0, "fastpatch[rank16]": 1.5}


def run_suite(json_path: Path, pytest_args: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_cpu_kernels.py"), "--benchmark-only", "-q",
           "-p", "no:cacheprovider", f"--benchmark-json={json_path}", *pytest_args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=HERE.parent)


def strip_rounds(json_path: Path) -> None:
    """Drop the per-round timings pytest-benchmark stores (MBs per run); the summary statistics stay,
    which is all the table and --benchmark-compare read."""
    data = json.loads(json_path.read_text())
    for b in data["benchmarks"]:
        b["stats"].pop("data", None)
    json_path.write_text(json.dumps(data, indent=1) + "\n")


def _group_key(group: str):
    shape, dtype, threads = group.split()
    n, d = shape.split("x")
    return dtype, int(threads[1:]), int(d), int(n)


def render(data: dict, stat: str = "median") -> str:
    rows: dict[str, dict[str, float]] = {}
    loads = []
    for b in data["benchmarks"]:
        rows.setdefault(b["group"], {})[b["name"]] = b["stats"][stat]
        if "loadavg" in b.get("extra_info", {}):
            loads.append(float(b["extra_info"]["loadavg"]))
    m = data.get("machine_info", {})
    cpu = m.get("cpu", {}).get("brand_raw", "?")
    versions = next((b["extra_info"].get("versions") for b in data["benchmarks"]
                     if "versions" in b.get("extra_info", {})), "")
    lines = [
        "# CPU kernel suite: fused add + patch + RMSNorm vs vLLM's `fused_add_rms_norm`",
        "",
        f"Run {data.get('datetime', '?')} on {cpu} ({m.get('cpu', {}).get('count', '?')} logical CPUs), "
        f"python {m.get('python_version', '?')}, {versions}. "
        + (f"1-minute load average during the run: {min(loads):.2f}–{max(loads):.2f}." if loads else ""),
        "",
        f"Per-call **{stat}** in µs (pytest-benchmark), and in brackets the ratio to vLLM's unpatched kernel "
        "in the same group. fastpatch = the public op `fastpatch.fused_add_norm` in place (`out=x, "
        "residual_out=residual`, as vLLM's kernel); cpp_backend = the kernel's binding without the public "
        "op's checks; torch_ops = `x + r`, patch, `F.rms_norm`; hf_hook = the residual add in a module with "
        "a forward hook that applies the patch, then transformers' `LlamaRMSNorm`. "
        "Targets: fastpatch[steer] ≤ 1.0×, fastpatch[rank16] ≤ 1.5× (✓/✗).",
        "",
        "| group | vllm | " + " | ".join(COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(COLUMNS),
    ]
    misses = []
    for group in sorted(rows, key=_group_key):
        r = rows[group]
        base = r.get("vllm[none]")
        cells = [f"{base * 1e6:.2f}" if base else "—"]
        for col in COLUMNS:
            t = r.get(col)
            if t is None:
                cells.append("—")
                continue
            cell = f"{t * 1e6:.2f}"
            if base:
                ratio = t / base
                mark = ""
                if col in TARGETS:
                    ok = ratio <= TARGETS[col]
                    mark = " ✓" if ok else " ✗"
                    if not ok:
                        misses.append(f"{group} {col} {ratio:.2f}×")
                cell += f" ({ratio:.2f}×{mark})"
            cells.append(cell)
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines += ["", "Targets missed: " + ("; ".join(misses) if misses else "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", type=Path, help="a saved pytest-benchmark JSON to render")
    ap.add_argument("--run", action="store_true", help="run the suite first (JSON + markdown under results/)")
    ap.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    ap.add_argument("--out", type=Path, help="markdown path (default: the JSON path with .md)")
    args = ap.parse_args(argv)
    if args.run:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H%M")
        args.json = args.json or RESULTS / f"cpu_kernels_{stamp}.json"
        rc = run_suite(args.json, extra)
        if rc != 0:
            print(f"pytest exited with {rc}", file=sys.stderr)
            if not args.json.exists():
                return rc
        strip_rounds(args.json)
    if args.json is None:
        ap.error("give a JSON file or --run")
    md = render(json.loads(args.json.read_text()), args.stat)
    out = args.out or args.json.with_suffix(".md")
    out.write_text(md)
    print(md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
