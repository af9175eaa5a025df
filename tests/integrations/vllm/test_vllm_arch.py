"""Architectures in vLLM: random-weight Hugging Face checkpoints (Mistral, Qwen2, Qwen3, Gemma) saved to a
folder, served by vLLM with the plugin, compared with HF + fastpatch.apply of the same file. Llama is the
real SmolLM2 of test_vllm.py. Qwen3 runs by default; the others are marked slow (one engine start each)."""
from __future__ import annotations

import pytest
import torch

import fastpatch
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import MAX_TOKENS, TOL, engine, hf_greedy, vllm_or_skip, write_files

ARCHS = [pytest.param("qwen3"), pytest.param("mistral", marks=pytest.mark.slow),
         pytest.param("qwen2", marks=pytest.mark.slow), pytest.param("gemma", marks=pytest.mark.slow)]


def _tiny(arch: str):
    import transformers as tf

    # head_dim 64: vLLM's CPU attention supports a fixed list of head sizes.
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
              num_key_value_heads=1, head_dim=64, max_position_embeddings=256)
    cfg = {"mistral": lambda: tf.MistralConfig(sliding_window=None, **kw), "qwen2": lambda: tf.Qwen2Config(**kw),
           "qwen3": lambda: tf.Qwen3Config(**kw), "gemma": lambda: tf.GemmaConfig(**kw)}[arch]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger logits than the init gives: clear greedy choices
        model.lm_head.weight.mul_(8.0) if not cfg.tie_word_embeddings else model.get_input_embeddings().weight.mul_(3.0)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, tmp_path):
    vllm_or_skip()
    from vllm.inputs import TokensPrompt

    hf = _tiny(arch)
    folder = tmp_path / arch
    hf.save_pretrained(folder)
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(3)
    files = write_files(tmp_path, hf, {
        "mix": {"layers.0.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 2),
                "layers.1.resid_mid": fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.1,
                                                        torch.randn(2, d, generator=g)),
                "layers.2.resid_post": fastpatch.Ablate(torch.randn(d, generator=g))}})
    llm = engine(str(folder), {"patches": files}, skip_tokenizer_init=True, max_num_seqs=4)
    from vllm_common import sampling

    ids = [5, 17, 42, 99, 7, 3]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 2, [sampling("mix"), sampling()], use_tqdm=False)
    results = []
    for out, f in zip(outs, (files["mix"], None)):
        c = out.outputs[0]
        toks = list(c.token_ids)
        lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)]
        ref_toks, ref_lps = hf_greedy(hf, ids, MAX_TOKENS, f)
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
        results.append(lps)
    assert results[0] != results[1]
