"""Ahead-of-time compile of every dispatcher config for sm_80 / sm_90 (no GPU needed).

Runs scripts/triton_aot_report.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces the compiler), with the JIT's divisibility specialisation. Default CI compiles every
config the dispatcher can pick for sm_90 with bf16 activations and a bf16 bank (what ``apply()``
builds for a bf16 model) or an fp32 bank, every optional part on ("full") and none ("plain")
(~1–2 min on 2 cores); ``-m slow`` adds sm_80, fp16/fp32 activations and the unspecialised kernel.
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

ROOT = Path(__file__).resolve().parents[2]
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


def _check(proc, report, dtypes, archs, specs=("jit",)):
    assert report is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report["rows"]
    errors = [r for r in rows if r["error"]]
    assert not errors, errors[:3]
    spills = [(r["config"], r["variant"], r["dtype"], r["bank_dtype"], r["arch"], r["STACK"]) for r in rows
              if r["STACK"]]
    assert not spills, spills
    assert all(r["REG"] and r["REG"] <= 255 for r in rows)
    # every config the dispatcher can pick was compiled, for each arch, activation dtype and spec
    compiled = {(r["config"], r["arch"], r["dtype"], r["spec"]) for r in rows}
    for cfg in dispatch.all_configs():
        for arch in archs:
            for dtype in dtypes:
                for spec in specs:
                    assert (cfg.label(), arch, dtype, spec) in compiled, (cfg.label(), arch, dtype, spec)
    # fp32-dot tiles were compiled with fp32 banks only, 16-bit-dot tiles with 16-bit banks only
    for r in rows:
        if r["kernel"] == "tile":
            assert ("fp32dot" in r["config"]) == (r["bank_dtype"] == "fp32"), r
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_every_dispatcher_config_compiles_without_spills(tmp_path):
    proc, report = _run_report(tmp_path, "--arch", "90", "--mixes", "bf16/bf16", "bf16/fp32")
    _check(proc, report, ["bf16"], ["sm_90"])
    assert "| kernel | config |" in (tmp_path / "aot.md").read_text()


@pytest.mark.slow
def test_every_dtype_mix_and_arch_compiles_without_spills(tmp_path):
    proc, report = _run_report(tmp_path, "--arch", "80", "90", "--dtypes", "bf16", "fp16", "fp32")
    _check(proc, report, ["bf16", "fp16", "fp32"], ["sm_80", "sm_90"])


@pytest.mark.slow
def test_unspecialised_kernels_compile_without_spills(tmp_path):
    proc, report = _run_report(tmp_path, "--arch", "80", "90", "--spec", "none")
    _check(proc, report, ["bf16"], ["sm_80", "sm_90"], specs=("none",))
