"""SAE feature edits per request inside vLLM (in-process engine, eager) on real SmolLM2-135M.

Two SAEs written by hand in SAELens' folder format (cfg.json + sae_weights.safetensors; SAELens itself is not
needed): a JumpReLU one at layers.12.resid_post and a ReLU one at layers.5.resid_mid. Requests choose features
inline (``extra_args={"fastpatch": {"sae": ..., "clamp": ...}}``).

Oracle: Hugging Face + fastpatch.apply of the same SAE patch (fastpatch.sae.load(folder).clamp(...) etc.),
greedy-decoded with full forwards (vllm_common). The engine has 3 SAE rows, so batches with more distinct
configs are admitted over several steps.
"""
from __future__ import annotations

import json

import pytest
import torch

from vllm_common import (one_torch_thread,  # noqa: F401 (autouse fixture)
                         MAX_TOKENS, PROMPTS, TOL, engine, smollm2_folder, tokens_and_logprobs, vllm_or_skip)

D_SAE = 96
ROWS = 3
MAX_FEATURES = 6
SITES = {"jr": "layers.12.resid_post", "relu": "layers.5.resid_mid"}


def write_saelens(folder, site_hook: str, arch: str, d_in: int, seed: int) -> str:
    """An SAELens-format SAE whose features fire on real SmolLM2 activations (random directions, biases set
    so roughly half the features are active)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5
    W_dec = torch.randn(D_SAE, d_in, generator=g) * 0.6
    b_dec = torch.randn(d_in, generator=g) * 0.1
    b_enc = torch.randn(D_SAE, generator=g) * 0.5
    weights = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE, generator=g) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": D_SAE, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": site_hook}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vllm_or_skip()
    from fastpatch.app.models import load_smollm2

    hf, tok = load_smollm2()
    d = hf.config.hidden_size
    root = tmp_path_factory.mktemp("saes")
    folders = {"jr": write_saelens(root / "jr", "blocks.12.hook_resid_post", "jumprelu", d, 0),
               "relu": write_saelens(root / "relu", "blocks.5.hook_resid_mid", "standard", d, 1)}
    llm = engine(smollm2_folder(), {"saes": folders, "sae_slots": ROWS, "max_sae_features": MAX_FEATURES})
    return dict(hf=hf, tok=tok, folders=folders, llm=llm, plain={})


def sampling(section=None, n=MAX_TOKENS):
    from vllm import SamplingParams

    extra = None if section is None else {"fastpatch": section}
    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True, extra_args=extra)


def oracle_patch(setup, section: dict):
    """{site: patch} built with the public fastpatch.sae API from the same folder (JSON keys are strings)."""
    import fastpatch

    sae = fastpatch.sae.load(setup["folders"][section["sae"]])
    parts = []
    if "clamp" in section:
        parts.append(sae.clamp({int(i): v for i, v in section["clamp"].items()}))
    if "ablate" in section:
        parts.append(sae.ablate([int(i) for i in section["ablate"]]))
    if "scale" in section:
        parts.append(sae.scale({int(i): v for i, v in section["scale"].items()}))
    if "steer" in section:
        parts.append(sae.steer({int(i): v for i, v in section["steer"].items()}))
    if len(parts) == 1:
        return {sae.site: parts[0]}
    # clamp + steer read one encoding of h: the steer's vector is an extra constant shift of the clamp
    assert len(parts) == 2 and set(section) == {"sae", "clamp", "steer"}
    c = parts[0].canonical()
    return {sae.site: fastpatch.Encoded(c.down, c.bias, c.up, shift=c.shift + parts[1].canonical().shift,
                                        activation=c.activation, threshold=c.threshold)}


def hf_greedy(hf_model, prompt_ids, n, mapping=None):
    import fastpatch

    handle = fastpatch.apply(hf_model, mapping) if mapping else None
    try:
        ids = torch.tensor([list(prompt_ids)])
        toks, lps = [], []
        with torch.no_grad():
            for _ in range(n):
                lp = torch.log_softmax(hf_model(ids).logits[0, -1].double(), -1)
                t = int(lp.argmax())
                toks.append(t)
                lps.append(float(lp[t]))
                ids = torch.cat([ids, torch.tensor([[t]])], 1)
    finally:
        if handle is not None:
            handle.remove()
    return toks, lps


def assert_matches_hf(setup, out, section):
    toks, lps = tokens_and_logprobs(out)
    mapping = None if section is None else oracle_patch(setup, section)
    ref_toks, ref_lps = hf_greedy(setup["hf"], out.prompt_token_ids, MAX_TOKENS, mapping)
    assert toks == ref_toks
    assert max(abs(a - b) for a, b in zip(lps, ref_lps)) <= TOL
    return toks, lps


def worker_state(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner._fastpatch


def scheduler_rows(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler._fastpatch_rows


class CountWrites:
    """Counts the SAE row writes (one per config that newly takes a row) and the rows used."""

    def __init__(self, llm):
        self.table = worker_state(llm).table
        self.vanilla = self.table.write_sae
        self.rows = []

    def __enter__(self):
        def write_sae(row, patches):
            self.rows.append(row)
            return self.vanilla(row, patches)

        self.table.write_sae = write_sae
        return self

    def __exit__(self, *exc):
        del self.table.write_sae


CONFIGS = {
    "clamp": {"sae": "jr", "clamp": {"3": 6.0, "17": 4.0}},
    "ablate": {"sae": "jr", "ablate": ["5", "9", "40"]},
    "steer": {"sae": "jr", "steer": {"11": 5.0}},
    "scale": {"sae": "relu", "scale": {"2": 4.0, "30": 0.0}},
    "clamp_steer": {"sae": "jr", "clamp": {"21": 3.0}, "steer": {"60": -4.0}},
    "relu_clamp": {"sae": "relu", "clamp": {"7": 8.0}},
}


def test_mixed_batch_matches_hf_and_identical_configs_share_a_row(setup):
    """One batch: three configs (two requests each, on different prompts) + unpatched requests; each matches
    Hugging Face + fastpatch.apply of the same SAE patch, the identical ones wrote their row once."""
    llm = setup["llm"]
    names = ["clamp", "ablate", "steer"]
    sections = [CONFIGS[n] for n in names] * 2 + [None, None]
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3 + [PROMPTS[0], PROMPTS[1]]
    with CountWrites(llm) as writes:
        outs = llm.generate(prompts, [sampling(s) for s in sections], use_tqdm=False)
    assert len(writes.rows) == 3 and len(set(writes.rows)) == 3, writes.rows  # one row per distinct config
    plain = {p: tokens_and_logprobs(o) for p, o, s in zip(prompts, outs, sections) if s is None}
    for p, out, s in zip(prompts, outs, sections):
        got = assert_matches_hf(setup, out, s)
        if s is not None:
            assert got[1] != plain[p][1], f"{s}: the edit must change something"
    rows = scheduler_rows(llm)
    assert rows.row_of == {} and rows.req_row == {}, "rows are released when their last request ends"


def test_more_configs_than_rows_are_admitted_over_steps(setup):
    """Six distinct configs, three rows: every request is served (none fails) and each is exact."""
    llm = setup["llm"]
    sections = list(CONFIGS.values()) + [None]
    prompts = [PROMPTS[2]] * len(sections)
    rows = scheduler_rows(llm)
    vanilla_admit, seen = rows.admit, {"waited": 0, "most": 0}

    def admit(request_id, h):
        row = vanilla_admit(request_id, h)
        seen["waited"] += row is None
        seen["most"] = max(seen["most"], len(rows.row_of))
        return row

    rows.admit = admit
    try:
        outs = llm.generate(prompts, [sampling(s) for s in sections], use_tqdm=False)
    finally:
        del rows.admit
    assert seen["waited"] > 0 and seen["most"] == ROWS, seen  # configs waited for rows; never more than ROWS
    for out, s in zip(outs, sections):
        assert len(out.outputs[0].token_ids) == MAX_TOKENS
        assert_matches_hf(setup, out, s)
    assert scheduler_rows(llm).row_of == {}


def test_prefix_cache_keeps_configs_apart(setup):
    llm = setup["llm"]
    prompt = "In the beginning of the story, a young engineer walked along the river and thought about " * 3
    llm.generate([prompt], [sampling()], use_tqdm=False)
    again = llm.generate([prompt], [sampling()], use_tqdm=False)[0]
    assert again.num_cached_tokens > 0, "prefix caching must be on for this test to mean anything"
    a = llm.generate([prompt], [sampling(CONFIGS["clamp"])], use_tqdm=False)[0]
    assert not a.num_cached_tokens
    assert_matches_hf(setup, a, CONFIGS["clamp"])
    other = {"sae": "jr", "clamp": {"3": 6.5, "17": 4.0}}  # another value: another hash
    b = llm.generate([prompt], [sampling(other)], use_tqdm=False)[0]
    assert not b.num_cached_tokens
    same = {"sae": "jr", "clamp": {"17": 4.0, "3": 6.0}}  # the first config in another order: shares its KV
    c = llm.generate([prompt], [sampling(same)], use_tqdm=False)[0]
    assert c.num_cached_tokens > 0
    assert tokens_and_logprobs(c)[0] == tokens_and_logprobs(a)[0]


@pytest.mark.parametrize("section,match", [
    ({"sae": "jr", "clamp": {str(D_SAE): 1.0}}, f"feature {D_SAE} is out of range; this SAE has {D_SAE}"),
    ({"sae": "jr", "ablate": [-1]}, "out of range"),
    ({"sae": "jr", "ablate": list(range(MAX_FEATURES + 1))}, f"at most {MAX_FEATURES} per request"),
    ({"sae": "nope", "clamp": {"1": 1.0}}, r"unknown sae 'nope'; this server has \['jr', 'relu'\]"),
    ({"sae": "jr", "clamp": {"1": float("nan")}}, "finite"),
    ({"sae": "jr", "clamp": {"1": 1.0}, "ablate": [1]}, "edited twice"),
    ({"sae": "jr", "boost": {"1": 1.0}}, "unknown key"),
    ({"sae": "jr"}, "edits nothing"),
])
def test_bad_configs_are_400_errors_and_the_engine_keeps_serving(setup, section, match):
    from vllm.exceptions import VLLMValidationError

    llm = setup["llm"]
    with pytest.raises(VLLMValidationError, match=match):
        llm.generate([PROMPTS[0]], [sampling(section)], use_tqdm=False)
    out = llm.generate([PROMPTS[0]], [sampling(CONFIGS["steer"])], use_tqdm=False)[0]
    assert_matches_hf(setup, out, CONFIGS["steer"])


def test_reserved_keys_cannot_be_forged(setup):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    forged = SamplingParams(max_tokens=2, extra_args={"fastpatch_sae_row": 0})
    with pytest.raises(VLLMValidationError, match="written by fastpatch"):
        setup["llm"].generate([PROMPTS[0]], [forged], use_tqdm=False)


def test_config_errors():
    from fastpatch.integrations.vllm import FastpatchConfigError, parse

    conf = parse({"saes": {"a": "x"}})
    assert (conf.sae_slots, conf.max_sae_features, conf.capacity) == (16, 64, 16)
    assert parse({"saes": {"a": {"path": "x", "site": "layers.1.resid_post"}}}).saes["a"][1] == "layers.1.resid_post"
    with pytest.raises(FastpatchConfigError, match="max_sae_features must be an integer"):
        parse({"saes": {"a": "x"}, "max_sae_features": 0})
    with pytest.raises(FastpatchConfigError, match="sae_slots must be an integer"):
        parse({"saes": {"a": "x"}, "sae_slots": -2})
    with pytest.raises(FastpatchConfigError, match="no 'saes' are declared"):
        parse({"patches": {"a": "x"}, "max_sae_features": 4})
    with pytest.raises(FastpatchConfigError, match="a dict spec has 'path'"):
        parse({"saes": {"a": {"site": "layers.1.resid_post"}}})


def test_an_sae_that_does_not_fit_the_model_refuses_the_start(setup, tmp_path):
    """Checked in VllmConfig.__post_init__, before any model loads."""
    from fastpatch.integrations.vllm import FastpatchStartError

    small = write_saelens(tmp_path / "small", "blocks.3.hook_resid_post", "standard", 64, 2)
    with pytest.raises(FastpatchStartError, match="d_in is 64, the model's hidden size is 576"):
        engine(smollm2_folder(), {"saes": {"small": small}})
    with pytest.raises(FastpatchStartError, match="layer 40 is out of range"):
        engine(smollm2_folder(), {"saes": {"far": {"path": setup["folders"]["jr"], "site": "layers.40.resid_post"}}})
