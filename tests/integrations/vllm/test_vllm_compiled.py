"""The one compiled-mode vLLM test (a compiled start takes 1-2 min on 2 cores): patches in vLLM's default
torch.compile mode, and patches loaded, replaced and unloaded at run time through the worker extension,
after the model was traced (in-place writes into the banks the graph captured)."""
from __future__ import annotations

import pytest

from vllm_common import (one_torch_thread,  # noqa: F401 (autouse fixture)
                              MAX_TOKENS, PROMPTS, TOL, engine, hf_greedy, sampling, smollm2_folder,
                              tokens_and_logprobs, vllm_or_skip, write_files)


def _close(out, hf, patch_file=None):
    toks, lps = tokens_and_logprobs(out)
    ref_toks, ref_lps = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS, patch_file)
    assert toks == ref_toks
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
    return toks


def test_compiled_engine_with_run_time_loading(tmp_path):
    vllm_or_skip()
    import torch
    import fastpatch
    from fastpatch.app.models import load_smollm2
    from fastpatch.integrations.vllm import PatchSlotError, fire_counts, load_patch, unload_patch
    from vllm.exceptions import VLLMValidationError

    hf, _ = load_smollm2()
    g = torch.Generator().manual_seed(1)
    d = hf.config.hidden_size
    files = write_files(tmp_path, hf, {
        "steer": {"layers.10.resid_post": fastpatch.Steer(torch.randn(d, generator=g) * 4)},
        "late": {"layers.6.resid_post": fastpatch.LowRank(torch.randn(d, 2, generator=g) * 0.05,
                                                          torch.randn(2, d, generator=g) * 0.5)},
        "late2": {"layers.6.resid_post": fastpatch.Gated(fastpatch.Steer(torch.randn(d, generator=g) * 4),
                                                         torch.randn(d, generator=g), 0.0)},
        "elsewhere": {"layers.3.resid_post": fastpatch.Steer(torch.randn(d, generator=g))},
    })
    from test_vllm_sae import oracle_patch, sampling as sae_sampling, write_saelens

    sae_folder = write_saelens(tmp_path / "sae", "blocks.6.hook_resid_post", "jumprelu", d, 0)
    llm = engine(smollm2_folder(), {"patches": {"steer": files["steer"]}, "spare_slots": 1, "max_rank": 4,
                                    "sites": ["layers.6.resid_post", "layers.10.resid_post"],
                                    "saes": {"jr": sae_folder}, "sae_slots": 2, "max_sae_features": 4},
                 enforce_eager=False, worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension")
    assert llm.llm_engine.vllm_config.compilation_config.mode != 0, "the engine must run compiled"

    outs = llm.generate([PROMPTS[0], PROMPTS[0]], [sampling("steer"), sampling()], use_tqdm=False)
    _close(outs[0], hf, files["steer"])
    plain = _close(outs[1], hf)
    # fire counts through the traced graph: every token row the steer's request ran (prompt + all generated
    # tokens but the last) at its one site; the unpatched request adds nothing
    rows = len(outs[0].prompt_token_ids) + MAX_TOKENS - 1
    assert fire_counts(llm)["steer"] == {"layers.10.resid_post": rows}

    # SAE feature configs per request in the traced graph: three configs over two rows (one waits a step),
    # each exact vs Hugging Face + fastpatch.apply of the same SAE patch (rows are in-place writes)
    saes = [{"sae": "jr", "clamp": {"3": 6.0, "17": 4.0}}, {"sae": "jr", "ablate": ["5", "9"]},
            {"sae": "jr", "clamp": {"21": 3.0}, "steer": {"60": -4.0}}]
    outs = llm.generate([PROMPTS[0]] * 3, [sae_sampling(c) for c in saes], use_tqdm=False)
    for out, c in zip(outs, saes):
        toks, lps = tokens_and_logprobs(out)
        mapping = oracle_patch({"folders": {"jr": sae_folder}}, c)
        handle = fastpatch.apply(hf, mapping)
        try:
            ref_toks, ref_lps = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
        finally:
            handle.remove()
        assert toks == ref_toks and max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL

    with pytest.raises(VLLMValidationError, match="unknown patch 'late'"):
        llm.generate([PROMPTS[0]], [sampling("late")], use_tqdm=False)
    assert load_patch(llm, "late", files["late"]) == 1
    late = _close(llm.generate([PROMPTS[0]], [sampling("late")], use_tqdm=False)[0], hf, files["late"])
    assert late != plain

    with pytest.raises(PatchSlotError, match="full"):
        load_patch(llm, "third", files["late2"])
    with pytest.raises(PatchSlotError, match="no bank"):
        load_patch(llm, "steer", files["elsewhere"])

    # Replace in place: same name, new file; the prefix cache must not serve the old version's KV.
    assert load_patch(llm, "late", files["late2"]) == 1
    _close(llm.generate([PROMPTS[0]], [sampling("late")], use_tqdm=False)[0], hf, files["late2"])

    unload_patch(llm, "late")
    with pytest.raises(VLLMValidationError, match="unknown patch 'late'"):
        llm.generate([PROMPTS[0]], [sampling("late")], use_tqdm=False)
    assert _close(llm.generate([PROMPTS[0]], [sampling()], use_tqdm=False)[0], hf) == plain
