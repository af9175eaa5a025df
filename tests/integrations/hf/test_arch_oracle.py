"""One case per pre-LN family of issue #18 in the default run: ``fastpatch.apply`` against forward hooks
written here (not ``fastpatch.hooks``), on the same random-weight tiny model, fp32.

The oracle needs nothing of the block's internals (dropouts, Granite's residual_multiplier, MoE blocks):

- ``layers.0.resid_pre``: a pre-hook on layer 0 replaces its input ``h`` by ``patch(h)``;
- ``layers.i.resid_mid``: a pre-hook on ``post_attention_layernorm`` edits its input in place. Every
  family here computes ``h = residual + branch`` and then ``residual = h; norm(h)`` (StableLM:
  ``residual = residual + attn; norm(residual)``), so the norm's input *is* the stream that flows on and
  an in-place edit of it is the patch at that point, exactly;
- ``layers.i.resid_post``: a forward hook on layer i replaces its output.

The full grid (every patch kind x site kind, generate modes, in-place hooks, drift) runs these
architectures in the slow set (tests/models.py ARCHS; not in FAST_ARCHS).
"""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf import UnsupportedModelError
from models import tiny_model

NEW_ARCHS = ("phi3", "qwen2_moe", "qwen3_moe", "mixtral", "granite", "stablelm", "starcoder2", "olmo")
D = 64


def _patches():
    g = torch.Generator().manual_seed(7)
    v0, v1, v2 = (torch.randn(D, generator=g) for _ in range(3))
    A, B = torch.randn(D, 4, generator=g) * 0.3, torch.randn(4, D, generator=g) * 0.3
    A2, B2 = torch.randn(D, 4, generator=g) * 0.3, torch.randn(4, D, generator=g) * 0.3
    # what each site does to a row h, written out (Steer: h + s·v; LowRank: h + (h·A)·B)
    fns = {
        "layers.0.resid_pre": lambda h: h + 0.5 * v0,
        "layers.0.resid_mid": lambda h: h + (h @ A) @ B,
        "layers.0.resid_post": lambda h: h + 0.7 * v1,
        "layers.1.resid_mid": lambda h: h + 0.3 * v2,
        "layers.1.resid_post": lambda h: h + (h @ A2) @ B2,  # the last layer: fused into the final norm
    }
    patches = {
        "layers.0.resid_pre": fp.Steer(v0, 0.5),
        "layers.0.resid_mid": fp.LowRank(A, B),
        "layers.0.resid_post": fp.Steer(v1, 0.7),
        "layers.1.resid_mid": fp.Steer(v2, 0.3),
        "layers.1.resid_post": fp.LowRank(A2, B2),
    }
    return patches, fns


def _oracle_hooks(model, fns):
    layers = model.model.layers
    handles = []

    def pre0(module, args, kwargs):
        if args:
            return (fns["layers.0.resid_pre"](args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fns["layers.0.resid_pre"](kwargs["hidden_states"])}

    handles.append(layers[0].register_forward_pre_hook(pre0, with_kwargs=True))
    for i, block in enumerate(layers):
        mid, post = fns[f"layers.{i}.resid_mid"], fns[f"layers.{i}.resid_post"]

        def mid_hook(module, args, f=mid):
            h = args[0]
            h.copy_(f(h))  # in place: the residual that flows on is this very tensor

        def post_hook(module, args, out, f=post):
            return (f(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else f(out)

        handles.append(block.post_attention_layernorm.register_forward_pre_hook(mid_hook))
        handles.append(block.register_forward_hook(post_hook))
    return handles


def _logits_and_tokens(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_fused_equals_handwritten_hooks(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    patches, fns = _patches()
    plain_logits, plain_tokens = _logits_and_tokens(model, ids)

    handles = _oracle_hooks(model, fns)
    try:
        ref_logits, ref_tokens = _logits_and_tokens(model, ids)
    finally:
        for h in handles:
            h.remove()
    assert (ref_logits - plain_logits).abs().max() > 1e-2, "the patches should change the logits"

    handle = fp.apply(model, patches)
    try:
        assert handle.implementation == "fused"
        logits, tokens = _logits_and_tokens(model, ids)
        stats = handle.fusion_stats()
    finally:
        handle.remove()
    rel = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
    assert rel <= 1e-5, f"{arch}: fused vs hand-written hooks, max rel diff {rel:.3g}"
    assert torch.equal(tokens, ref_tokens), f"{arch}: greedy tokens differ\n{tokens}\n{ref_tokens}"
    assert stats["hits"] > 0 and stats["misses"] == 0, stats  # the next layer took the fused norm

    # fastpatch.hooks (the fallback) follows from the same spec: same logits as the hand-written hooks
    with fp.hooks.patched(model, patches):
        with torch.no_grad():
            hook_logits = model(ids).logits
    rel = float((hook_logits - ref_logits).abs().max() / ref_logits.abs().max())
    assert rel <= 1e-5, f"{arch}: fastpatch.hooks vs hand-written hooks, max rel diff {rel:.3g}"


@pytest.mark.parametrize("arch,drop", [("phi3", "resid_pdrop"), ("stablelm", "hidden_dropout")])
def test_branch_dropout_applied_in_training(arch, drop):
    """Phi-3's resid_*_dropout and StableLM's MLP dropout sit between the branch and its add: in train
    mode the fused block must apply them in the same order, so the same seed gives the same logits."""
    model = tiny_model(arch)
    setattr(model.config, drop, 0.5)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p == 0.0 and "attn" not in type(m).__name__.lower():
            m.p = 0.5
    model.train()
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))

    def run():
        torch.manual_seed(11)
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    ref, ref_again = run(), run()
    assert torch.equal(ref, ref_again)
    model.eval()
    with torch.no_grad():
        no_drop = model(ids, use_cache=False).logits
    model.train()
    assert (ref - no_drop).abs().max() > 1e-2, "dropout should be active"
    with fp.patched(model, {}):
        got = run()
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel <= 1e-5, f"{arch}: fused train-mode logits differ from the model's (rel {rel:.3g})"


def test_stablelm_parallel_residual_refused_with_fallback():
    import transformers as tf
    from models import _common

    cfg = _common(tf.StableLmConfig, use_parallel_residual=True)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.StableLmForCausalLM(cfg).eval()
    v = torch.randn(D)
    with pytest.raises(UnsupportedModelError, match="use_parallel_residual=True.*fallback='hooks'"):
        fp.apply(model, {"layers.1.resid_post": fp.Steer(v)})
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    handle = fp.apply(model, {"layers.1.resid_post": fp.Steer(v)}, fallback="hooks")
    try:
        assert handle.implementation == "hooks"
        with torch.no_grad():
            got = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    # the last hidden state is the final norm of layer 1's output, which the patch moves by v
    with torch.no_grad():
        expected = model.model.norm(_pre_final(model, ids) + v)
    assert not torch.allclose(out.hidden_states[-1], expected, atol=1e-3)
    assert torch.allclose(got.hidden_states[-1], expected, rtol=1e-5, atol=1e-5)


def _pre_final(model, ids):
    """Layer 1's output of the unpatched model (the final norm's input)."""
    seen = {}
    h = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return seen["x"]


def test_unsupported_error_names_new_families_and_fallback():
    import transformers as tf

    cfg = tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4)
    model = tf.BloomForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError) as err:
        fp.apply(model, {})
    msg = str(err.value)
    supported = msg.split("supported:")[1].split(".")[0].replace(" ", "").split(",")
    assert set(NEW_ARCHS) <= set(supported), msg
    assert "'bloom'" in msg and "fallback='hooks'" in msg


def test_bench_arch_builds_each_family_fastpatch_supports():
    """``fastpatch bench --arch X`` builds a config of family X, and fastpatch fuses that family."""
    from fastpatch.app.model_bench import ARCH_CONFIGS, BenchConfig, arch_config
    from fastpatch.integrations.hf.model_sites import SPECS

    fused = {t for s in SPECS for t in s.model_types}
    for arch in ARCH_CONFIGS:
        config = arch_config(BenchConfig(arch=arch, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128))
        assert config.model_type == arch and arch in fused, arch
        assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    with pytest.raises(ValueError, match="unknown --arch 'bloom'.*qwen3_moe"):
        arch_config(BenchConfig(arch="bloom"))
