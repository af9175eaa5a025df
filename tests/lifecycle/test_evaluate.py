"""fastpatch.evaluate: effect on the target metric and neutral KL against direct computation."""
import json

import pytest
import torch

import fastpatch
from fastpatch.lifecycle.evaluation import evaluate, patch_direction

from models import tiny_model


def _prompts(n, seed, lo=2, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _v(seed=0, d=64, norm=3.0):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def test_steer_projection_effect_is_exact(llama):
    # A steer at resid_post read at that same site moves every row's projection by exactly |v|.
    v = _v()
    site = "layers.0.resid_post"
    rep = evaluate(llama, None, {site: fastpatch.Steer(v, 2.0)}, _prompts(5, 1), _prompts(4, 2), batch_size=2)
    assert rep.read_site == site
    assert rep.effect == pytest.approx(6.0, abs=1e-4)
    assert rep.kl_mean > 0 and rep.top1_agreement <= 1.0
    json.loads(rep.to_json())
    assert "effect" in rep.table() and "KL" in rep.table()


def test_kl_matches_direct_computation(llama):
    v = _v(3, norm=2.0)
    site = "layers.1.resid_mid"
    patch = fastpatch.Steer(v)
    neutral = _prompts(5, 4)
    rep = evaluate(llama, None, {site: patch}, _prompts(3, 5), neutral, batch_size=3)
    per_prompt, last, tot, n = [], [], 0.0, 0
    for p in neutral:
        ids = torch.tensor([p])
        with torch.no_grad():
            lp = torch.log_softmax(llama(input_ids=ids).logits[0].double(), -1)
            with fastpatch.hooks.patched(llama, {site: patch}):
                lq = torch.log_softmax(llama(input_ids=ids).logits[0].double(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        per_prompt.append(float(kl.mean()))
        last.append(float(kl[-1]))
        tot += float(kl.sum())
        n += kl.numel()
    assert rep.kl_mean == pytest.approx(tot / n, rel=1e-4, abs=1e-7)
    assert rep.kl_last == pytest.approx(sum(last) / len(last), rel=1e-4, abs=1e-7)
    assert rep.kl_max == pytest.approx(max(per_prompt), rel=1e-4, abs=1e-7)


def test_zero_patch_has_no_effect(llama):
    rep = evaluate(llama, None, {"layers.1.resid_post": fastpatch.Steer(torch.zeros(64))},
                   _prompts(3, 6), _prompts(3, 7), direction=_v())
    assert rep.effect == pytest.approx(0.0, abs=1e-5)
    assert rep.kl_mean == pytest.approx(0.0, abs=1e-7)
    assert rep.top1_agreement == 1.0


def test_logprob_metric_matches_direct(llama):
    site = "layers.0.resid_post"
    patch = fastpatch.Steer(_v(5, norm=4.0))
    targets, conts = _prompts(3, 8), [[7, 8], [9]]
    rep = evaluate(llama, None, {site: patch}, targets, _prompts(2, 9), metric="logprob", continuations=conts)

    def score(model):
        vals = []
        for p in targets:
            s = []
            for c in conts:
                ids = torch.tensor([p + c])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
                s.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
            vals.append(sum(s) / len(s))
        return sum(vals) / len(vals)

    with torch.no_grad():
        before = score(llama)
        with fastpatch.hooks.patched(llama, {site: patch}):
            after = score(llama)
    assert rep.target_unpatched == pytest.approx(before, rel=1e-5)
    assert rep.effect == pytest.approx(after - before, rel=1e-4, abs=1e-5)


def test_patch_direction_and_errors(llama):
    v = _v()
    torch.testing.assert_close(patch_direction(fastpatch.Steer(v, -2.0)), -(v / v.norm()).double())
    torch.testing.assert_close(patch_direction(fastpatch.Ablate(v)).abs(), (v / v.norm()).double().abs())
    with pytest.raises(ValueError, match="continuations"):
        evaluate(llama, None, {"layers.0.resid_post": fastpatch.Steer(v)}, [[1]], [[2]], metric="logprob")
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(llama, None, {}, [[1]], [[2]])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gpt2", "qwen3"])
def test_other_architectures(arch):
    from fastpatch.lifecycle.fitting import collect, mean_difference

    model = tiny_model(arch)
    site = "layers.0.resid_post"
    pos, neg = _prompts(4, 20), _prompts(4, 21)
    v = mean_difference(collect(model, None, pos, site, progress=False)[site],
                        collect(model, None, neg, site, progress=False)[site]).float()
    rep = evaluate(model, None, {site: fastpatch.Steer(v, 2.0)}, _prompts(3, 22), _prompts(3, 23))
    assert rep.effect == pytest.approx(2.0 * float(v.norm()), rel=1e-3)
    assert rep.kl_mean > 0
