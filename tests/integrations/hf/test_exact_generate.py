"""generate() modes on a patched model (issue 12, defect 3 and the drift list): beam search with select
and with CAST, num_return_sequences, sampling with a seed, a static cache, torch.compile.

Oracles are plain torch hooks written here (not fastpatch.hooks, which shares the engine): either each
prompt generated alone on the plain model with its own steering hook, or (for sampling, whose random
draws depend on the batch) the same batched call on the plain model with a per-row hook that applies
the patch of each row's prompt.
"""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import tiny_model

D = 64
SITE_LAYER = 1


def hidden_of(out):
    return out[0] if isinstance(out, tuple) else out


def add_rows(fn):
    """A forward hook replacing the layer output t by t + fn(t) (fn gives [B, D], broadcast over S)."""
    def hook(module, args, output):
        t = hidden_of(output)
        new = t + fn(t)[:, None, :].to(t.dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    return hook


def block(model, i):
    base = model.base_model  # model / transformer / gpt_neox
    return (base.layers if hasattr(base, "layers") else base.h)[i]


# One generate case per family of issue #18 (MoE, Granite, LayerNorm pre-LN, OLMo 2, parallel blocks), slow
NEW_ARCHS = ("phi3", "qwen2_moe", "qwen3_moe", "mixtral", "granite", "stablelm", "starcoder2", "olmo", "olmo2",
             "gpt_neox", "cohere", "gptj", "falcon", "phi")
ARCH_PARAMS = ["llama", *(pytest.param(a, marks=pytest.mark.slow) for a in NEW_ARCHS)]


def vectors():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(D, generator=g) * 3.0 for _ in range(2)]


def prompts():
    # equal lengths: each prompt alone sees exactly what it sees in the batch (no padding)
    return torch.tensor([[5, 17, 33, 2, 90, 41], [64, 3, 12, 77, 8, 101]])


def gen(model, ids, **kw):
    kw.setdefault("max_new_tokens", 6)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                              eos_token_id=None, **kw)


def alone_with(model, prompt, vector, **kw):
    h = None
    if vector is not None:
        h = block(model, SITE_LAYER).register_forward_hook(add_rows(lambda t: vector.expand(t.shape[0], D)))
    try:
        return gen(model, prompt[None], **kw)
    finally:
        if h is not None:
            h.remove()


BEAMS = dict(num_beams=3, num_return_sequences=2, do_sample=False)
GREEDY_K = dict(num_return_sequences=2, do_sample=True, top_k=1)  # sampling from the top token: greedy, twice


@pytest.mark.parametrize("arch", ARCH_PARAMS)
@pytest.mark.parametrize("mode", ["beams", "greedy_k", "static", "static_beams"])
def test_select_follows_expansion(mode, arch):
    kw = {"beams": BEAMS, "greedy_k": GREEDY_K, "static": dict(cache_implementation="static"),
          "static_beams": dict(BEAMS, cache_implementation="static")}[mode]
    model = tiny_model(arch)
    v = vectors()
    ids = prompts()
    k = kw.get("num_return_sequences", 1)
    with fp.patched(model, {f"layers.{SITE_LAYER}.resid_post": [fp.Steer(v[0]), fp.Steer(v[1])]}) as h:
        h.select([1, 0])
        out = gen(model, ids, **kw)
    assert out.shape[0] == 2 * k
    for p, patch in ((0, 1), (1, 0)):
        ref = alone_with(model, ids[p], v[patch], **kw)
        assert torch.equal(out[p * k:(p + 1) * k], ref), (mode, p)
    # the patches change the tokens: the test can tell them apart
    assert not torch.equal(alone_with(model, ids[0], None, **kw), alone_with(model, ids[0], v[1], **kw))


def prompt_scores(model, ids, c, layer):
    """CAST's score per prompt, written directly: |mean_t(h)·ĉ| / ‖mean_t(h)‖ at layer's output."""
    seen = {}
    def read(m, a, o):  # returns None: the output stays (a tuple for GPT-J / Falcon blocks)
        seen.setdefault("h", hidden_of(o).detach())

    h = block(model, layer).register_forward_hook(read)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        h.remove()
    pooled = seen["h"].double().mean(1)
    u = c.double() / c.double().norm()
    return ((pooled @ u).abs() / pooled.norm(dim=-1)).tolist()


@pytest.mark.parametrize("arch", ARCH_PARAMS)
@pytest.mark.parametrize("mode", ["beams", "greedy_k", "static_beams"])
def test_cast_follows_expansion(mode, arch):
    kw = {"beams": BEAMS, "greedy_k": GREEDY_K, "static_beams": dict(BEAMS, cache_implementation="static")}[mode]
    model = tiny_model(arch)
    v = vectors()[0]
    ids = prompts()
    c = torch.randn(D, generator=torch.Generator().manual_seed(11))
    scores = prompt_scores(model, ids, c, 0)
    assert abs(scores[0] - scores[1]) > 1e-3
    threshold = (scores[0] + scores[1]) / 2
    decided = [s > threshold for s in scores]
    assert decided[0] != decided[1]
    cond = fp.cast.Condition(c, site="layers.0.resid_post", threshold=threshold)
    k = kw.get("num_return_sequences", 1)
    with fp.patched(model, {f"layers.{SITE_LAYER}.resid_post": fp.cast.Conditional(fp.Steer(v), cond)}):
        out = gen(model, ids, **kw)
    for p in range(2):
        ref = alone_with(model, ids[p], v if decided[p] else None, **kw)
        assert torch.equal(out[p * k:(p + 1) * k], ref), (mode, p)


def test_sampling_with_seed_and_num_return_sequences():
    model = tiny_model("llama")
    v = vectors()
    ids = prompts()
    choice = torch.tensor([1, 0])
    kw = dict(do_sample=True, num_return_sequences=3, top_k=0, temperature=1.0, max_new_tokens=8)
    with fp.patched(model, {f"layers.{SITE_LAYER}.resid_post": [fp.Steer(v[0]), fp.Steer(v[1])]}) as h:
        h.select(choice)
        torch.manual_seed(123)
        out = gen(model, ids, **kw)
    vs = torch.stack(v)

    def per_row(t):  # rows are each prompt's copies, in order (generate's repeat_interleave)
        return vs[choice.repeat_interleave(t.shape[0] // len(choice))]

    hk = block(model, SITE_LAYER).register_forward_hook(add_rows(per_row))
    try:
        torch.manual_seed(123)
        ref = gen(model, ids, **kw)
    finally:
        hk.remove()
    assert torch.equal(out, ref)
    torch.manual_seed(124)
    with fp.patched(model, {}):
        other = gen(model, ids, **kw)
    assert not torch.equal(out, other)


def test_expanded_ids_only_inside_generate():
    """Outside generate a batch whose size differs from the ids is an error, not a silent expansion."""
    model = tiny_model("llama")
    v = vectors()
    with fp.patched(model, {f"layers.{SITE_LAYER}.resid_post": [fp.Steer(v[0]), fp.Steer(v[1])]}) as h:
        h.select([1, 0])
        with pytest.raises(ValueError, match="batch of 2"):
            with torch.no_grad():
                model(input_ids=torch.zeros(4, 3, dtype=torch.long))
        with h.using([0, 1, 1]):
            with pytest.raises(ValueError, match="batch of 3"):
                gen(model, prompts(), **GREEDY_K)
    assert "generate" not in model.__dict__


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_of_a_patched_model(backend):
    model = tiny_model("llama")
    v = vectors()
    ids = prompts()
    torch._dynamo.reset()
    with fp.patched(model, {f"layers.{SITE_LAYER}.resid_post": [fp.Steer(v[0]), fp.Steer(v[1])],
                            "layers.0.resid_mid": [fp.Steer(v[1], 0.5)] * 2}) as h:
        compiled = torch.compile(model, backend=backend)
        h.select([1, 0])
        with torch.no_grad():
            got = compiled(input_ids=ids).logits
            got2 = compiled(input_ids=ids).logits  # second call: compiled code reused
        # an in-place hook present when the model is compiled: still exact. (Hooks added after compiling
        # are not seen by the compiled code, patched or not: dynamo skips hook guards by default.)
        w = torch.randn(D, generator=torch.Generator().manual_seed(5))
        hk = block(model, 0).register_forward_hook(lambda m, a, o: hidden_of(o).add_(w))
        torch._dynamo.reset()
        with torch.no_grad():
            got3 = torch.compile(model, backend=backend)(input_ids=ids).logits
        hk.remove()
        torch._dynamo.reset()
    vs = torch.stack(v)

    # Oracle on the plain model: layer 0's resid_mid steer is the attention output plus 0.5·v1 (it is added
    # to the residual sum); layer 1's output plus v[choice].
    attn = model.model.layers[0].self_attn
    h1 = attn.register_forward_hook(lambda m, a, o: (o[0] + 0.5 * v[1],) + tuple(o[1:]))
    h2 = block(model, SITE_LAYER).register_forward_hook(add_rows(lambda t: vs[torch.tensor([1, 0])]))
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            h3 = block(model, 0).register_forward_hook(lambda m, a, o: hidden_of(o).add_(w))
            ref3 = model(input_ids=ids).logits
            h3.remove()
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got2, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got3, ref3, rtol=1e-4, atol=1e-4)
