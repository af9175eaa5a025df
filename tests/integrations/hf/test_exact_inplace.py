"""In-place edits by other hooks on a fused model (issue 12, defect 1).

The fused layer hands the next layer its already-normed input when nothing can run in between; a hook
that edits the residual stream in place (``o.add_(v)``, ``o[:] = ...``, steering-vectors'
``original_tensor[None] = ...``) must still give exactly what the same hook gives on the plain model.
Oracle: the unpatched model with the same hook (and, where a patch is set, a plain torch hook written
here). Every architecture, first / middle / last layer, under no_grad, inference_mode and autograd.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import fastpatch as fp
from fastpatch.integrations.hf.model_sites import model_info
from models import ARCHS, FAST_ARCHS, tiny_model
from surgery_util import assert_close

ALL = ARCHS + ("bert",)
FAST = FAST_ARCHS + ("bert",)
PARAMS = [pytest.param(a, marks=() if a in FAST else pytest.mark.slow) for a in ALL]
MODES = ("no_grad", "inference_mode", "autograd")


def three_layer_model(arch: str, dtype=torch.float32):
    """tiny_model (tests/models.py) with 3 layers, so there is a middle one."""
    return tiny_model(arch, dtype, num_layers=3)


def decoder_layers(model):
    base = model.base_model
    if hasattr(base, "layers"):
        return base.layers
    if hasattr(base, "h"):
        return base.h
    return base.encoder.layer


def hidden_of(out):
    return out[0] if isinstance(out, tuple) else out


def grad_mode(mode):
    if mode == "no_grad":
        return torch.no_grad()
    if mode == "inference_mode":
        return torch.inference_mode()
    return contextlib.nullcontext()


def run(model, ids, mode):
    with grad_mode(mode):
        out = model(input_ids=ids)
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    if mode == "autograd":
        assert t.requires_grad
        t.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return t.detach().float(), grads
    return t.float(), None


def inplace_add(v):
    def hook(module, args, output):
        hidden_of(output).add_(v)  # in place, returns None: the output object is unchanged
    return hook


def inplace_setitem(v):
    def hook(module, args, output):  # steering-vectors' idiom
        t = hidden_of(output)
        t[None] = t + v
    return hook


def pre_inplace(v):
    def hook(module, args):
        args[0].mul_(0.5).add_(v)
    return hook


def compare(model, ids, mode, install_hooks, patches=None, oracle_hooks=()):
    """Plain model with oracle_hooks + install_hooks vs fastpatch.patched(model, patches) + install_hooks."""
    handles = [f() for f in oracle_hooks] + [f() for f in install_hooks]
    try:
        ref, ref_grads = run(model, ids, mode)
    finally:
        for h in handles:
            h.remove()
    with fp.patched(model, patches or {}) as handle:
        handles = [f() for f in install_hooks]
        try:
            got, got_grads = run(model, ids, mode)
        finally:
            for h in handles:
                h.remove()
    assert_close(got, ref, 1e-4, f"{mode}")
    if ref_grads is not None:
        assert set(got_grads) == set(ref_grads)
        for n in ref_grads:
            assert_close(got_grads[n], ref_grads[n], 2e-4, f"grad {n}")
    return handle


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", PARAMS)
def test_inplace_hooks_at_first_middle_last_layer(arch, mode):
    model = three_layer_model(arch)
    blocks = decoder_layers(model)
    D = model.config.hidden_size if arch != "gpt2" else model.config.n_embd
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    v = torch.randn(D, generator=torch.Generator().manual_seed(3))
    for i in (0, 1, 2):
        for make in (inplace_add, inplace_setitem):
            compare(model, ids, mode, [lambda i=i, make=make: blocks[i].register_forward_hook(make(v))])
        if i > 0:  # a pre-hook editing the next layer's input in place
            compare(model, ids, mode, [lambda i=i: blocks[i].register_forward_pre_hook(pre_inplace(v))])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", [a for a in PARAMS if a.values[0] != "bert"])
def test_inplace_hook_after_a_patched_site(arch, mode):
    """A fastpatch Steer at layers.1.resid_post, then another hook edits layer 1's output in place.
    Oracle: plain model, a plain-torch steer hook registered first, then the same in-place hook."""
    model = three_layer_model(arch)
    blocks = decoder_layers(model)
    D = model.config.hidden_size if arch != "gpt2" else model.config.n_embd
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(4)
    v, w = torch.randn(D, generator=g), torch.randn(D, generator=g)

    def steer(module, args, output):
        t = hidden_of(output)
        out = t + 2.0 * w
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    compare(model, ids, mode, [lambda: blocks[1].register_forward_hook(inplace_add(v))],
            patches={"layers.1.resid_post": fp.Steer(w, 2.0)},
            oracle_hooks=[lambda: blocks[1].register_forward_hook(steer)])


@pytest.mark.parametrize("arch", [a for a in PARAMS if a.values[0] != "bert"])
def test_inplace_global_hook(arch):
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) editing in place."""
    model = three_layer_model(arch)
    blocks = set(decoder_layers(model))
    D = model.config.hidden_size if arch != "gpt2" else model.config.n_embd
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    v = torch.randn(D, generator=torch.Generator().manual_seed(3))

    def hook(module, args, output):
        if module in blocks:
            hidden_of(output).add_(v)

    compare(model, ids, "inference_mode", [lambda: torch.nn.modules.module.register_module_forward_hook(hook)])


@pytest.mark.parametrize("arch", [a for a in PARAMS if a.values[0] != "bert"])
def test_hooks_on_norm_modules_still_run(arch):
    """A hook on a norm module the fused kernel replaces (input_layernorm / ln_1 of layer 1, the
    post-attention norm) still sees and may change its output, as on the plain model."""
    model = three_layer_model(arch)
    blocks = decoder_layers(model)
    D = model.config.hidden_size if arch != "gpt2" else model.config.n_embd
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    v = torch.randn(D, generator=torch.Generator().manual_seed(5))
    # every norm of the block the fused forward runs itself, as the family's spec names them (Llama's
    # input_layernorm / post_attention_layernorm, GPT-2's ln_1 / ln_2, OLMo 2's post-branch norms, a
    # parallel block's one or two input norms, ...)
    spec = model_info(model).spec
    names = [n for n in (spec.ln1, spec.post_attn_norm, spec.ln2, spec.post_mlp_norm) if n is not None]
    assert names, spec

    def add(module, args, output):
        return output + v

    for i in (0, 1, 2):
        for name in names:
            compare(model, ids, "no_grad",
                    [lambda i=i, name=name: getattr(blocks[i], name).register_forward_hook(add)])


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fusion_hits_every_layer_without_hooks(arch):
    model = three_layer_model(arch)
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with fp.patched(model, {}) as handle, torch.inference_mode():
        handle.reset_fusion_stats()
        model(input_ids=ids)
        model(input_ids=ids)
        stats = handle.fusion_stats()
        # layers 1, 2 and the final norm take their normed input from the previous fused site
        assert stats == {"hits": 2 * 3, "misses": 0}, stats
        h = decoder_layers(model)[1].register_forward_hook(lambda m, a, o: None)
        model(input_ids=ids)
        h.remove()
        stats = handle.fusion_stats()
        assert stats == {"hits": 2 * 3 + 2, "misses": 1}, stats
