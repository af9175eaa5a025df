"""GPT-2: pre-LayerNorm with bias, blocks in ``transformer.h``, final ``ln_f``."""
from . import ArchSpec

SPEC = ArchSpec(
    name="gpt2", model_types=("gpt2",), style="pre", norm="layer", layers="h", final_norm="ln_f",
    ln1="ln_1", attn="attn", ln2="ln_2", mlp="mlp",
    drop_attn_kwargs=("encoder_hidden_states", "encoder_attention_mask"),
)
