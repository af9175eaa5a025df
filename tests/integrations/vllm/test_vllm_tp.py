"""tensor_parallel_size=2 on CPU (slow: two worker processes), on a random-weight Qwen3 checkpoint (2 query
heads). The residual stream and the norms are replicated across tensor-parallel ranks, so every rank builds
the same banks and the same per-token index; the output must equal Hugging Face + fastpatch.apply."""
from __future__ import annotations

import pytest
import torch

import fastpatch
from test_vllm_arch import _tiny
from vllm_common import one_torch_thread  # noqa: F401 (autouse fixture)
from vllm_common import MAX_TOKENS, TOL, engine, hf_greedy, sampling, vllm_or_skip, write_files


@pytest.mark.slow
def test_tensor_parallel_two_ranks(tmp_path, monkeypatch):
    vllm_or_skip()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker processes: see vllm_common.one_torch_thread
    from vllm.inputs import TokensPrompt

    hf = _tiny("qwen3")
    folder = tmp_path / "qwen3"
    hf.save_pretrained(folder)
    d = hf.config.hidden_size
    g = torch.Generator().manual_seed(4)
    files = write_files(tmp_path, hf, {
        "mix": {"layers.1.resid_mid": fastpatch.Steer(torch.randn(d, generator=g) * 2),
                "layers.2.resid_post": fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.1,
                                                         torch.randn(2, d, generator=g))}})
    llm = engine(str(folder), {"patches": files}, skip_tokenizer_init=True, max_num_seqs=4, tensor_parallel_size=2,
                 distributed_executor_backend="mp")
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    ids = [5, 17, 42, 99, 7, 3]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 2, [sampling("mix"), sampling()], use_tqdm=False)
    for out, f in zip(outs, (files["mix"], None)):
        c = out.outputs[0]
        toks = list(c.token_ids)
        lps = [c.logprobs[j][t].logprob for j, t in enumerate(toks)]
        ref_toks, ref_lps = hf_greedy(hf, ids, MAX_TOKENS, f)
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
