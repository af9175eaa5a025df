"""The new block styles of issue #18 (OLMo 2: norms after each branch; parallel blocks: GPT-NeoX, Cohere,
GPT-J, Falcon, Phi-1/2; GPT-NeoX's sequential variant): one case per architecture, fastpatch.apply
against forward hooks written here (the oracle adds the vector where transformers' own block adds, no
fastpatch code involved), plus the refusals. The full grid over tests/models.ARCHS covers the rest (slow)."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import PARALLEL_ARCHS as PARALLEL
from models import tiny_model

NEW = ("olmo2", "gpt_neox", "gpt_neox_seq", "cohere", "gptj", "falcon", "falcon_7b", "phi")
# the module whose output a sequential block adds to the stream for resid_mid (the last one before the add)
MID_BRANCH = {"olmo2": "post_attention_layernorm", "gpt_neox_seq": "post_attention_dropout"}


def _layers(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.layers


def _vectors(model, L):
    g = torch.Generator().manual_seed(7)
    D = model.config.hidden_size
    return [torch.randn(D, generator=g) * 0.7 for _ in range(L + 1)]


def _oracle_hooks(model, vs, mid: bool):
    """v[0] added to layer 0's input, v[i+1] to layer i's output; with ``mid`` also v[i+1]/2 to the
    attention branch's last module (so the layer's own add yields h + a + v/2)."""
    layers = _layers(model)
    hs = [layers[0].register_forward_pre_hook(lambda m, a, k: ((a[0] + vs[0],) + a[1:], k) if a else
                                              (a, {**k, "hidden_states": k["hidden_states"] + vs[0]}),
                                              with_kwargs=True)]

    def post(v):
        def hook(m, args, out):
            return (out[0] + v,) + tuple(out[1:]) if isinstance(out, tuple) else out + v
        return hook

    for i, layer in enumerate(layers):
        hs.append(layer.register_forward_hook(post(vs[i + 1])))
        if mid:
            branch = getattr(layer, MID_BRANCH[model.config.model_type if model.config.model_type != "gpt_neox"
                                               else "gpt_neox_seq"])
            hs.append(branch.register_forward_hook(lambda m, a, out, v=vs[i + 1] * 0.5: out + v))
    return hs


def _patches(vs, L, mid: bool):
    p = {"layers.0.resid_pre": fp.Steer(vs[0])}
    for i in range(L):
        p[f"layers.{i}.resid_post"] = fp.Steer(vs[i + 1])
        if mid:
            p[f"layers.{i}.resid_mid"] = fp.Steer(vs[i + 1] * 0.5)
    return p


@pytest.mark.parametrize("arch", NEW)
def test_fused_equals_forward_hooks(arch):
    model = tiny_model(arch, num_layers=3)
    L = 3
    mid = arch in MID_BRANCH
    vs = _vectors(model, L)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 6), generator=g)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model(ids).logits
        hs = _oracle_hooks(model, vs, mid)
        try:
            ref = model(ids).logits
            ref_tokens = model.generate(ids, **gen)
        finally:
            for h in hs:
                h.remove()
        assert (ref - plain).abs().max() > 1e-2  # the vectors change the output (the comparison means something)
        with fp.patched(model, _patches(vs, L, mid)) as handle:
            got = model(ids).logits
            got_tokens = model.generate(ids, **gen)
            stats = handle.fusion_stats()
        with fp.hooks.patched(model, _patches(vs, L, mid)):  # fastpatch's own hooks path, same oracle
            hooked = model(ids).logits
            hooked_tokens = model.generate(ids, **gen)
        after = model(ids).logits
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"{arch}: fused vs forward hooks, max rel {rel:.3g}"
    rel = float((hooked - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"{arch}: fastpatch.hooks vs forward hooks, max rel {rel:.3g}"
    assert torch.equal(hooked_tokens, ref_tokens), f"{arch}: fastpatch.hooks greedy tokens differ"
    assert torch.equal(got_tokens, ref_tokens), f"{arch}: greedy tokens differ"
    assert torch.equal(after, plain), "remove() must restore the model bit for bit"
    if arch != "olmo2":  # every layer took its normed input from the previous fused add (OLMo 2 has none)
        assert stats["misses"] == 0 and stats["hits"] > 0, stats


@pytest.mark.parametrize("arch", PARALLEL)
def test_parallel_block_has_no_resid_mid(arch):
    model = tiny_model(arch)
    v = torch.ones(model.config.hidden_size)
    for apply in (fp.apply, fp.hooks.apply):
        with pytest.raises(ValueError, match=r"no resid_mid.*layers\.\{i\}\.resid_pre.*layers\.\{i\}\.resid_post"):
            apply(model, {"layers.1.resid_mid": fp.Steer(v)})
    with pytest.raises(ValueError, match="no resid_mid"):
        with fp.hooks.record(model, ["layers.0.resid_mid"]):
            pass
    assert not hasattr(model, "_fastpatch_handle") or getattr(model, "_fastpatch_handle") is None


def test_falcon_sequential_is_refused_with_the_covered_variants():
    import transformers as tf

    cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          new_decoder_architecture=False, parallel_attn=False)
    model = tf.FalconForCausalLM(cfg).eval()
    from fastpatch.core.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="parallel_attn=False.*supported Falcon variants"):
        fp.apply(model, {"layers.0.resid_post": fp.Steer(torch.ones(64))})
