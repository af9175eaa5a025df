"""Phi-3: Llama's pre-RMSNorm block with a dropout on each branch right before its add
(``resid_attn_dropout`` / ``resid_mlp_dropout``; identity in eval, applied where training applies it)."""
from . import ArchSpec

SPEC = ArchSpec(name="phi3", model_types=("phi3",), style="pre", norm="rms",
                attn_dropout="resid_attn_dropout", mlp_dropout="resid_mlp_dropout")
