"""Ahead-of-time compile of every dispatcher config for sm_80 / sm_90 (no GPU needed).

Runs scripts/triton_aot_report.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces the compiler). Default CI compiles every config the dispatcher can pick, in bf16, with
every optional part on ("full") and with none ("plain"), for both architectures (~1 min on 2
cores); ``-m slow`` adds fp32 and fp16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from fastpatch.kernels.triton_ops import dispatch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "triton_aot_report.py"


def _run_report(tmp_path, *extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--markdown", str(tmp_path / "aot.md"),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if "cuobjdump" in proc.stderr and "No such file" in proc.stderr:  # pragma: no cover
        pytest.skip("the triton wheel ships no cuobjdump here")
    return proc, json.loads(out.read_text()) if out.exists() else None


def _check(proc, report, dtypes):
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report["rows"]
    errors = [r for r in rows if r["error"]]
    assert not errors, errors[:3]
    spills = [(r["config"], r["variant"], r["dtype"], r["arch"], r["STACK"]) for r in rows if r["STACK"]]
    assert not spills, spills
    assert all(r["REG"] and r["REG"] <= 255 for r in rows)
    # every config the dispatcher can pick was compiled, for each arch and dtype
    compiled = {(r["config"], r["arch"], r["dtype"]) for r in rows}
    for cfg in dispatch.all_configs():
        for arch in ("sm_80", "sm_90"):
            for dtype in dtypes:
                assert (cfg.label(), arch, dtype) in compiled, (cfg.label(), arch, dtype)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_every_dispatcher_config_compiles_without_spills(tmp_path):
    proc, report = _run_report(tmp_path)
    _check(proc, report, ["bf16"])
    assert "| kernel | config |" in (tmp_path / "aot.md").read_text()


@pytest.mark.slow
def test_fp32_and_fp16_configs_compile_without_spills(tmp_path):
    proc, report = _run_report(tmp_path, "--dtypes", "fp32", "fp16")
    _check(proc, report, ["fp32", "fp16"])
