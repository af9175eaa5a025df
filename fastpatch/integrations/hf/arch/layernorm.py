"""Pre-LayerNorm decoders with Llama's module names: StableLM, Starcoder2 (LayerNorm with bias), OLMo
(a LayerNorm without parameters whose forward hard-codes eps 1e-5)."""
from . import ArchSpec

# StableLM's layer calls its attention with a fixed set of arguments (the layer's own **kwargs are
# dropped) and puts a dropout on the MLP output before the add. use_parallel_residual=True builds a
# parallel-attention block (one norm, x + attn + mlp) with no resid_mid point: refused here.
STABLELM = ArchSpec(
    name="stablelm", model_types=("stablelm",), style="pre", norm="layer", mlp_dropout="dropout",
    attn_kwargs=("attention_mask", "position_ids", "past_key_values", "cache", "use_cache",
                 "position_embeddings"),
    config_requires=(("use_parallel_residual", False,
                      "use_parallel_residual=True is a parallel-attention block (x + attn(ln(x)) + mlp(ln(x))), "
                      "which this pre-LN spec does not fuse"),),
)

STARCODER2 = ArchSpec(name="starcoder2", model_types=("starcoder2",), style="pre", norm="layer")

OLMO = ArchSpec(name="olmo", model_types=("olmo",), style="pre", norm="layer", norm_eps=1e-5)
