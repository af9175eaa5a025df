"""`fastpatch bench` end to end on a tiny model: every variant timed, files written, table printed."""
import json

from fastpatch.app.cli import main

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vocab", "256", "--batch", "3", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "2",
        "--no-progress"]


def test_bench_runs_all_variants_and_writes_files(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names == ["hf_eager", "hf_hooks_steer", "fastpatch_unpatched", "fastpatch_steer",
                     "fastpatch_lowrank16", "fastpatch_gated", "fastpatch_bank8_mixed"]
    for row in result["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
        assert row["decode_vs_hf_eager"] > 0
    assert result["rows"][0]["decode_vs_hf_eager"] == 1.0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "fastpatch_bank8_mixed" in printed and "decode / HF eager" in printed


def test_bench_variant_subset(tmp_path):
    assert main(["bench", *TINY, "--out", str(tmp_path), "--variants", "hf_eager", "fastpatch_steer"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["hf_eager", "fastpatch_steer"]
