"""Batches: left padding, per-sequence select, mixed patched/unpatched rows, scopes and CAST decisions
that differ between sequences all match running each sequence alone with hooks."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf.cast import Condition, Conditional
from models import tiny_model
from surgery_util import assert_close, greedy, hidden, patch_of

N_NEW = 12
_M = {}


def model_for(arch):
    if arch not in _M:
        _M[arch] = tiny_model(arch)
    return _M[arch]


def prompts(seed=0, lengths=(7, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=g) for n in lengths]


def left_pad(seqs):
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, S - len(s):] = s
        mask[b, S - len(s):] = 1
    return ids, mask


def alone_hooks(model, seq, patches):
    h = fp.hooks.apply(model, patches) if patches else None
    try:
        return greedy(model, seq[None], torch.ones(1, len(seq), dtype=torch.long), n=N_NEW)[0]
    finally:
        if h is not None:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_select_per_sequence_left_padding_matches_alone(arch):
    model = model_for(arch)
    D = hidden(model)
    bank_mid = [patch_of(k, D, 40 + i) for i, k in enumerate(("steer", "lowrank", "gated"))]
    bank_post = [patch_of(k, D, 50 + i) for i, k in enumerate(("loreft", "steer", "clamp"))]
    sites = ("layers.1.resid_mid", "layers.0.resid_post")
    seqs = prompts()
    ids, mask = left_pad(seqs)
    select = torch.tensor([0, -1, 2])
    handle = fp.apply(model, {sites[0]: fp.PatchBank(bank_mid), sites[1]: fp.PatchBank(bank_post)})
    handle.select(select)
    try:
        batched = greedy(model, ids, mask, n=N_NEW)
    finally:
        handle.remove()
    for b, s in enumerate(seqs):
        k = int(select[b])
        patches = {} if k < 0 else {sites[0]: bank_mid[k], sites[1]: bank_post[k]}
        assert torch.equal(batched[b], alone_hooks(model, s, patches)), f"sequence {b} (patch {k})"


def test_per_token_select_matches_hooks():
    model = model_for("llama")
    D = hidden(model)
    bank = fp.PatchBank([patch_of("steer", D, 1), patch_of("ablate", D, 2)])
    x = torch.randint(1, 128, (2, 5))
    tok = torch.tensor([[0, 1, -1, 0, 1], [-1, -1, 1, 1, 0]])
    outs = []
    for apply in (fp.apply, fp.hooks.apply):
        h = apply(model, {"layers.0.resid_post": bank})
        h.select(tok)
        with torch.no_grad():
            outs.append(model(input_ids=x).logits)
        h.remove()
    assert_close(outs[0], outs[1], 1e-4, "per-token select")
    # row by row: a token with id -1 sees no patch at this site
    h = fp.hooks.apply(model, {"layers.0.resid_post": bank})
    h.select(torch.full((2, 5), -1))
    with torch.no_grad():
        none = model(input_ids=x).logits
    h.remove()
    with torch.no_grad():
        plain = model(input_ids=x).logits
    assert torch.equal(none, plain)


@pytest.mark.parametrize("scope", ["prompt", "generated", "f2+l1", "all"])
def test_scopes_batched_match_alone(scope):
    model = model_for("llama")
    D = hidden(model)
    p = patch_of("steer", D, 7)
    seqs = prompts(1)
    ids, mask = left_pad(seqs)
    patches = {"layers.0.resid_mid": fp.Scoped(p, scope)}
    with fp.patched(model, patches):
        batched = greedy(model, ids, mask, n=N_NEW)
    for b, s in enumerate(seqs):
        assert torch.equal(batched[b], alone_hooks(model, s, patches)), f"scope {scope} sequence {b}"


def test_scope_semantics_on_prompt_forward():
    model = model_for("llama")
    D = hidden(model)
    p = patch_of("steer", D, 8)
    x = torch.randint(1, 128, (1, 6))
    cp = p.canonical()

    def manual(positions):
        def hook(mod, args, out):
            out = out.clone()
            out[:, positions] = cp.apply(out[0, positions].double()).to(out.dtype)[None]
            return out
        h = model.model.layers[0].register_forward_hook(hook)
        with torch.no_grad():
            r = model(input_ids=x).logits
        h.remove()
        return r

    for scope, pos in (("f2+l1", [0, 1, 5]), ("l2", [4, 5]), ("prompt", list(range(6))), ("generated", [])):
        with fp.patched(model, {"layers.0.resid_post": fp.Scoped(p, scope)}):
            with torch.no_grad():
                got = model(input_ids=x).logits
        assert_close(got, manual(pos), 1e-4, scope)


def _cast_setup(model, seqs, D):
    """A condition at layers.0.resid_post whose threshold splits the prompts' scores."""
    cvec = torch.randn(D, generator=torch.Generator().manual_seed(5))
    cond = Condition(cvec, "layers.0.resid_post", threshold=0.0)
    scores = []
    for s in seqs:
        with fp.hooks.record(model, ["layers.0.resid_post"]) as acts, torch.no_grad():
            model(input_ids=s[None])
        scores.append(float(cond.score(acts["layers.0.resid_post"])[0]))
    order = sorted(scores)
    cond.threshold = (order[0] + order[1]) / 2  # the lowest prompt is below, the others above
    return cond, scores


@pytest.mark.parametrize("aggregate", ["mean", "last"])
def test_cast_decisions_per_sequence_match_alone(aggregate):
    model = model_for("llama")
    D = hidden(model)
    seqs = prompts(2)
    cond, scores = _cast_setup(model, seqs, D)
    cond.aggregate = aggregate
    if aggregate == "last":
        cond.threshold = 0.0
        last = [float(Condition(cond.unit, cond.site, 0.0, aggregate="last").score(
            _record(model, s)["layers.0.resid_post"])[0]) for s in seqs]
        cond.threshold = sorted(last)[0] / 2 + sorted(last)[1] / 2
        scores = last
    decisions = [sc > cond.threshold for sc in scores]
    assert any(decisions) and not all(decisions), "the test needs decisions that differ"
    beh = {"layers.1.resid_mid": Conditional(patch_of("steer", D, 9), cond),
           "layers.1.resid_post": Conditional(fp.Scoped(patch_of("lowrank", D, 10), "generated"), cond)}
    ids, mask = left_pad(seqs)
    with fp.patched(model, beh, count_fires=True) as h:
        batched = greedy(model, ids, mask, n=N_NEW)
        fires = h.fire_counts()
    plain = [alone_hooks(model, s, {}) for s in seqs]
    for b, s in enumerate(seqs):
        alone = alone_hooks(model, s, beh)
        assert torch.equal(batched[b], alone), f"CAST sequence {b}"
        if not decisions[b]:
            assert torch.equal(alone, plain[b])
    # steer at resid_mid: every real prompt token + every decode step of the deciding sequences
    n_on = sum(len(s) + N_NEW - 1 for s, d in zip(seqs, decisions) if d)
    assert int(fires["layers.1.resid_mid"][0]) == n_on


def _record(model, s):
    with fp.hooks.record(model, ["layers.0.resid_post"]) as acts, torch.no_grad():
        model(input_ids=s[None])
    return acts


def test_cast_via_helper_and_hooks_agree_on_prompt_forward():
    model = model_for("llama")
    D = hidden(model)
    seqs = prompts(2)
    cond, _ = _cast_setup(model, seqs, D)
    ids, mask = left_pad(seqs)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    outs = []
    for impl in ("fused", "hooks"):
        if impl == "fused":
            h = fp.cast.apply(model, cond, {"layers.1.resid_post": patch_of("steer", D, 3)})
        else:
            h = fp.hooks.apply(model, {"layers.1.resid_post": Conditional(patch_of("steer", D, 3), cond)})
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits)
        h.remove()
    real = mask.bool()
    assert_close(outs[0][real], outs[1][real], 1e-4, "cast prompt forward")
