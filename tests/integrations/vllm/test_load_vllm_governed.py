"""benchmarks/load_vllm_governed.py with small counts (slow: two `vllm serve` replicas on a real PostgreSQL store).

The script's own checks are the oracle here: every response's tokens against Hugging Face + fastpatch.apply of
the stored file of the version it reports, every (version, arm) against a replay of the store's audit log and
the key's sha256 bucket, and /metrics against the responses. This test runs it and reads its JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_common import vllm_or_skip

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_load_script_small(tmp_path, pg_server):  # pg_server: skips (with the reason) without PostgreSQL
    vllm_or_skip()
    out = tmp_path / "load"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_vllm_governed.py"), "--clients", "4",
                           "--canary-keys", "60", "--phase", "15", "--warm", "10", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["passed"] and res["failed"] == 0 and res["ok"] == res["requests"] > 0
    assert res["wrong_version_or_arm"] == 0 and res["token_mismatches"] == 0 and res["metrics_match_responses"]
    assert [a["action"] for a in res["actions"]][-4:] == [
        "promote tone", "abort style", "expire safety@1.1.0 (the canary)", "expire tone@1.1.0 (the stable version)"]
    # Every kind of outcome was served and checked: canary, promoted, fallback from an expired canary, unpatched.
    served = res["served"]
    assert any(k.endswith("(canary)") for k in served) and "tone@1.1.0 (control)" in served
    assert "safety@1.0.0 (fallback)" in served or res["canary_keys_per_set"].get("safety", 0) < 20
    assert "tone@none (control)" in served
    # /metrics at the end says where each set's keys go, expiries included (expected from the actions above: tone's
    # stable version expired -> none; safety's 10 % canary expired -> its keys fall back to 1.0.0; style aborted).
    for lines in res["metrics_fastpatch_lines"].values():
        active = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines
                  if ln.startswith("fastpatch_active_version")}
        assert active == {'fastpatch_active_version{arm="control",set="tone",version="none"}': 100.0,
                          'fastpatch_active_version{arm="control",set="style",version="1.0.0"}': 100.0,
                          'fastpatch_active_version{arm="control",set="safety",version="1.0.0"}': 90.0,
                          'fastpatch_active_version{arm="fallback",set="safety",version="1.0.0"}': 10.0}
        loaded = sorted(ln.split("{", 1)[1].split("}")[0] for ln in lines if ln.startswith("fastpatch_version_loaded"))
        assert loaded == ['patch="p",set="safety",version="1.0.0"', 'patch="p",set="style",version="1.0.0"']
