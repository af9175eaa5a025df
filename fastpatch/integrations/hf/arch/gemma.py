"""Gemma (norm scales by 1 + w) and Gemma2/3 (extra norms on the attention and MLP outputs)."""
from . import ArchSpec

GEMMA = ArchSpec(name="gemma", model_types=("gemma",), style="pre", norm="rms", weight_offset=1.0)

GEMMA2 = ArchSpec(
    name="gemma2", model_types=("gemma2", "gemma3_text"), style="pre", norm="rms", weight_offset=1.0,
    post_attn_norm="post_attention_layernorm", ln2="pre_feedforward_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)
