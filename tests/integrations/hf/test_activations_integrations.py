"""Activated patches (``fastpatch.Encoded``: ReLU / JumpReLU components, the form of an SAE feature
clamp) through the integrations: Hugging Face fused and hooks against a forward hook written here, and
the vLLM plugin's refusal (its slot tables carry no activation yet; serving one as identity would be a
different edit)."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import tiny_model

D, R = 64, 6


def _encoded(activation):
    g = torch.Generator().manual_seed(11)
    down, up = torch.randn(R, D, generator=g) * 0.3, torch.randn(R, D, generator=g) * 0.3
    bias = torch.randn(R, generator=g) * 0.1
    shift = torch.randn(D, generator=g) * 0.2
    theta = torch.full((R,), 0.4) if activation == "jumprelu" else None
    patch = fp.Encoded(down, bias, up, shift=shift, activation=activation, threshold=theta)

    def edit(h):  # the SAELens form, written out: JumpReLU(z) = ReLU(z)·[z > θ]
        z = h @ down.T + bias
        f = torch.relu(z)
        if theta is not None:
            f = f * (z > theta)
        return h + f @ up + shift

    return patch, edit


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_hf_fused_and_hooks_apply_the_activation(activation):
    model = tiny_model("llama")
    patch, edit = _encoded(activation)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    hook = model.model.layers[0].register_forward_hook(lambda m, a, o: edit(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        want = model(ids).logits
    hook.remove()
    with torch.no_grad():
        plain = model(ids).logits
        # components fire on some rows and not others, so an identity φ would give another answer
        assert (want - plain).abs().max() > 1e-3
        for apply in (fp.apply, fp.hooks.apply):
            handle = apply(model, {"layers.0.resid_post": patch})
            got = model(ids).logits
            handle.remove()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_vllm_slots_take_activated_patch_files_into_banks_started_with_activations(tmp_path):
    """The vLLM plugin's slots: an activated patch file loads, and a bank declared with it carries activation
    levels; a bank started without any refuses it at run time, naming the fix (never a silent identity)."""
    from fastpatch.integrations.vllm.slots import PatchSlotError, SlotTable, read_patches

    patch, _ = _encoded("relu")
    path = tmp_path / "clamp.safetensors"
    fp.save({"layers.0.resid_post": patch}, path)
    activated = read_patches(path, None, 2)
    (c,) = activated.values()
    assert c.activations == ("relu",) * R
    fp.save({"layers.0.resid_post": fp.Steer(torch.ones(D))}, path)  # an affine patch
    plain = read_patches(path, None, 2)
    kw = dict(hidden_size=D, num_layers=2, capacity=3, max_rank=R, sites=None, dtype=torch.float32, device="cpu")
    with_act = SlotTable({"clamp": activated}, **kw)
    assert all(b.act_threshold is not None for b in with_act.banks.values())
    without = SlotTable({"plain": plain}, **kw)
    with pytest.raises(PatchSlotError, match="started without activations"):
        without.write("clamp", activated)
