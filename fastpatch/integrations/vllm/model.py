"""vLLM's decoder layers as fastpatch sites, and the patched forwards.

Where the residual adds happen differs by architecture; each supported vLLM model class has a
:class:`Layout` saying which of three forms its layers take (L layers, ``0 <= i < L``):

``"fused"`` (Llama, Mistral, Qwen2/3, Qwen2/3-MoE, Mixtral, Phi-3, Gemma, Gemma 2/3): the decoder layer
returns ``(h, residual)`` unsummed; the add happens inside the next norm, ``norm(h, residual) -> (normed,
h + residual)``:

- ``layers.i.resid_mid``  = the add inside layer i's ``Layout.mid`` norm (``post_attention_layernorm``;
  Gemma 2/3: ``pre_feedforward_layernorm``, because their ``post_attention_layernorm`` normalises the
  attention output alone, before the add)
- ``layers.i.resid_post`` = the add inside layer i+1's ``input_layernorm`` (``model.norm`` for the last)
- ``layers.0.resid_pre``  = layer 0's ``input_layernorm(h)`` (no add: the embeddings themselves)

``"inplace"`` (Granite): the layer sums itself, ``h = residual + branch * residual_multiplier``, and the
next norm is called on that sum alone while the layer keeps the same tensor as its residual. So each
site is the *input* of the same norm as in the fused form, and the patched sum is written back into it in
place (the alias the layer adds to next sees it).

``"hooks"`` (models vLLM runs through its Transformers backend, ``TransformersForCausalLM``: OLMo 2,
GPT-NeoX): Hugging Face's own decoder layer code runs, with plain ``+`` adds and no norm that takes the
sum (OLMo 2 norms the branch outputs; GPT-NeoX is a parallel block). The sums are patched in place by
module hooks: ``resid_post`` on layer i's output, ``resid_pre`` on layer 0's input, ``resid_mid`` on
the input of the module that consumes the mid sum (OLMo 2: ``mlp``; GPT-NeoX with
``use_parallel_residual=False``: ``post_attention_layernorm``). A parallel block has no ``resid_mid``.

A patched norm computes the sum, the patch for each token's slot and (``norm="fused"``) the norm in one
fastpatch kernel call; with ``norm="exact"`` the patched sum goes through the norm's own vLLM forward, so a
row with no patch comes out bit-identical to vanilla vLLM. Hooks only write the patched sum (the kernel's
norm output is discarded), so they are exact in both modes.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Optional

import torch

from ...core.errors import UnsupportedModelError  # one class for every integration
from ...core.sites import all_sites, site_name
from ...kernels import backends


@dataclass(frozen=True)
class Layout:
    form: str  # "fused" | "inplace" | "hooks" (module docstring)
    weight_offset: float = 0.0  # Gemma's RMSNorm scales by 1 + w
    # fused / inplace: the norm (attribute of a layer) whose add (fused) or input (inplace) is resid_mid;
    # hooks: the module of a layer whose input is the mid sum. None: no resid_mid (a parallel block).
    mid: Optional[str] = "post_attention_layernorm"
    note: str = ""  # why this layout (in error messages)


_LLAMA = Layout("fused")
_GEMMA = Layout("fused", 1.0)
_GEMMA2 = Layout("fused", 1.0, "pre_feedforward_layernorm")

# vLLM model class -> layout. Phi3ForCausalLM is vLLM's LlamaForCausalLM; the MoE models differ from
# Llama only in the MLP (mlp / block_sparse_moe), which the sites do not touch.
LAYOUTS = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "Phi3ForCausalLM": _LLAMA,
    "Qwen2MoeForCausalLM": _LLAMA,
    "Qwen3MoeForCausalLM": _LLAMA,
    "MixtralForCausalLM": _LLAMA,
    "GemmaForCausalLM": _GEMMA,
    "Gemma2ForCausalLM": _GEMMA2,
    "Gemma3ForCausalLM": _GEMMA2,
    "GraniteForCausalLM": Layout("inplace"),
}
# TransformersForCausalLM (vLLM's Transformers backend) -> the Hugging Face base model class it wraps.
TRANSFORMERS_BACKEND = "TransformersForCausalLM"
HF_LAYOUTS = {
    "Olmo2Model": Layout("hooks", mid="mlp"),
    "GPTNeoXModel": Layout("hooks", mid=None, note="parallel attention + MLP block (use_parallel_residual)"),
}
# Kept for callers of the first version (name -> norm weight offset).
SUPPORTED = {name: layout.weight_offset for name, layout in LAYOUTS.items()}
SUPPORTED.update({f"{TRANSFORMERS_BACKEND}({name})": 0.0 for name in HF_LAYOUTS})
_NORM_CLASSES = {"RMSNorm": 0.0, "GemmaRMSNorm": 1.0}


@dataclass
class Decoder:
    """A supported vLLM model's layers, final norm (None in the hooks form) and layout."""
    arch: str
    layers: object
    final_norm: Optional[torch.nn.Module]
    layout: Layout

    @property
    def offset(self) -> float:
        return self.layout.weight_offset

    @property
    def has_mid(self) -> bool:
        return self.layout.mid is not None

    def site_names(self) -> list:
        """Every site this model has (no resid_mid for a parallel block)."""
        return [s for s in all_sites(len(self.layers)) if self.has_mid or not s.endswith("resid_mid")]

    def check_key(self, key) -> None:
        if key[0] == "mid" and not self.has_mid:
            raise UnsupportedModelError(
                f"{site_name(key)}: {self.arch} has no resid_mid site ({self.layout.note}: attention and MLP read "
                f"the same input and are added together); its sites are layers.0.resid_pre and layers.i.resid_post "
                f"for 0 <= i < {len(self.layers)}")

    def module_for(self, key) -> torch.nn.Module:
        """The module that carries site ``key``'s patched forward (norm forms) or hook (hooks form)."""
        self.check_key(key)
        kind, i = key
        if self.layout.form == "hooks":
            if kind == "mid":
                return getattr(self.layers[i], self.layout.mid)
            return self.layers[0] if kind == "pre" else self.layers[i]
        if kind == "pre":
            return self.layers[0].input_layernorm
        if kind == "mid":
            return getattr(self.layers[i], self.layout.mid)
        return self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.final_norm


def _unsupported(arch: str) -> UnsupportedModelError:
    hf = ", ".join(f"{TRANSFORMERS_BACKEND} wrapping {n}" for n in sorted(HF_LAYOUTS))
    return UnsupportedModelError(f"fastpatch's vLLM plugin does not support {arch}; it supports "
                                 f"{sorted(LAYOUTS)} and {hf}")


def decoder(model: torch.nn.Module) -> Decoder:
    """The :class:`Decoder` of a supported vLLM causal LM; :class:`UnsupportedModelError` otherwise."""
    arch = type(model).__name__
    inner = getattr(model, "model", None)
    if arch == TRANSFORMERS_BACKEND:
        hf_name = type(inner).__name__
        layout = HF_LAYOUTS.get(hf_name)
        if layout is None:
            raise _unsupported(f"{arch} wrapping {hf_name}")
        arch = f"{arch}({hf_name})"
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise UnsupportedModelError(f"{arch}: expected model.model.layers")
        if layout.mid is None and not all(getattr(layer, "use_parallel_residual", True) for layer in layers):
            # GPT-NeoX with use_parallel_residual=False is sequential: the mid sum is the input of
            # post_attention_layernorm (Hugging Face's GPTNeoXLayer.forward).
            layout = Layout("hooks", mid="post_attention_layernorm")
        if layout.mid is not None:
            for i, layer in enumerate(layers):
                if not isinstance(getattr(layer, layout.mid, None), torch.nn.Module):
                    raise UnsupportedModelError(f"{arch}: layer {i} has no {layout.mid}")
        return Decoder(arch, layers, None, layout)
    layout = LAYOUTS.get(arch)
    if layout is None:
        raise _unsupported(arch)
    layers = getattr(inner, "layers", None)
    norm = getattr(inner, "norm", None)
    if layers is None or norm is None:
        raise UnsupportedModelError(f"{arch}: expected model.model.layers and model.model.norm")
    for i, layer in enumerate(layers):
        for attr in ("input_layernorm", layout.mid):
            n = getattr(layer, attr, None)
            if n is None:
                raise UnsupportedModelError(
                    f"{arch}: layer {i} has no {attr} (pipeline parallelism is not supported by the fastpatch plugin)")
            if type(n).__name__ not in _NORM_CLASSES:
                raise UnsupportedModelError(f"{arch}: layer {i}.{attr} is {type(n).__name__}; the plugin patches "
                                            f"{sorted(_NORM_CLASSES)} only")
    return Decoder(arch, layers, norm, layout)


def norm_for(layers, final_norm, key):
    """The norm whose residual add is ``key`` in the Llama layout (kept for callers of the first version;
    use ``decoder(model).module_for(key)``)."""
    return Decoder("", layers, final_norm, _LLAMA).module_for(key)


def install(model: torch.nn.Module, banks: dict, index: torch.Tensor, *, mode: str, backend=None,
            fires: Optional[dict] = None) -> list:
    """Give every site in ``banks`` its patched forward (or hook) reading ``index[:tokens]``.

    ``fires``: {site key: int32 [num_patches] tensor} the site's kernel call adds its fire counts to
    (None: not counted). Must run after the weights are loaded and before vLLM traces the model. Returns
    the site names.
    """
    dec = decoder(model)
    for key in banks:  # all refusals before anything is changed
        dec.check_key(key)
    param = next(model.parameters())
    impl = backends.resolve(backend, param.device)  # resolved (and built) now: compiled code only looks it up
    done = []
    for key, bank in sorted(banks.items()):
        module = dec.module_for(key)
        if key in installed_sites(module):
            raise RuntimeError(f"{site_name(key)}: this module is patched already")
        if dec.layout.form == "hooks":
            _hook_site(module, key, bank, index, impl, param, fire=(fires or {}).get(key))
        else:
            if bank.hidden_size != module.weight.shape[0]:
                raise UnsupportedModelError(f"{site_name(key)}: bank hidden size {bank.hidden_size}, norm "
                                            f"{module.weight.shape[0]}")
            _patch_norm(module, key, bank, index, impl, mode, dec.offset,
                        write_back=dec.layout.form == "inplace", fire=(fires or {}).get(key))
        done.append(site_name(key))
    return done


def _patch_norm(norm, key, bank, index, impl, mode, weight_offset, *, write_back: bool = False,
                fire: Optional[torch.Tensor] = None) -> None:
    """``write_back``: the norm is called on the stream alone (Granite) and the caller keeps that tensor
    as its residual, so the patched sum is written into the input itself. ``fire``: the int32
    [num_patches] fire counts the kernel adds to (None: not counted)."""
    vanilla = norm.forward  # vLLM's own forward (CustomOp dispatch), used for the norm in "exact" mode
    spec = backends.NormSpec(0, float(norm.variance_epsilon), float(weight_offset))  # RMSNorm
    in_place = write_back or key[0] == "pre"
    fused = mode == "fused"

    def forward(self, x, residual=None):
        d = x.shape[-1]
        idx_n = x.numel() // d
        idx = index[:idx_n]
        if residual is None:
            if not in_place:  # in the fused form only layer 0's input norm is called without a residual
                return vanilla(x)
            # layers.0.resid_pre (the layer keeps `hidden_states` itself as its residual) or the inplace
            # form: the patched stream is written back into x. view, not reshape: a copy would drop it.
            x2 = x.view(-1, d)
            out = torch.empty_like(x2)
            impl.run(x2, None, self.weight, None, spec, bank.kernel_args(), idx, fire, out, x2)
            return out.view_as(x) if fused else vanilla(x)
        x2 = x.reshape(-1, d)
        res2 = residual.reshape(-1, d)
        out = torch.empty_like(x2)
        summed = torch.empty_like(x2)
        impl.run(x2, res2, self.weight, None, spec, bank.kernel_args(), idx, fire, out, summed)
        summed = summed.view_as(x)
        return (out.view_as(x) if fused else vanilla(summed)), summed

    forward._fastpatch_site = key  # what attach()'s start-up check looks for on every site's norm
    norm.forward = types.MethodType(forward, norm)
    norm._fastpatch_site = key


_UNIT_RMS = backends.NormSpec(0, 1e-6, 0.0)  # the scratch norm of patch_in_place


def patch_in_place(x: torch.Tensor, bank, index, impl, ones: torch.Tensor,
                   fire: Optional[torch.Tensor] = None) -> None:
    """x (the residual stream, [..., d]) += each token's patch, in place. The backends have one entry
    point, the fused add + norm; its norm output (RMS over unit weights) goes to a scratch tensor and is
    dropped. A row with index -1 is written back unchanged. ``fire``: fire counts to add to, or None."""
    d = x.shape[-1]
    x2 = x.view(-1, d)  # view, not reshape: a copy would drop the write
    out = torch.empty_like(x2)
    impl.run(x2, None, ones, None, _UNIT_RMS, bank.kernel_args(), index[: x2.shape[0]], fire, out, x2)


def _hook_site(module, key, bank, index, impl, param, fire: Optional[torch.Tensor] = None) -> None:
    """The hooks form: patch the stream tensor in place where Hugging Face's layer code holds it.
    ``post``: layer i's output (what layer i+1 and the final norm read); ``pre``: layer 0's input;
    ``mid``: the input of the module that consumes the mid sum (the layer adds to the same tensor)."""
    ones = torch.ones(bank.hidden_size, dtype=param.dtype, device=param.device)

    def stream_arg(args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise UnsupportedModelError(f"{site_name(key)}: {type(module).__name__} was called without a "
                                        "hidden_states tensor")
        return x

    if key[0] == "post":
        def hook(mod, args, kwargs, output):
            x = output[0] if isinstance(output, tuple) else output
            patch_in_place(x, bank, index, impl, ones, fire)
            return None  # patched in place: the output object is unchanged

        hook._fastpatch_site = key
        handle = module.register_forward_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, kwargs):
            patch_in_place(stream_arg(args, kwargs), bank, index, impl, ones, fire)
            return None

        hook._fastpatch_site = key
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    hooks = module.__dict__.setdefault("_fastpatch_hooks", {})
    hooks[key] = handle


def installed_sites(module) -> set:
    """The site keys whose patched forward or hooks ``module`` runs (in the hooks form layer 0 can carry
    both resid_pre and resid_post). Read from the module's live forward and hook dicts, not from a flag:
    a forward replaced or a hook removed after install shows as missing."""
    keys = set()
    fwd = module.__dict__.get("forward")
    key = getattr(getattr(fwd, "__func__", None), "_fastpatch_site", None)
    if key is not None:
        keys.add(key)
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        keys.update(h._fastpatch_site for h in hooks.values() if getattr(h, "_fastpatch_site", None) is not None)
    return keys


def installed_site(norm):
    """The site key whose patched forward ``norm`` runs, or None (kept for callers of the first version)."""
    fwd = norm.__dict__.get("forward")
    return getattr(getattr(fwd, "__func__", None), "_fastpatch_site", None)
