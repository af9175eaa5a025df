"""Mixture-of-experts decoders with Llama's block: Qwen2-MoE, Qwen3-MoE, Mixtral.

The sparse MoE block sits where the MLP is and returns a tensor in transformers 5.x (router logits are
recorded by transformers' output hooks on the router, inside the block), so the spec is Llama's."""
from . import ArchSpec

SPEC = ArchSpec(name="moe", model_types=("qwen2_moe", "qwen3_moe", "mixtral"), style="pre", norm="rms")
