"""OLMo 2: the norms sit *after* each branch, before its add, and no norm follows an add::

    h = h + post_attention_layernorm(self_attn(h))
    h = h + post_feedforward_layernorm(mlp(h))

So the attention and the MLP read the raw stream (``ln1`` / ``ln2`` None) and only the last layer's
``resid_post`` has a norm after it (the final norm). The other sites are an add + patch with no norm:
the fused block still does them in the kernel (one pass: add, patch, write the stream) and discards
the norm output the kernel computes anyway — exact (the stream output does not depend on the norm)
and no new kernel variant in four backends for a saving of one row reduction. A site with no patch
this step is a plain torch add (no kernel launch at all).
"""
from . import ArchSpec

SPEC = ArchSpec(
    name="olmo2", model_types=("olmo2",), style="pre", norm="rms",
    ln1=None, post_attn_norm="post_attention_layernorm", ln2=None, post_mlp_norm="post_feedforward_layernorm",
)
