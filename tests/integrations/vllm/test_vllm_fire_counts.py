"""Fire counts in vLLM (in-process engine, eager, SmolLM2): fastpatch.integrations.vllm.fire_counts against
counts computed here, independently of fastpatch's kernels.

Oracle: Hugging Face SmolLM2 with a plain forward hook on the gated site's layer. Every token a request runs
through the model passes every site once: its prompt tokens and each generated token but the last (which is
sampled and never fed back). The gated patch's gate is evaluated here in float64 on the HF residual stream at
its site (a patch at layers.i.resid_post does not change layer i's own output, so the unpatched stream is the
gate's input); its threshold sits in a wide gap of those values (as tests/casegen.py's gate_threshold does)
and the test checks that no processed token lies near it. An ungated patch counts exactly the token rows of
its requests, at each site it touches and nowhere else. Prefix caching is off: a cache hit skips the forward.
"""
from __future__ import annotations

import pytest
import torch

from vllm_common import one_torch_thread, engine, sampling, smollm2_folder, vllm_or_skip  # noqa: F401

GATE_LAYER = 12
GATE_SITE = f"layers.{GATE_LAYER}.resid_post"
N_GEN = 4
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "Hello, my name is",
           "The quick brown fox jumps over"]


def _hf_stream(hf, ids) -> torch.Tensor:
    """float64 [tokens, d]: layer GATE_LAYER's output (the residual stream at GATE_SITE) for ``ids``."""
    got = {}

    def hook(mod, args, output):
        got["h"] = (output[0] if isinstance(output, tuple) else output)[0].detach().double()

    handle = hf.model.layers[GATE_LAYER].register_forward_hook(hook)
    try:
        with torch.no_grad():
            hf(torch.tensor([list(ids)]))
    finally:
        handle.remove()
    return got["h"]


def _cosine(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (h @ c) / h.norm(dim=-1)


def _gap_threshold(vals: torch.Tensor) -> float:
    """Mid-point of the widest gap between sorted values in their middle half."""
    v, _ = torch.sort(vals)
    n = v.numel()
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4 + 1)
    j = int(torch.argmax(v[lo + 1:hi + 1] - v[lo:hi])) + lo
    return float((v[j] + v[j + 1]) / 2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    vllm_or_skip()
    import fastpatch
    from fastpatch.app.models import load_smollm2

    hf, tok = load_smollm2()
    d = hf.config.hidden_size
    # The gate's direction and threshold come from the prompts' streams at the site: the mean direction of
    # the prompt tokens splits them into two groups; the threshold goes into the widest gap between them.
    streams = [_hf_stream(hf, tok(p)["input_ids"]) for p in PROMPTS]
    cond = torch.cat(streams)[1:].mean(0)  # the first token's stream is an outlier in norm
    cond = cond / cond.norm()
    thr = _gap_threshold(torch.cat([_cosine(s, cond) for s in streams]))
    g = torch.Generator().manual_seed(3)
    steer = torch.randn(d, generator=g) * 0.5
    patches = {
        "gated": {GATE_SITE: fastpatch.Gated(fastpatch.Steer(steer), cond, thr)},
        "ungated": {"layers.10.resid_post": fastpatch.Steer(steer), "layers.5.resid_mid": fastpatch.Steer(-steer)},
        "late": {"layers.10.resid_post": fastpatch.Steer(2 * steer)},
        "later": {"layers.10.resid_post": fastpatch.Steer(-steer)},
    }
    folder = tmp_path_factory.mktemp("fire_patches")
    files = {n: str(fastpatch.save(m, folder / f"{n}.safetensors", model=hf)) for n, m in patches.items()}
    llm = engine(smollm2_folder(), {"patches": {"gated": files["gated"], "ungated": files["ungated"]},
                                    "spare_slots": 1},
                 enable_prefix_caching=False, worker_extension_cls="fastpatch.integrations.vllm.WorkerExtension")
    return dict(hf=hf, llm=llm, cond=cond, thr=thr, files=files)


def _processed(out) -> list:
    """The token ids a request ran through the model: its prompt and every generated token but the last."""
    gen = list(out.outputs[0].token_ids)
    assert len(gen) == N_GEN
    return list(out.prompt_token_ids) + gen[:-1]


def test_fire_counts_match_hf(setup):
    from fastpatch.integrations.vllm import fire_counts

    llm = setup["llm"]
    before = fire_counts(llm)
    assert before == {"gated": {GATE_SITE: 0}, "ungated": {"layers.5.resid_mid": 0, "layers.10.resid_post": 0}}
    names = ["gated", "gated", "ungated", None]
    outs = llm.generate(PROMPTS, [sampling(n, N_GEN) for n in names], use_tqdm=False)
    seqs = [_processed(o) for o in outs]
    after = fire_counts(llm)

    # gated: the gate evaluated here on HF's stream, for every token the engine ran for those requests
    cos = torch.cat([_cosine(_hf_stream(setup["hf"], s), setup["cond"]) for s, n in zip(seqs, names)
                     if n == "gated"])
    margin = float((cos - setup["thr"]).abs().min())
    assert margin > 1e-4, f"a processed token's gate metric lies {margin:.2g} from the threshold (fragile test)"
    want_gated = int((cos > setup["thr"]).sum())
    assert 0 < want_gated < cos.numel(), "the gate must fire on some tokens and not on others"
    assert after["gated"] == {GATE_SITE: want_gated}

    # ungated: every token row of its request, at each of its two sites
    rows = len(seqs[2])
    assert after["ungated"] == {"layers.5.resid_mid": rows, "layers.10.resid_post": rows}

    # cumulative: the same batch again adds the same counts (greedy: the same tokens)
    llm.generate(PROMPTS, [sampling(n, N_GEN) for n in names], use_tqdm=False)
    again = fire_counts(llm)
    assert again["gated"] == {GATE_SITE: 2 * want_gated}
    assert again["ungated"] == {"layers.5.resid_mid": 2 * rows, "layers.10.resid_post": 2 * rows}


def test_a_reused_slot_starts_at_zero(setup):
    from fastpatch.integrations.vllm import fire_counts, load_patch, unload_patch

    llm, files = setup["llm"], setup["files"]
    slot = load_patch(llm, "late", files["late"])
    out = llm.generate(PROMPTS[:1], [sampling("late", N_GEN)], use_tqdm=False)[0]
    rows = len(_processed(out))
    assert fire_counts(llm)["late"] == {"layers.10.resid_post": rows}
    assert unload_patch(llm, "late") == slot
    # an unloaded name keeps its final totals; the next patch in the same slot counts from zero
    assert load_patch(llm, "later", files["later"]) == slot
    counts = fire_counts(llm)
    assert counts["late"] == {"layers.10.resid_post": rows}
    assert counts["later"] == {"layers.10.resid_post": 0}
    out2 = llm.generate(PROMPTS[1:2], [sampling("later", N_GEN)], use_tqdm=False)[0]
    counts = fire_counts(llm)
    assert counts["later"] == {"layers.10.resid_post": len(_processed(out2))}
    assert counts["late"] == {"layers.10.resid_post": rows}
    unload_patch(llm, "later")


@pytest.mark.parametrize("form", ["norm-exact", "norm-fused", "norm-inplace", "hook-pre", "hook-post"])
def test_each_site_form_counts_its_rows(form):
    """Without an engine: a patched vLLM norm (the fused add, exact and fused modes, and the inplace form) and
    the hooks form count, per bank row, the token rows where the row's patch applied: ungated rows every row
    the index gives them, the gated row where its gate (evaluated here in float64 on the stream) fires."""
    vllm_or_skip()
    import fastpatch
    from fastpatch.core.bank import PatchBank
    from fastpatch.integrations.vllm.model import _hook_site, _patch_norm
    from fastpatch.kernels import backends
    from test_vllm_norm import _norm

    d, n = 64, 40
    g = torch.Generator().manual_seed(11)
    x, r = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    in_place = form in ("norm-inplace", "hook-pre", "hook-post")
    stream = (x if in_place else x + r).double()  # the gate's input at the site
    cond = torch.randn(d, generator=g, dtype=torch.float64)
    cond = cond / cond.norm()
    thr = _gap_threshold(_cosine(stream, cond))
    patches = [fastpatch.Steer(torch.randn(d, generator=g)), fastpatch.Gated(fastpatch.Steer(torch.randn(
        d, generator=g)), cond, thr), fastpatch.Ablate(torch.randn(d, generator=g))]
    bank = PatchBank(patches, d)
    index = torch.randint(-1, 3, (n,), generator=g, dtype=torch.int32)
    fire = torch.zeros(3, dtype=torch.int32)
    impl = backends.resolve("cpp", torch.device("cpu"))
    if form.startswith("norm"):
        norm = _norm("RMSNorm", d)
        _patch_norm(norm, ("mid", 0), bank, index, impl, form.split("-")[1].replace("inplace", "exact"), 0.0,
                    write_back=in_place, fire=fire)
        with torch.no_grad():
            norm(x.clone()) if in_place else norm(x.clone(), r.clone())
    else:
        layer = torch.nn.Identity()
        _hook_site(layer, ("post" if form == "hook-post" else "pre", 0), bank, index, impl, x, fire=fire)
        with torch.no_grad():
            layer(x.clone())
    cos = _cosine(stream, cond)
    assert float((cos - thr).abs().min()) > 1e-4
    want = [int((index == 0).sum()), int(((index == 1) & (cos > thr)).sum()), int((index == 2).sum())]
    assert 0 < want[1] < int((index == 1).sum())
    assert fire.tolist() == want
