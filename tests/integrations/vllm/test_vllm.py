"""fastpatch inside vLLM (in-process engine, eager): per-request patches on real SmolLM2-135M.

Oracles: Hugging Face + fastpatch.apply of the same file, decoded greedily with full forwards; vanilla vLLM
(an engine started without the fastpatch section) for requests without a patch; a plain forward hook for
the steer. One vanilla and one patched engine are shared by the module (each start takes ~10 s here).
"""
from __future__ import annotations

import gc

import pytest

from vllm_common import (one_torch_thread,  # noqa: F401 (autouse fixture)
                              MAX_TOKENS, PROMPTS, TOL, engine, hf_greedy, kind_patches, sampling, smollm2_folder,
                              tokens_and_logprobs, vllm_or_skip, write_files)

KINDS = list(kind_patches(576))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vllm_or_skip()
    from fastpatch.app.models import load_smollm2

    folder = smollm2_folder()
    hf, tok = load_smollm2()
    folder_p = tmp_path_factory.mktemp("vllm_patches")
    files = write_files(folder_p, hf, kind_patches(hf.config.hidden_size))
    import fastpatch

    # A llama.cpp control vector holding the same direction as the "steer" patch file.
    steer = kind_patches(hf.config.hidden_size)["steer"]
    files["gguf"] = str(fastpatch.export_gguf(steer, folder_p / "steer.gguf", model_hint="llama"))
    # Vanilla first (its outputs only), then the patched engine for the rest of the module.
    vanilla = engine(folder)
    vanilla_out = vanilla.generate(PROMPTS, [sampling() for _ in PROMPTS], use_tqdm=False)
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="started without additional_config"):
        vanilla.generate(PROMPTS[:1], [sampling("steer")], use_tqdm=False)
    runner = vanilla.llm_engine.model_executor.driver_worker.worker.model_runner
    untouched = dict(state=getattr(runner, "_fastpatch", None), prepare="_prepare_inputs" in vars(runner),
                     norms=[n for n, m in runner.model.named_modules() if hasattr(m, "_fastpatch_site")],
                     front=vars(vanilla.llm_engine.input_processor).get("_fastpatch_front"))
    del vanilla, runner
    gc.collect()
    llm = engine(folder, {"patches": files})
    return dict(folder=folder, hf=hf, tok=tok, files=files, llm=llm, vanilla=vanilla_out, untouched=untouched)


def test_without_a_fastpatch_section_nothing_is_changed(setup):
    """The plugin is loaded in every engine; one started without additional_config['fastpatch'] keeps
    vLLM's own norms and step preparation (and the front end has no fastpatch state)."""
    assert setup["untouched"] == dict(state=None, prepare=False, norms=[], front=None)
    runner = setup["llm"].llm_engine.model_executor.driver_worker.worker.model_runner
    assert runner._fastpatch is not None and "_prepare_inputs" in vars(runner)


@pytest.fixture(scope="module")
def mixed(setup):
    """One batch: every patch kind on prompt 0, plus every prompt unpatched."""
    llm = setup["llm"]
    names = KINDS + ["gguf"] + [None] * len(PROMPTS)
    prompts = [PROMPTS[0]] * (len(KINDS) + 1) + PROMPTS
    outs = llm.generate(prompts, [sampling(n) for n in names], use_tqdm=False)
    return {(p, n): o for p, n, o in zip(prompts, names, outs)}


@pytest.mark.parametrize("name", KINDS)
def test_every_kind_matches_hf(setup, mixed, name):
    out = mixed[(PROMPTS[0], name)]
    toks, lps = tokens_and_logprobs(out)
    ref_toks, ref_lps = hf_greedy(setup["hf"], out.prompt_token_ids, MAX_TOKENS, setup["files"][name])
    assert toks == ref_toks
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
    plain_toks, plain_lps = tokens_and_logprobs(mixed[(PROMPTS[0], None)])
    assert lps != plain_lps, "the patch must change something (else the comparison proves nothing)"


def test_gguf_control_vector_equals_the_same_steer(mixed):
    toks, lps = tokens_and_logprobs(mixed[(PROMPTS[0], "gguf")])
    s_toks, s_lps = tokens_and_logprobs(mixed[(PROMPTS[0], "steer")])
    assert toks == s_toks
    assert max(abs(a - b) for a, b in zip(lps, s_lps)) <= 1e-5


def test_steer_matches_a_plain_hook(setup, mixed):
    """Independent of fastpatch's HF engine: a forward hook adds the vector to layer 10's output."""
    hf = setup["hf"]
    v = kind_patches(576)["steer"]["layers.10.resid_post"].canonical().shift.float()

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + v,) + tuple(output[1:])
        return output + v

    h = hf.model.layers[10].register_forward_hook(hook)
    try:
        out = mixed[(PROMPTS[0], "steer")]
        ref_toks, ref_lps = hf_greedy(hf, out.prompt_token_ids, MAX_TOKENS)
    finally:
        h.remove()
    toks, lps = tokens_and_logprobs(out)
    assert toks == ref_toks
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL


def test_unpatched_requests_are_bit_identical_to_vanilla(setup):
    """Same batch as the vanilla engine ran: tokens and logprobs equal bit for bit."""
    outs = setup["llm"].generate(PROMPTS, [sampling() for _ in PROMPTS], use_tqdm=False)
    for got, ref in zip(outs, setup["vanilla"]):
        assert tokens_and_logprobs(got) == tokens_and_logprobs(ref)


def test_unpatched_rows_in_a_mixed_batch_match_hf(setup, mixed):
    for p in PROMPTS:
        out = mixed[(p, None)]
        toks, lps = tokens_and_logprobs(out)
        ref_toks, ref_lps = hf_greedy(setup["hf"], out.prompt_token_ids, MAX_TOKENS)
        assert toks == ref_toks
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL


def test_mixed_batch_equals_each_alone(setup, mixed):
    llm = setup["llm"]
    for name in ("steer", "lowrank", "gated"):
        alone = llm.generate([PROMPTS[0]], [sampling(name)], use_tqdm=False)[0]
        a_toks, a_lps = tokens_and_logprobs(alone)
        m_toks, m_lps = tokens_and_logprobs(mixed[(PROMPTS[0], name)])
        assert a_toks == m_toks
        assert max(abs(a - b) for a, b in zip(a_lps, m_lps)) <= 1e-4


def test_prefix_cache_never_shares_blocks_between_patched_and_unpatched(setup):
    """An unpatched request caches a long prompt; the same prompt patched must not reuse that KV."""
    llm = setup["llm"]
    prompt = "In the beginning of the story, a young engineer walked along the river and thought about " * 3
    first = llm.generate([prompt], [sampling()], use_tqdm=False)[0]
    again = llm.generate([prompt], [sampling()], use_tqdm=False)[0]
    assert again.num_cached_tokens > 0, "prefix caching must be on for this test to mean anything"
    patched = llm.generate([prompt], [sampling("steer_mid")], use_tqdm=False)[0]
    assert not patched.num_cached_tokens
    toks, lps = tokens_and_logprobs(patched)
    ref_toks, ref_lps = hf_greedy(setup["hf"], patched.prompt_token_ids, MAX_TOKENS, setup["files"]["steer_mid"])
    assert toks == ref_toks
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
    # A second patched request does share the patched prefix; it must equal the first.
    patched_again = llm.generate([prompt], [sampling("steer_mid")], use_tqdm=False)[0]
    assert patched_again.num_cached_tokens > 0
    assert tokens_and_logprobs(patched_again)[0] == toks
    assert tokens_and_logprobs(first)[0] == tokens_and_logprobs(again)[0]


def test_unknown_patch_name_is_a_clear_error_and_the_engine_keeps_serving(setup):
    from vllm.exceptions import VLLMValidationError

    llm = setup["llm"]
    with pytest.raises(VLLMValidationError, match="unknown patch 'nope'.*steer"):
        llm.generate([PROMPTS[0]], [sampling("nope")], use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="string"):
        llm.generate([PROMPTS[0]], [sampling(3)], use_tqdm=False)
    out = llm.generate([PROMPTS[0]], [sampling("steer")], use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
