"""`fastpatch bench` end to end on a tiny model: every variant timed, files written, table printed."""
import copy
import json
import sys

import pytest
import torch

import fastpatch
from fastpatch.app import model_bench
from fastpatch.app.cli import main
from fastpatch.app.model_bench import BenchConfig, run_bench
from models import tiny_model

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vocab", "256", "--batch", "3", "--prompt-len", "8", "--new-tokens", "3", "--decode-block", "2",
        "--repeats", "2", "--quiet"]


def test_bench_runs_all_variants_and_writes_files(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [r["variant"] for r in result["rows"]]
    assert names == ["hf_eager", "hf_hooks_steer", "fastpatch_unpatched", "fastpatch_steer",
                     "fastpatch_lowrank16", "fastpatch_gated", "fastpatch_bank8_mixed"]
    for row in result["rows"]:
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0
        assert row["samples"] == {"prefill": 2, "decode": 3}  # decode blocks of 2 + 1 steps
        assert row["decode_vs_hf_eager"] > 0
    assert result["rows"][0]["decode_vs_hf_eager"] == 1.0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "fastpatch_bank8_mixed" in printed and "decode / HF eager" in printed


def test_bench_without_matplotlib_skips_the_plot_and_exits_0(tmp_path, monkeypatch, capsys):
    """A plain `pip install fastpatch` has no matplotlib: the JSON and markdown are written, the PNG is
    skipped with one line saying how to get it, and the exit code is 0. Also: a subset of variants."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    assert main(["bench", *TINY, "--out", str(tmp_path), "--variants", "hf_eager", "fastpatch_steer"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["hf_eager", "fastpatch_steer"]
    assert (tmp_path / "bench.md").read_text().startswith("fastpatch bench")
    assert not (tmp_path / "bench.png").exists()
    captured = capsys.readouterr()
    assert "bench.png" not in captured.out
    skip = [line for line in captured.err.splitlines() if "bench.png" in line]
    assert len(skip) == 1 and "matplotlib is not installed" in skip[0] and "pip install 'fastpatch[plot]'" in skip[0]


def _tiny_cfg(**kw):
    return BenchConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128, batch=3,
                       prompt_len=8, new_tokens=2, repeats=1, **kw)


def test_bench_reuses_one_model_and_leaves_it_unpatched(monkeypatch):
    """No copy of the model (copy.deepcopy of a module fails the test); every variant runs on the
    caller's model, whose parameters keep their storage and whose output is bit-for-bit the same after."""
    real_deepcopy = copy.deepcopy

    def no_module_copies(obj, *a, **k):
        assert not isinstance(obj, torch.nn.Module), "the benchmark copied the model"
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", no_module_copies)
    model = tiny_model("llama")
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patched = []
    real_apply = fastpatch.apply
    monkeypatch.setattr(fastpatch, "apply", lambda m, *a, **k: patched.append(m) or real_apply(m, *a, **k))
    result = run_bench(_tiny_cfg(), progress=False, model=model)
    assert len(result["rows"]) == 7
    assert patched and all(m is model for m in patched)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == storage
    assert getattr(model, "_fastpatch_handle", None) is None or not model._fastpatch_handle.active
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_bench_stops_on_a_variant_that_does_not_restore_the_model(monkeypatch):
    real_variants = model_bench._variants

    def with_a_leaky_variant(*a, **k):
        def leak(m, verify):  # changes a weight and returns no handle: nothing can undo it
            with torch.no_grad():
                m.model.norm.weight.mul_(1.5)
            return None

        return {**real_variants(*a, **k), "fastpatch_gated": leak}  # in place of a real variant

    monkeypatch.setattr(model_bench, "_variants", with_a_leaky_variant)
    with pytest.raises(RuntimeError, match="after removing 'fastpatch_gated'"):
        run_bench(_tiny_cfg(variants=["hf_eager", "fastpatch_gated", "fastpatch_steer"]), progress=False,
                  model=tiny_model("llama"))


def test_bench_errors_are_one_line(tmp_path, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path), "--variants", "hf_eager", "fastpatch_stir"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown variant(s) fastpatch_stir" in err and "fastpatch_steer" in err
    if not torch.cuda.is_available():
        assert main(["bench", *TINY, "--out", str(tmp_path), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no CUDA GPU" in err
