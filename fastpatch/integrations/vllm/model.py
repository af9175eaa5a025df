"""vLLM's decoder norms as fastpatch sites, and the patched norm forward.

vLLM's Llama-family decoder layer returns ``(h, residual)`` unsummed; the residual add happens inside
the next norm, ``norm(h, residual) -> (normed, h + residual)``. So (L layers):

- ``layers.i.resid_mid``  = the add inside layer i's ``post_attention_layernorm``
- ``layers.i.resid_post`` = the add inside layer i+1's ``input_layernorm`` (``model.norm`` for the last)
- ``layers.0.resid_pre``  = layer 0's ``input_layernorm(h)`` (no add: the embeddings themselves)

A patched norm computes the sum, the patch for each token's slot and (``norm="fused"``) the norm in one
fastpatch kernel call; with ``norm="exact"`` the patched sum goes through the norm's own vLLM forward, so a
row with no patch comes out bit-identical to vanilla vLLM.
"""
from __future__ import annotations

import types

import torch

from ...kernels import backends
from ...core.errors import UnsupportedModelError  # one class for every integration
from ...core.sites import site_name

# vLLM model classes whose decoder layers have the (h, residual) -> norm(h, residual) form, and the
# norm flavour of each (weight offset: Gemma's RMSNorm scales by 1 + w).
SUPPORTED = {
    "LlamaForCausalLM": 0.0,
    "MistralForCausalLM": 0.0,
    "Qwen2ForCausalLM": 0.0,
    "Qwen3ForCausalLM": 0.0,
    "GemmaForCausalLM": 1.0,
}
_NORM_CLASSES = {"RMSNorm": 0.0, "GemmaRMSNorm": 1.0}


def decoder(model: torch.nn.Module):
    """(layers, final norm, weight offset) of a supported vLLM causal LM; a clear error otherwise."""
    arch = type(model).__name__
    if arch not in SUPPORTED:
        raise UnsupportedModelError(f"fastpatch's vLLM plugin does not support {arch}; it supports "
                                    f"{sorted(SUPPORTED)}")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    if layers is None or norm is None:
        raise UnsupportedModelError(f"{arch}: expected model.model.layers and model.model.norm")
    for i, layer in enumerate(layers):
        for attr in ("input_layernorm", "post_attention_layernorm"):
            n = getattr(layer, attr, None)
            if n is None:
                raise UnsupportedModelError(
                    f"{arch}: layer {i} has no {attr} (pipeline parallelism is not supported by the fastpatch plugin)")
            if type(n).__name__ not in _NORM_CLASSES:
                raise UnsupportedModelError(f"{arch}: layer {i}.{attr} is {type(n).__name__}; the plugin patches "
                                            f"{sorted(_NORM_CLASSES)} only")
    return layers, norm, SUPPORTED[arch]


def norm_for(layers, final_norm, key):
    """The vLLM norm module whose residual add is the site ``key``."""
    kind, i = key
    if kind == "pre":
        return layers[0].input_layernorm
    if kind == "mid":
        return layers[i].post_attention_layernorm
    return layers[i + 1].input_layernorm if i + 1 < len(layers) else final_norm


def install(model: torch.nn.Module, banks: dict, index: torch.Tensor, *, mode: str, backend=None) -> list:
    """Give the norm of every site in ``banks`` a patched forward reading ``index[:tokens]``.

    Must run after the weights are loaded and before vLLM traces the model. Returns the site names.
    """
    layers, final_norm, offset = decoder(model)
    param = next(model.parameters())
    impl = backends.resolve(backend, param.device)  # resolved (and built) now: compiled code only looks it up
    done = []
    for key, bank in sorted(banks.items()):
        norm = norm_for(layers, final_norm, key)
        if getattr(norm, "_fastpatch_site", None) is not None:
            raise RuntimeError(f"{site_name(key)}: this norm is patched already")
        if bank.hidden_size != norm.weight.shape[0]:
            raise UnsupportedModelError(f"{site_name(key)}: bank hidden size {bank.hidden_size}, norm "
                                        f"{norm.weight.shape[0]}")
        _patch_norm(norm, key, bank, index, impl, mode, offset)
        done.append(site_name(key))
    return done


def _patch_norm(norm, key, bank, index, impl, mode, weight_offset) -> None:
    vanilla = norm.forward  # vLLM's own forward (CustomOp dispatch), used for the norm in "exact" mode
    eps = float(norm.variance_epsilon)
    is_pre = key[0] == "pre"
    fused = mode == "fused"

    def forward(self, x, residual=None):
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        idx = index[: x2.shape[0]]
        if residual is None:
            if not is_pre:  # only layer 0's input norm is called without a residual
                return vanilla(x)
            # layers.0.resid_pre: the layer keeps `hidden_states` itself as its residual, so the
            # patched embeddings are written back into x.
            out = torch.empty_like(x2)
            impl.run(x2, None, self.weight, None, eps, 0, weight_offset, bank, idx, None, out, x2)
            return out.view_as(x) if fused else vanilla(x)
        res2 = residual.reshape(-1, d)
        out = torch.empty_like(x2)
        summed = torch.empty_like(x2)
        impl.run(x2, res2, self.weight, None, eps, 0, weight_offset, bank, idx, None, out, summed)
        summed = summed.view_as(x)
        return (out.view_as(x) if fused else vanilla(summed)), summed

    forward._fastpatch_site = key  # what attach()'s start-up check looks for on every site's norm
    norm.forward = types.MethodType(forward, norm)
    norm._fastpatch_site = key


def installed_site(norm):
    """The site key whose patched forward ``norm`` runs, or None (no fastpatch forward on it)."""
    fwd = norm.__dict__.get("forward")
    return getattr(getattr(fwd, "__func__", None), "_fastpatch_site", None)
