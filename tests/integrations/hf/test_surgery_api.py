"""Surgery API: clear errors, atomic apply/swap, pinned versions across threads, fire counts,
fallback to hooks, record()."""
from __future__ import annotations

import threading

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf.cast import Condition, Conditional
from fastpatch.integrations.hf import UnsupportedModelError
from models import tiny_model
from surgery_util import assert_close, forward, greedy, hidden, patch_of

_M = {}


def llama():
    if "llama" not in _M:
        _M["llama"] = tiny_model("llama")
        untouched(_M["llama"])  # remember its own hooks
    return _M["llama"]


X = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(0))


def hook_ids(model):
    return {id(m): (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in model.modules()}


_BASE_HOOKS = {}


def untouched(model):
    """No instance forwards, no handle mark, and the same hooks as the model had before any test."""
    base = _BASE_HOOKS.setdefault(id(model), hook_ids(model))
    return (all("forward" not in m.__dict__ for m in model.modules())
            and hook_ids(model) == base and not hasattr(model, "_fastpatch_handle"))


@pytest.mark.parametrize("apply", [fp.apply, fp.hooks.apply], ids=["fused", "hooks"])
@pytest.mark.parametrize("bad, match", [
    ({"layers.0.resid_foo": None}, "unknown site"),
    ({"model.layers.9.resid_post": None}, "out of range"),
    ({"layers.2.resid_pre": None}, "out of range"),
    ({"layers.1.resid_pre": None, "layers.0.resid_post": None}, "same point"),
    ({"layers.0.resid_post": fp.Steer(torch.ones(65))}, "hidden size"),
    ({"layers.0.resid_post": fp.PatchBank([fp.Steer(torch.ones(64))], dtype=torch.float16)}, "dtype"),
    ({"layers.0.resid_post": "steer"}, "expected a fastpatch patch"),
    ({"layers.0.resid_post": Conditional(fp.Steer(torch.ones(64)),
                                         Condition(torch.ones(64), "layers.1.resid_post", 0.1))}, "after"),
    ({"layers.0.resid_post": fp.Steer(torch.ones(64)), "layers.1.resid_mid": fp.Steer(torch.ones(3))},
     "hidden size"),
])
def test_bad_apply_is_atomic_with_clear_error(apply, bad, match):
    model = llama()
    ref = forward(model, input_ids=X)
    with pytest.raises((ValueError, TypeError), match=match):
        apply(model, bad)
    assert untouched(model)
    assert torch.equal(forward(model, input_ids=X), ref)


def test_wrong_device_bank_is_rejected():
    model = llama()
    bank = fp.PatchBank([fp.Steer(torch.ones(64))], device="meta")
    with pytest.raises(ValueError, match="on meta"):
        fp.apply(model, {"layers.0.resid_post": bank})
    assert untouched(model)


def test_select_errors_and_double_apply():
    model = llama()
    D = hidden(model)
    bank = fp.PatchBank([patch_of("steer", D, 1), patch_of("steer", D, 2)])
    with fp.patched(model, {"layers.0.resid_post": bank}) as h:
        with pytest.raises(RuntimeError, match="select"):
            model(input_ids=X)
        with pytest.raises(ValueError, match=r"\[-1, 2\)"):
            h.select(torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="shape"):
            h.select(torch.zeros(2, 3, 4, dtype=torch.long))
        with pytest.raises(TypeError, match="integer"):
            h.select(torch.zeros(2))
        with pytest.raises(RuntimeError, match="already patched"):
            fp.apply(model, {})
        h.select(torch.tensor([1, 0, 1]))
        with pytest.raises(ValueError, match="batch of 3"):
            model(input_ids=X)
        h.select(torch.tensor([1, -1]))
        model(input_ids=X)
    assert untouched(model)


def test_unsupported_architecture_error_and_hooks_fallback():
    import transformers as tf

    cfg = tf.OPTConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    model = tf.OPTForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError, match="llama.*gpt2.*bert|supported"):
        fp.apply(model, {"layers.0.resid_post": fp.Steer(torch.ones(64))})
    assert untouched(model)
    ref = forward(model, input_ids=X)
    h = fp.apply(model, {"layers.1.resid_post": fp.Steer(torch.randn(64), 3.0)}, fallback="hooks")
    assert h.implementation == "hooks"
    out = forward(model, input_ids=X)
    h.remove()
    assert (out - ref).abs().max() > 1e-3
    assert torch.equal(forward(model, input_ids=X), ref)


def test_swap_validates_then_replaces_atomically():
    model = llama()
    D = hidden(model)
    p1, p2 = patch_of("steer", D, 1), patch_of("lowrank", D, 2)
    with fp.patched(model, {"layers.0.resid_post": p1}) as h:
        a = forward(model, input_ids=X)
        with pytest.raises(ValueError, match="unknown site"):
            h.swap({"layers.0.resid_post": p2, "bogus": p2})
        assert torch.equal(forward(model, input_ids=X), a)
        h.swap({"layers.1.resid_mid": p2})
        b = forward(model, input_ids=X)
    with fp.hooks.patched(model, {"layers.1.resid_mid": p2}):
        ref = forward(model, input_ids=X)
    assert_close(b, ref, 1e-4, "after swap")


def test_pinned_generation_is_not_torn_by_a_concurrent_swap():
    model = llama()
    D = hidden(model)
    pa, pb = patch_of("steer", D, 11), patch_of("steer", D, 12)
    ids = X[:1]
    with fp.hooks.patched(model, {"layers.0.resid_post": pa}):
        want_a = greedy(model, ids, n=10)
    with fp.hooks.patched(model, {"layers.0.resid_post": pb}):
        want_b = greedy(model, ids, n=10)
    assert not torch.equal(want_a, want_b)
    h = fp.apply(model, {"layers.0.resid_post": pa})
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            h.swap({"layers.0.resid_post": pa if i % 2 else pb})
            i += 1

    t = threading.Thread(target=swapper)
    try:
        with h.pinned():
            pinned_plan = h.engine.plan
            t.start()
            got = greedy(model, ids, n=10)
        stop.set()
        t.join()
        want = want_a if pinned_plan.entries[0].bank.patches[0] is pa else want_b
        assert torch.equal(got, want)
    finally:
        stop.set()
        h.remove()


@pytest.mark.parametrize("apply", [fp.apply, fp.hooks.apply], ids=["fused", "hooks"])
def test_fire_counts(apply):
    model = llama()
    D = hidden(model)
    bank = fp.PatchBank([patch_of("steer", D, 1), patch_of("gated", D, 2), patch_of("ablate", D, 3)])
    with apply(model, {"layers.1.resid_mid": bank}, count_fires=True) as h:
        h.select(torch.tensor([[0, 0, 1, 1, 2, -1], [1, 1, 1, 1, 1, 1]]))
        with torch.no_grad():
            model(input_ids=X)
        c = h.fire_counts()["layers.1.resid_mid"]
        assert c.dtype == torch.int32 and c.shape == (3,)
        assert int(c[0]) == 2 and int(c[2]) == 1 and 0 <= int(c[1]) <= 8
        h.reset_fire_counts()
        assert int(h.fire_counts()["layers.1.resid_mid"].sum()) == 0


def test_fire_counts_fused_equals_hooks_for_gates():
    model = llama()
    D = hidden(model)
    p = patch_of("gated", D, 4)
    counts = []
    for apply in (fp.apply, fp.hooks.apply):
        with apply(model, {"layers.0.resid_post": p, "layers.1.resid_mid": p}, count_fires=True) as h:
            with torch.no_grad():
                model(input_ids=X)
            counts.append({k: int(v[0]) for k, v in h.fire_counts().items()})
    assert counts[0] == counts[1]


def test_record_matches_fused_sites():
    model = llama()
    D = hidden(model)
    sites = ["layers.0.resid_pre", "layers.0.resid_mid", "layers.1.resid_pre", "layers.1.resid_post"]
    with fp.hooks.record(model, sites) as acts, torch.no_grad():
        out = model(input_ids=X, output_hidden_states=True)
    _BASE_HOOKS[id(model)] = hook_ids(model)  # output_hidden_states makes transformers add its own hooks
    for s in sites:
        assert acts[s].shape == (2, 6, D)
    assert torch.equal(acts["layers.1.resid_pre"], out.hidden_states[1])
    assert torch.equal(acts["layers.0.resid_pre"], out.hidden_states[0])
    # a Steer at layers.0.resid_mid shifts the recorded value by exactly the steering vector
    p = fp.Steer(torch.randn(D), 2.0)
    with fp.hooks.patched(model, {"layers.0.resid_mid": p}):
        with fp.hooks.record(model, ["layers.0.resid_mid"]) as acts2, torch.no_grad():
            model(input_ids=X)
    assert_close(acts2["layers.0.resid_mid"] - acts["layers.0.resid_mid"],
                 (p.v * 2.0).float().expand(2, 6, D), 1e-5, "record after steer")
    assert untouched(model)


def test_patched_context_and_none_sites():
    model = llama()
    ref = forward(model, input_ids=X)
    with fp.patched(model, {f"layers.{i}.resid_post": None for i in range(2)}):
        assert_close(forward(model, input_ids=X), ref, 1e-5, "None sites")
    assert untouched(model)
    assert torch.equal(forward(model, input_ids=X), ref)


def test_gradients_flow_through_fused_sites():
    """With autograd on, fused sites run the differentiable reference ops: gradients match hooks."""
    model = tiny_model("llama")
    D = hidden(model)
    patches = {"layers.0.resid_mid": patch_of("ablate", D, 1), "layers.1.resid_post": patch_of("steer", D, 2)}
    grads = []
    for apply in (fp.apply, fp.hooks.apply):
        model.zero_grad()
        with apply(model, patches):
            model(input_ids=X).logits.square().mean().backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().max() > 0
    assert_close(grads[0], grads[1], 1e-4, "q_proj grad")
