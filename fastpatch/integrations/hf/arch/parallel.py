"""Parallel blocks: attention and MLP both read norms of the same input ``h`` and their outputs are
added to ``h`` once, so a parallel block has ``resid_pre`` / ``resid_post`` but no ``resid_mid``.

The fused block adds the two branches in torch in exactly the order transformers does (``parallel``
names it; float addition is commutative but not associative, so ``(m + a) + h`` and ``m + (a + h)``
differ in the last bit) and fuses the final add + patch + the next layer's norm into one kernel:

- ``"mlp+attn"``: ``(mlp + attn) + h`` — GPT-NeoX (``mlp_output + attn_output + hidden_states``) and
  Falcon (``mlp_output += attention_output``, then ``dropout_add(mlp_output, residual)``).
- ``"attn+mlp"``: ``(attn + mlp) + h`` — GPT-J, Phi-1/2 (``attn_outputs + feed_forward_hidden_states +
  residual``).
- ``"res+attn+mlp"``: ``(h + attn) + mlp`` — Cohere (``residual + hidden_states_attention +
  hidden_states_mlp``): the first add in torch, the second in the kernel with ``h + attn`` as residual.

``ln2`` None: one norm feeds both branches (Cohere, GPT-J, Phi, Falcon-7B); else the MLP's own norm of
the same ``h`` (GPT-NeoX's ``post_attention_layernorm``, Falcon-40B's ``ln_mlp``), run as a module.
"""
from __future__ import annotations

import dataclasses
import inspect

from ....core.errors import UnsupportedModelError
from . import ArchSpec


def _neox(spec, model):
    # use_parallel_residual=False: attn_output = attn + h; h = mlp(ln2(attn_output)) + attn_output, a
    # sequential pre-LN block (dropouts on both branch outputs before their adds)
    if getattr(model.config, "use_parallel_residual", True):
        return dataclasses.replace(spec, resolve=None)
    return dataclasses.replace(spec, name="gpt_neox_sequential", style="pre", parallel=None,
                               ln2="post_attention_layernorm", resolve=None)


def _gptj(spec, model):
    # transformers < ~5.20 (block signature with ``layer_past``) returns (hidden_states, attn_weights)
    # and the model loop reads outputs[0]; later versions return the tensor
    block_cls = type(list(model.base_model.h)[0])
    old = "layer_past" in inspect.signature(block_cls.forward).parameters
    return dataclasses.replace(spec, tuple_out=old, resolve=None)


def _falcon(spec, model):
    cfg = model.config
    if not getattr(cfg, "parallel_attn", True):
        raise UnsupportedModelError(
            "Falcon with parallel_attn=False (falcon-rw: a sequential block with functional dropout_add) is not "
            "supported by fastpatch; supported Falcon variants: parallel_attn=True with new_decoder_architecture "
            "False (Falcon-7B: one input_layernorm) or True (Falcon-40B/180B: ln_attn + ln_mlp, or one "
            "input_layernorm with num_ln_in_parallel_attn=1)")
    n_ln = getattr(cfg, "num_ln_in_parallel_attn", None)
    if cfg.new_decoder_architecture and n_ln in (None, 2):
        return dataclasses.replace(spec, name="falcon_2ln", ln1="ln_attn", ln2="ln_mlp", resolve=None)
    return dataclasses.replace(spec, resolve=None)  # one input_layernorm feeds both branches


GPT_NEOX = ArchSpec(
    name="gpt_neox", model_types=("gpt_neox",), style="parallel", norm="layer", parallel="mlp+attn",
    final_norm="final_layer_norm", attn="attention", ln2="post_attention_layernorm",
    attn_dropout="post_attention_dropout", mlp_dropout="post_mlp_dropout", resolve=_neox,
)

COHERE = ArchSpec(name="cohere", model_types=("cohere",), style="parallel", norm="layer", parallel="res+attn+mlp",
                  ln2=None)

GPTJ = ArchSpec(name="gptj", model_types=("gptj",), style="parallel", norm="layer", parallel="attn+mlp",
                layers="h", final_norm="ln_f", ln1="ln_1", attn="attn", ln2=None, resolve=_gptj)

FALCON = ArchSpec(
    name="falcon", model_types=("falcon",), style="parallel", norm="layer", parallel="mlp+attn", layers="h",
    final_norm="ln_f", attn="self_attention", ln2=None, sum_dropout="hidden_dropout", tuple_out=True,
    resolve=_falcon,
)

PHI = ArchSpec(name="phi", model_types=("phi",), style="parallel", norm="layer", parallel="attn+mlp",
               final_norm="final_layernorm", ln2=None, attn_dropout="resid_dropout", mlp_dropout="resid_dropout")

SPECS = (GPT_NEOX, COHERE, GPTJ, FALCON, PHI)
