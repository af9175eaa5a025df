"""One small spec per architecture family: where the residual adds and the norms after them live.

A spec only names submodules; the fused forwards (``fastpatch/integrations/hf/fused.py``) and the hooks
(``fastpatch/integrations/hf/hooks.py``) are generic over it, so a new llama-like family is a one-line addition.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple  # config.model_type values
    style: str  # "pre" (pre-LN decoder) | "post" (post-LN encoder, BERT) | "parallel" (GPT-NeoX, Cohere, ...)
    norm: str  # "rms" | "layer"
    weight_offset: float = 0.0  # Gemma's RMSNorm scales by 1 + w
    layers: str = "layers"  # path from the base model to the ModuleList of blocks
    final_norm: Optional[str] = "norm"  # path from the base model to the final norm
    # pre-LN block parts
    ln1: str = "input_layernorm"
    attn: str = "self_attn"
    post_attn_norm: Optional[str] = None  # Gemma2/3: norm on the attention output before the add
    ln2: str = "post_attention_layernorm"
    mlp: str = "mlp"
    post_mlp_norm: Optional[str] = None  # Gemma2/3: norm on the MLP output before the add
    drop_attn_kwargs: tuple = ()  # block kwargs the attention must not receive
    # Only these block kwargs reach the attention (StableLM's layer passes a fixed set and drops the
    # rest, e.g. flash-attention kwargs); None = all of them (less drop_attn_kwargs).
    attn_kwargs: Optional[tuple] = None
    # Dropout modules on the attention / MLP output right before its add (Phi-3's resid_*_dropout,
    # StableLM's dropout): identity in eval, but the fused block must apply them where training does.
    attn_dropout: Optional[str] = None
    mlp_dropout: Optional[str] = None
    # Name of a block attribute that scales each branch before its add (Granite:
    # ``residual + branch * residual_multiplier``); the fused block pre-scales the branch in torch.
    residual_multiplier: Optional[str] = None
    # The norms' epsilon when the module does not store it (OLMo's weightless LayerNorm hard-codes 1e-5).
    norm_eps: Optional[float] = None
    # (config attribute, required value, why): model_info refuses a config of this family that differs
    # (StableLM's use_parallel_residual=True is a parallel-attention block, not this pre-LN one).
    config_requires: tuple = ()
    # Parallel blocks (style "parallel", arch/parallel.py): the order transformers adds the two branch
    # outputs and the residual in ("mlp+attn" | "attn+mlp" | "res+attn+mlp"); ln2 None there means one
    # norm feeds both branches. OLMo 2 (style "pre"): ln1 / ln2 None, the branches read the raw stream.
    parallel: Optional[str] = None
    sum_dropout: Optional[str] = None  # config attribute: dropout on the branch sum (Falcon's hidden_dropout)
    tuple_out: bool = False  # the block returns (hidden_states, attn_weights) (Falcon, GPT-J before 5.20)
    # (spec, model) -> the spec for this model's config (GPT-NeoX use_parallel_residual, Falcon variants),
    # or raises UnsupportedModelError naming what is covered; model_info calls it
    resolve: Optional[Callable] = None
    # post-LN (BERT) parts, relative to a block
    mid_output: str = "attention.output"  # module whose forward(h, input_tensor) adds + norms
    post_output: str = "output"
    embed_norm: str = "embeddings.LayerNorm"
    layer_classes: tuple = field(default_factory=tuple)  # informational


def get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def norm_eps(module, default: Optional[float] = None) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    if default is not None:  # the spec's norm_eps: the module hard-codes it in its forward
        return float(default)
    raise TypeError(f"cannot find the epsilon of norm module {type(module).__name__}")
