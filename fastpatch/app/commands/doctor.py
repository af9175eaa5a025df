"""`fastpatch doctor`: versions, backends per device and why not, build caches, the vLLM range, and a
self-test of every available backend against the float64 reference."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

NAME = "doctor"
HELP = "check this installation: versions, backends per device, build caches, a self-test of each kernel"
DESCRIPTION = """\
Check what fastpatch can run here and whether it computes the right thing:

  - versions: Python, fastpatch, torch (and its CUDA), transformers, triton, vLLM, the GPU and driver
  - each backend's availability per device (cpu, and cuda when a GPU is visible) and, if not, why
    and the fix
  - where compiled kernels are cached (torch's extension folder: $TORCH_EXTENSIONS_DIR or torch's
    default) and triton's cache
  - the vLLM releases the plugin is tested with and whether the installed one is among them
  - a self-test of every available backend against the float64 reference (the same test a process
    runs on a backend's first use; every gate mode, an indexed bank with -1 rows, RMS and Layer
    norm, float32/bfloat16/float16), with the max errors

Exit status 1 when something is broken: a backend this machine should have (cpp on CPU; cuda and
triton with a GPU) is unavailable, a self-test disagrees with the reference, or the installed vLLM
is outside the tested range. The CUDA backend is built if it is not cached yet (minutes; --no-build
reports it as not built instead).

example:
  fastpatch doctor
  fastpatch doctor --json > doctor.json
"""


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--no-build", action="store_true",
                   help="do not compile a backend that has no cached build (report it as not built)")


# --- facts ------------------------------------------------------------------------------------------

def _dist_version(name: str):
    """An installed distribution's version without importing it (transformers takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _command_output(argv, timeout=10.0) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _vllm() -> dict:
    from fastpatch.integrations.vllm import compat

    installed = compat.installed_version()
    info = {"tested_range": compat.TESTED_RANGE, "installed": installed, "in_range": None}
    if installed is not None:
        in_range = getattr(compat, "in_range", None)
        if in_range is not None:
            info["in_range"] = bool(in_range(installed))
        else:
            try:
                from packaging.specifiers import SpecifierSet

                info["in_range"] = SpecifierSet(compat.TESTED_RANGE).contains(installed, prereleases=True)
            except ImportError:  # packaging missing: say so rather than guess
                info["in_range"] = None
    return info


def _versions() -> dict:
    import torch

    import fastpatch

    cuda = {"torch_cuda": torch.version.cuda, "available": bool(torch.cuda.is_available()), "devices": []}
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda["devices"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                    "memory_gib": round(props.total_memory / 2**30, 1)})
        smi = shutil.which("nvidia-smi")
        driver = _command_output([smi, "--query-gpu=driver_version", "--format=csv,noheader"]) if smi else ""
        cuda["driver"] = driver.splitlines()[0] if driver else None
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    ninja = shutil.which("ninja")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else shutil.which("nvcc")
    return {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "fastpatch": fastpatch.__version__,
        "torch": torch.__version__,
        "transformers": _dist_version("transformers"),
        "triton": _dist_version("triton"),
        "vllm": _vllm()["installed"],
        "cuda": cuda,
        "toolchain": {
            "c++": (shutil.which(cxx)
                    and f"{shutil.which(cxx)} ({(_command_output([cxx, '--version']).splitlines() or ['?'])[0]})"),
            "ninja": ninja and f"{ninja} ({_command_output([ninja, '--version']) or '?'})",
            "nvcc": nvcc if nvcc and os.path.exists(nvcc) else None,
        },
    }


def _caches() -> dict:
    from fastpatch.kernels.backends import cpp, cuda

    triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR"),
        "cpp": str(cpp.build_directory()),
        "cuda": str(cuda.build_directory()),
        "cuda_cached": bool(cuda.is_cached()),
        "triton": triton_dir,
    }


def _devices() -> list:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _expected(name: str, device: str) -> bool:
    """Whether a working install should have ``name`` on ``device``: cpp on CPU; cuda and triton on a GPU
    (cuda not when FASTPATCH_CUDA_BUILD=0 forbids building and nothing is cached: the user chose that)."""
    if device == "cpu":
        return name == "cpp"
    if name == "cuda" and os.environ.get("FASTPATCH_CUDA_BUILD", "1") == "0":
        from fastpatch.kernels.backends import cuda

        return cuda.is_cached()
    return name in ("cuda", "triton")


def _backends(no_build: bool) -> list:
    import torch

    from fastpatch.kernels import backends
    from fastpatch.kernels.backends import selftest

    rows = []
    for device in _devices():
        dev = torch.device(device)
        for name in backends.BACKENDS:
            row = {"device": device, "backend": name, "expected": _expected(name, device), "available": False,
                   "why_not": "", "fix": "", "selftest": None}
            try:
                module = backends.load(name)
                if name == "cuda" and no_build and device == "cuda" and not module.is_cached() \
                        and not module.environment_problem(dev):
                    why = "not built yet (--no-build)"
                else:
                    why = getattr(module, "why_unavailable", lambda d: "available")(dev)
            except ImportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            why = " ".join(str(why).split())
            if why == "available":
                row["available"] = True
            else:
                row["why_not"], row["fix"] = why, selftest.fix_for(name, why)
            if row["available"] and name != "reference":  # the reference is the oracle itself
                result = selftest.run(name, module, dev)
                row["selftest"] = {"ok": result.ok, "max_error": result.max_error, "tolerance": result.tolerance,
                                   "worst": result.worst, "error": result.error, "seconds": round(result.seconds, 3),
                                   "cases": result.cases, "summary": result.describe()}
                if not result.ok:
                    row["fix"] = selftest.refused_fix(name)
            if name == "triton" and device == "cpu" and not row["available"]:
                continue  # the interpreter is for tests; a CPU user is not missing anything
            if name == "cuda" and device == "cpu":
                continue
            rows.append(row)
    return rows


def _chosen(rows) -> dict:
    """What backend=None would run per device, given these rows (the preference order of resolve)."""
    from fastpatch.kernels import backends

    chosen = {}
    for device in {r["device"] for r in rows}:
        good = [r["backend"] for r in rows if r["device"] == device and r["available"]
                and (r["selftest"] is None or r["selftest"]["ok"])]
        order = backends._PREFERENCE.get(device, ("reference",))
        if device == "cuda":
            gpu = [n for n in order if n in good and n != "reference"]
            chosen[device] = f"per-shape choice of {' and '.join(gpu)}" if gpu else "reference (slow)"
        else:
            first = next((n for n in order if n in good), "reference")
            chosen[device] = first + (" (slow)" if first == "reference" else "")
    return chosen


def report(no_build: bool = False) -> dict:
    """Everything doctor checks, as a dict (what --json prints)."""
    rows = _backends(no_build)
    vllm = _vllm()
    problems = []
    for r in rows:
        where = f"{r['backend']} on {r['device']}"
        if r["expected"] and not r["available"]:
            problems.append(f"{where} is unavailable: {r['why_not']} (fix: {r['fix']})")
        if r["selftest"] is not None and not r["selftest"]["ok"]:
            problems.append(f"{where} failed its self-test ({r['selftest']['summary']}); fix: {r['fix']}")
    if vllm["installed"] is not None and vllm["in_range"] is False:
        problems.append(f"vLLM {vllm['installed']} is outside the tested range {vllm['tested_range']} "
                        f"(fix: pip install 'vllm{vllm['tested_range']}')")
    return {"versions": _versions(), "caches": _caches(), "vllm": vllm, "backends": rows,
            "backend_none": _chosen(rows), "selftest_env": os.environ.get("FASTPATCH_SELFTEST"),
            "problems": problems, "ok": not problems}


# --- text ---------------------------------------------------------------------------------------------

def _text(rep: dict) -> str:
    v, c, lines = rep["versions"], rep["caches"], []
    add = lines.append
    add("versions")
    for key in ("python", "platform", "fastpatch", "torch", "transformers", "triton"):
        add(f"  {key:<13}{v[key] or 'not installed'}")
    vl = rep["vllm"]
    state = ("not installed (only the vLLM plugin needs it)" if vl["installed"] is None else
             vl["installed"] + {True: " (in the tested range)", False: " (OUTSIDE the tested range)",
                                None: " (range not checked: the packaging module is missing)"}[vl["in_range"]])
    add(f"  {'vllm':<13}{state}; tested range {vl['tested_range']}")
    cu = v["cuda"]
    if cu["available"]:
        gpus = "; ".join(f"cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB)"
                         for d in cu["devices"])
        add(f"  {'cuda':<13}torch CUDA {cu['torch_cuda']}, driver {cu.get('driver') or 'unknown'}; {gpus}")
    else:
        add(f"  {'cuda':<13}" + (f"torch CUDA {cu['torch_cuda']}, but no GPU is visible" if cu["torch_cuda"]
                                 else "none (a CPU build of torch)"))
    for key, value in v["toolchain"].items():
        add(f"  {key:<13}{value or 'not found'}")
    add("")
    add("build caches")
    add(f"  TORCH_EXTENSIONS_DIR  {c['TORCH_EXTENSIONS_DIR'] or '(unset: torch default)'}")
    add(f"  cpp     {c['cpp']}")
    add(f"  cuda    {c['cuda']}" + (" (cached)" if c["cuda_cached"] else " (not built)"))
    add(f"  triton  {c['triton']}")
    add("")
    add("backends (self-test against the float64 reference)")
    for r in rep["backends"]:
        head = f"  {r['device']:<5}{r['backend']:<10}"
        if not r["available"]:
            add(f"{head}{'UNAVAILABLE' if r['expected'] else 'unavailable'}: {r['why_not']}")
            add(f"  {'':<15}fix: {r['fix']}")
        elif r["selftest"] is None:
            add(f"{head}ok (the oracle)")
        else:
            st = r["selftest"]
            add(f"{head}{'ok' if st['ok'] else 'SELF-TEST FAILED'}: {st['summary']}")
            if not st["ok"]:
                add(f"  {'':<15}fix: {r['fix']}")
    for device, name in sorted(rep["backend_none"].items()):
        add(f"  backend=None on {device}: {name}")
    if rep["selftest_env"] is not None:
        add(f"  FASTPATCH_SELFTEST={rep['selftest_env']}")
    add("")
    if rep["problems"]:
        add(f"{len(rep['problems'])} problem(s):")
        lines.extend(f"  - {p}" for p in rep["problems"])
    else:
        add("all checks passed")
    return "\n".join(lines)


def run(args) -> int:
    rep = report(no_build=args.no_build)
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print(_text(rep))
    return 0 if rep["ok"] else 1
