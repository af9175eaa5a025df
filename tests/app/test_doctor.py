"""`fastpatch doctor`: sections, JSON, and a non-zero exit when something is broken."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastpatch.app import cli
from fastpatch.kernels.backends import cpp

if not cpp.is_available("cpu"):
    pytest.skip(f"cpp backend unavailable: {cpp.why_unavailable('cpu')}", allow_module_level=True)


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    """Doctor as a CPU user runs it: without TRITON_INTERPRET (conftest sets it for the triton tests),
    so the triton backend is skipped on CPU instead of self-tested in the slow interpreter
    (tests/kernels/test_selftest.py covers that one). The Triton kernels are imported first, while the
    interpreter is on: `@triton.jit` reads TRITON_INTERPRET when it runs, and kernels first decorated
    without it would fail to launch in every later test of this process."""
    import fastpatch.kernels.backends.triton_backend  # noqa: F401
    import fastpatch.kernels.triton_ops.fused_add_norm  # noqa: F401

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_doctor_subprocess_passes_here():
    done = subprocess.run([sys.executable, "-m", "fastpatch", "doctor"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))  # without TRITON_INTERPRET (fixture)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    for section in ("versions", "build caches", "backends (self-test against the float64 reference)",
                    "all checks passed"):
        assert section in text.splitlines(), (section, text)
    for line_start in ("  python ", "  torch ", "  transformers ", "  triton ", "  vllm ", "  cuda ",
                       "  TORCH_EXTENSIONS_DIR ", "  cpp     ",
                       "  cpu  cpp       ok: float32, bfloat16, float16: max error",
                       "  cpu  reference ok (the oracle)", "  backend=None on cpu: cpp"):
        assert any(line.startswith(line_start) for line in text.splitlines()), (line_start, text)
    assert "tested range >=" in text


def test_doctor_json(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["problems"] == []
    row = next(r for r in rep["backends"] if r["backend"] == "cpp" and r["device"] == "cpu")
    assert row["available"] and row["expected"] and row["selftest"]["ok"]
    assert 0 <= row["selftest"]["max_error"] <= row["selftest"]["tolerance"]
    assert rep["caches"]["cpp"] == str(cpp.build_directory())
    assert rep["vllm"]["tested_range"]


def test_doctor_fails_on_a_wrong_kernel(monkeypatch, capsys):
    real = cpp.run

    def wrong(*args, **kwargs):
        out, res = real(*args, **kwargs)
        out += 1e-2
        return out, res

    monkeypatch.setattr(cpp, "run", wrong)
    assert cli.main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert "cpu  cpp       SELF-TEST FAILED: float32, bfloat16, float16: max error 0.01 vs tolerance" in text
    assert "1 problem(s):" in text and "cpp on cpu failed its self-test" in text
    assert "backend=None on cpu: reference (slow)" in text


def test_doctor_fails_when_the_cpp_build_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(cpp, "why_unavailable", lambda device: "RuntimeError: Ninja is required to load C++ extensions")
    assert cli.main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert "cpu  cpp       UNAVAILABLE: RuntimeError: Ninja is required" in text
    assert "fix: install ninja (`pip install ninja`)" in text
    assert "cpp on cpu is unavailable" in text


def test_doctor_fails_on_a_vllm_outside_the_tested_range(monkeypatch, capsys):
    from fastpatch.integrations.vllm import compat

    monkeypatch.setattr(compat, "installed_version", lambda: "0.1.0")
    assert cli.main(["doctor"]) == 1
    text = capsys.readouterr().out
    assert "0.1.0 (OUTSIDE the tested range)" in text
    assert "vLLM 0.1.0 is outside the tested range" in text
