"""fastpatch.sae: SAE feature edits (clamp / ablate / scale / steer) as fastpatch patches.

The oracle is SAELens itself where it is installed: its ``SAE.load_from_disk(...).encode()`` and
``W_dec`` applied by a forward hook written here. Without sae_lens the Gemma Scope ``params.npz`` path
and the refusals still run (their oracle is the JumpReLU written out by hand).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastpatch as fp
from models import tiny_model
from sae_lens_util import import_sae_lens

D, DSAE = 64, 32
SITE, HOOK = "layers.0.resid_post", "blocks.0.hook_resid_post"
MARGIN = 0.05  # no token's JumpReLU pre-activation lies closer than this to its threshold
ATOL = 2e-5


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@torch.no_grad()
def _resid(model, ids):
    """h at layers.0.resid_post (the output of decoder layer 0), [B, T, D]."""
    got = {}
    hook = model.model.layers[0].register_forward_hook(
        lambda m, a, o: got.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach()))
    model(ids)
    hook.remove()
    return got["h"]


@torch.no_grad()
def _logits_with(model, ids, edit, rows=None):
    """Logits with ``edit(h) -> h'`` on layer 0's output (on batch rows ``rows`` only, all by default)."""
    def fn(m, a, o):
        h = o[0] if isinstance(o, tuple) else o
        new = edit(h)
        if rows is not None:
            keep = torch.zeros(h.shape[0], 1, 1, dtype=torch.bool)
            keep[rows] = True
            new = torch.where(keep, new, h)
        return (new,) + tuple(o[1:]) if isinstance(o, tuple) else new
    hook = model.model.layers[0].register_forward_hook(fn)
    try:
        return model(ids).logits
    finally:
        hook.remove()


@torch.no_grad()
def _patched_logits(model, ids, patches, impl, select=None):
    handle = (fp.apply if impl == "fused" else fp.hooks.apply)(model, patches)
    try:
        if select is not None:
            handle.select(select)
        return model(ids).logits
    finally:
        handle.remove()


def _weights(seed, d_in=D, d_sae=DSAE):
    g = torch.Generator().manual_seed(seed)
    return dict(W_enc=torch.randn(d_in, d_sae, generator=g) * 5.0, W_dec=torch.randn(d_sae, d_in, generator=g) * 0.05,
                b_enc=torch.randn(d_sae, generator=g) * 0.2, b_dec=torch.randn(d_in, generator=g) * 0.02)


def _thresholds(z: torch.Tensor):
    """Per feature: θ at the middle of the widest gap between the positive pre-activations ``z`` [N, F] seen
    on the test tokens, so that the feature fires on some tokens and not on others; the features whose gap
    is at least 2·MARGIN (the ones the edits use) are returned too."""
    theta = torch.full((z.shape[1],), 1e3)
    good = []
    for i in range(z.shape[1]):
        v = torch.sort(z[:, i][z[:, i] > MARGIN]).values
        if len(v) < 2:
            continue
        gaps = v[1:] - v[:-1]
        j = int(gaps.argmax())
        theta[i] = (v[j] + v[j + 1]) / 2
        if float(gaps[j]) >= 2 * MARGIN:
            good.append(i)
    return theta, good


# ---------------------------------------------------------------------------------------------------------
# Gemma Scope params.npz and the refusals: no sae_lens needed


def _gemma_scope(tmp_path, model, ids):
    w = _weights(5)
    z = (_resid(model, ids).reshape(-1, D) @ w["W_enc"] + w["b_enc"])  # no b_dec on the input
    theta, good = _thresholds(z)
    path = tmp_path / "params.npz"
    np.savez(path, threshold=theta.numpy(), **{k: v.numpy() for k, v in w.items()})
    return path, w, theta, good


def test_gemma_scope_npz_clamp_ablate_scale_steer(tmp_path, model):
    ids = _ids()
    path, w, theta, good = _gemma_scope(tmp_path, model, ids)
    assert len(good) >= 3, "the random SAE should have features with a clear jump on these tokens"
    feats = good[:3]
    sae = fp.sae.load(path, site=SITE)
    assert (sae.site, sae.d_sae, sae.d_in, sae.architecture) == (SITE, DSAE, D, "jumprelu")

    def f(h):  # Gemma Scope's JumpReLU, written out
        zz = h @ w["W_enc"] + w["b_enc"]
        return torch.relu(zz) * (zz > theta)

    h = _resid(model, ids)
    zz = h @ w["W_enc"] + w["b_enc"]
    assert float((zz[..., feats] - theta[feats]).abs().min()) > MARGIN  # no token near the jump
    fired = zz[..., feats] > theta[feats]
    assert bool(fired.any()) and not bool(fired.all())  # some tokens fire, some do not
    torch.testing.assert_close(sae.encode(h), f(h), rtol=1e-5, atol=1e-5)

    Wd = w["W_dec"]
    values = {feats[0]: 3.0, feats[1]: 0.0, feats[2]: -1.5}
    cases = [
        (sae.clamp(values), lambda h: h + sum((v - f(h)[..., i:i + 1]) * Wd[i] for i, v in values.items())),
        (sae.ablate(feats), lambda h: h - f(h)[..., feats] @ Wd[feats]),
        (sae.scale({feats[0]: 4.0, feats[1]: 0.5}),
         lambda h: h + 3.0 * f(h)[..., feats[0]:feats[0] + 1] * Wd[feats[0]]
         - 0.5 * f(h)[..., feats[1]:feats[1] + 1] * Wd[feats[1]]),
        (sae.steer({feats[0]: 2.0, 7: -1.0}), lambda h: h + 2.0 * Wd[feats[0]] - Wd[7]),
    ]
    plain = model(ids).logits.detach()
    for patch, edit in cases:
        want = _logits_with(model, ids, edit)
        assert (want - plain).abs().max() > 1e-3
        for impl in ("fused", "hooks"):
            torch.testing.assert_close(_patched_logits(model, ids, {SITE: patch}, impl), want, rtol=1e-5, atol=ATOL)
    assert isinstance(cases[0][0], fp.Encoded) and cases[0][0].rank == 3
    assert isinstance(cases[3][0], fp.Steer)


def test_npz_needs_a_site_and_all_arrays(tmp_path):
    w = _weights(1)
    path = tmp_path / "params.npz"
    np.savez(path, threshold=np.zeros(DSAE, np.float32), **{k: v.numpy() for k, v in w.items()})
    with pytest.raises(fp.sae.SAEError, match="does not name its site"):
        fp.sae.load(path)
    assert fp.sae.load(tmp_path, site=SITE).d_sae == DSAE  # the folder holding params.npz
    np.savez(path, **{k: v.numpy() for k, v in w.items()})
    with pytest.raises(fp.sae.SAEError, match=r"missing \['threshold'\]"):
        fp.sae.load(path, site=SITE)
    with pytest.raises(fp.sae.SAEError, match="no such SAE"):
        fp.sae.load(tmp_path / "nothing")


def test_refusals_before_anything_runs(tmp_path, model):
    w = _weights(2)
    sae = fp.sae.SAE(**w, threshold=torch.zeros(DSAE), architecture="jumprelu", site=SITE)
    for call in (lambda: sae.clamp({DSAE: 1.0}), lambda: sae.ablate([-1]), lambda: sae.scale({100: 2.0}),
                 lambda: sae.steer({DSAE: 1.0})):
        with pytest.raises(fp.sae.SAEError, match=f"out of range; this SAE has {DSAE} features"):
            call()
    with pytest.raises(fp.sae.SAEError, match="named twice"):
        sae.ablate([1, 1])
    with pytest.raises(fp.sae.SAEError, match="no features"):
        sae.clamp({})
    with pytest.raises(fp.sae.SAEError, match="finite"):
        sae.clamp({1: float("nan")})
    with pytest.raises(TypeError, match="ints"):
        sae.clamp({1.5: 1.0})

    # a site the model does not have (2 layers): fastpatch.apply refuses, sae.check / sae.top say why
    far = fp.sae.SAE(**w, threshold=torch.zeros(DSAE), architecture="jumprelu", site="layers.7.resid_post")
    with pytest.raises(fp.sae.SAEError, match="layer 7 is out of range; the model has 2 layers"):
        far.check(model)
    with pytest.raises(ValueError, match="out of range"):
        fp.apply(model, {far.site: far.clamp({0: 1.0})})
    with pytest.raises(fp.sae.SAEError, match="out of range"):
        far.top(model, None, "never tokenized")

    # d_in that is not the model's hidden size
    small = fp.sae.SAE(**_weights(3, d_in=32), architecture="standard", site=SITE)
    with pytest.raises(fp.sae.SAEError, match="d_in is 32, the model's hidden size is 64"):
        small.check(model)
    for apply in (fp.apply, fp.hooks.apply):
        with pytest.raises(ValueError, match="hidden size 32 differs from the model's hidden size 64"):
            apply(model, {SITE: small.ablate([0])})

    # TopK: steer only
    topk = fp.sae.SAE(**w, architecture="topk", k=4, site=SITE)
    for call in (lambda: topk.clamp({0: 1.0}), lambda: topk.ablate([0]), lambda: topk.scale({0: 2.0})):
        with pytest.raises(fp.sae.SAEError, match="not exact for a TopK SAE"):
            call()
    assert isinstance(topk.steer({0: 1.0}), fp.Steer)

    with pytest.raises(fp.sae.SAEError, match="not a site name"):
        fp.sae.SAE(**w, architecture="standard", site="blocks.0.hook_resid_post")


def _write_saelens_folder(folder, cfg, weights):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def test_saelens_cfg_refusals_without_sae_lens(tmp_path):
    w = _weights(4)
    base = {"architecture": "standard", "d_in": D, "d_sae": DSAE, "apply_b_dec_to_input": True,
            "normalize_activations": "none", "metadata": {"hook_name": HOOK}}
    ok = fp.sae.load(_write_saelens_folder(tmp_path / "ok", base, w))
    assert (ok.site, ok.architecture, ok.d_sae) == (SITE, "standard", DSAE)
    old = fp.sae.load(_write_saelens_folder(tmp_path / "old", {"d_in": D, "d_sae": DSAE,
                                                                 "hook_name": "blocks.1.hook_resid_pre"}, w))
    assert old.site == "layers.1.resid_pre" and old.apply_b_dec_to_input
    assert fp.sae.load(tmp_path / "ok", site="layers.1.resid_mid").site == "layers.1.resid_mid"
    assert fp.sae.site_of_hook("blocks.12.hook_resid_mid") == "layers.12.resid_mid"
    bad = [
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
        ({"normalize_activations": "layer_norm"}, "per-token"),
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"metadata": {"hook_name": "blocks.0.attn.hook_z"}}, "not a residual-stream hook"),
        ({"metadata": {}}, "names no hook"),
        ({"reshape_activations": "hook_z"}, "hook_z"),
        ({"architecture": None, "activation_fn": "tanh-relu"}, "activation_fn 'tanh-relu' is not supported"),
        ({"d_in": 65}, "d_in=65"),
    ]
    for n, (change, msg) in enumerate(bad):
        folder = _write_saelens_folder(tmp_path / f"bad{n}", {**base, **change}, w)
        with pytest.raises(fp.sae.SAEError, match=msg):
            fp.sae.load(folder)
    folder = _write_saelens_folder(tmp_path / "jr", {**base, "architecture": "jumprelu"}, w)
    with pytest.raises(fp.sae.SAEError, match="lack 'threshold'"):
        fp.sae.load(folder)


# ---------------------------------------------------------------------------------------------------------
# against SAELens


@pytest.fixture(scope="module")
def saes(tmp_path_factory, model):
    """SAELens standard and JumpReLU SAEs (random weights, b_dec ≠ 0) written with SAELens' save_model."""
    sl = import_sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    root = tmp_path_factory.mktemp("saes")
    h = _resid(model, _ids()).reshape(-1, D)
    out = {}
    for arch, seed in (("standard", 21), ("jumprelu", 22)):
        cls, cfg_cls = (sl.StandardSAE, sl.StandardSAEConfig) if arch == "standard" else \
            (sl.JumpReLUSAE, sl.JumpReLUSAEConfig)
        sae = cls(cfg_cls(d_in=D, d_sae=DSAE, apply_b_dec_to_input=True,
                          metadata=SAEMetadata(hook_name=HOOK, model_name="tiny-llama")))
        w = _weights(seed)
        state = {"W_enc": w["W_enc"], "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        good = list(range(DSAE))
        if arch == "jumprelu":
            theta, good = _thresholds((h - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
            state["threshold"] = theta
        sae.load_state_dict(state)
        sae.save_model(root / arch)
        out[arch] = (root / arch, good)
    return out


def _oracle(folder):
    from sae_lens import SAE

    s = SAE.load_from_disk(str(folder))
    W = s.W_dec.detach()
    return (lambda h: s.encode(h).detach()), W


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_feature_edits_match_saelens(arch, saes, model, tmp_path):
    folder, good = saes[arch]
    encode, Wd = _oracle(folder)
    sae = fp.sae.load(folder)
    assert (sae.site, sae.d_sae, sae.architecture) == (SITE, DSAE, arch)
    ids = _ids()
    h = _resid(model, ids)
    torch.testing.assert_close(sae.encode(h), encode(h), rtol=1e-5, atol=1e-6)

    f0 = encode(h)
    feats = [i for i in good if bool((f0[..., i] > 0).any()) and not bool((f0[..., i] > 0).all())][:3]
    assert len(feats) == 3, "the random SAE should have features that fire on some tokens and not on others"
    if arch == "jumprelu":
        from sae_lens import SAE

        s = SAE.load_from_disk(str(folder))
        z = ((h - s.b_dec) @ s.W_enc + s.b_enc).detach()
        assert float((z[..., feats] - s.threshold[feats].detach()).abs().min()) > MARGIN  # no token near the jump

    def f(h, i):
        return encode(h)[..., i:i + 1]

    values = {feats[0]: 2.5, feats[1]: 0.0, feats[2]: -1.0}
    cases = {
        "clamp": (sae.clamp(values), lambda h: h + sum((v - f(h, i)) * Wd[i] for i, v in values.items())),
        "ablate": (sae.ablate(feats[:2]), lambda h: h - sum(f(h, i) * Wd[i] for i in feats[:2])),
        "scale": (sae.scale({feats[0]: 3.0, feats[2]: 0.0}),
                  lambda h: h + 2.0 * f(h, feats[0]) * Wd[feats[0]] - f(h, feats[2]) * Wd[feats[2]]),
        "steer": (sae.steer({feats[0]: 1.5, 3: -2.0}), lambda h: h + 1.5 * Wd[feats[0]] - 2.0 * Wd[3]),
    }
    plain = model(ids).logits.detach()
    for name, (patch, edit) in cases.items():
        want = _logits_with(model, ids, edit)
        assert (want - plain).abs().max() > 1e-3, name
        for impl in ("fused", "hooks"):
            got = _patched_logits(model, ids, {SITE: patch}, impl)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL, msg=lambda m: f"{name} {impl}: {m}")
        # a saved-and-loaded patch file gives the same edit
        path = tmp_path / f"{name}.safetensors"
        fp.save({SITE: patch}, path)
        got = _patched_logits(model, ids, fp.load(path), "fused")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL, msg=lambda m: f"{name} file: {m}")

    # a PatchBank of two edits, one per sequence with select(); the second sequence is left alone by -1
    clamp, ablate = cases["clamp"][0], cases["ablate"][0]
    bank = fp.PatchBank([clamp, ablate], D)
    want0 = _logits_with(model, ids, cases["clamp"][1], rows=[0])
    for impl in ("fused", "hooks"):
        got = _patched_logits(model, ids, {SITE: bank}, impl, select=torch.tensor([0, -1]))
        torch.testing.assert_close(got, want0, rtol=1e-5, atol=ATOL)
    want1 = _logits_with(model, ids, cases["ablate"][1], rows=[1])
    got = _patched_logits(model, ids, {SITE: bank}, "fused", select=torch.tensor([-1, 1]))
    torch.testing.assert_close(got, want1, rtol=1e-5, atol=ATOL)

    # Scoped: the clamp on the first 3 positions only
    def first3(h):
        out = h.clone()
        out[:, :3] = cases["clamp"][1](h[:, :3])
        return out
    want = _logits_with(model, ids, first3)
    for impl in ("fused", "hooks"):
        got = _patched_logits(model, ids, {SITE: fp.Scoped(clamp, "f3")}, impl)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL)


class _Tok:
    """A stand-in tokenizer for the tiny model: one token per character."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_top_features_per_token(saes, model):
    folder, _ = saes["jumprelu"]
    encode, _ = _oracle(folder)
    sae = fp.sae.load(folder)
    top = sae.top(model, _Tok(), "hello world", k=4)
    assert [t for t, _ in top] == list("hello world")
    h = _resid(model, torch.tensor([[ord(c) for c in "hello world"]]))[0]
    f = encode(h)
    for t, (_, feats) in enumerate(top):
        vals, idx = f[t].topk(4)
        want = [(int(i), float(v)) for i, v in zip(idx, vals) if v > 0]
        assert [i for i, _ in feats] == [i for i, _ in want]
        np.testing.assert_allclose([v for _, v in feats], [v for _, v in want], rtol=1e-5, atol=1e-6)
    assert any(feats for _, feats in top)


def test_topk_saelens_steer_and_encode(tmp_path, model):
    sl = import_sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    for rescale in (False, True):
        s = sl.TopKSAE(sl.TopKSAEConfig(d_in=D, d_sae=DSAE, k=5, rescale_acts_by_decoder_norm=rescale,
                                        metadata=SAEMetadata(hook_name=HOOK)))
        s.load_state_dict(_weights(31))
        folder = tmp_path / f"topk{int(rescale)}"
        s.save_model(folder)
        s = sl.SAE.load_from_disk(str(folder))
        sae = fp.sae.load(folder)
        assert (sae.architecture, sae.k) == ("topk", 5)
        ids = _ids()
        h = _resid(model, ids)
        torch.testing.assert_close(sae.encode(h), s.encode(h).detach(), rtol=1e-5, atol=1e-6)
        # steer adds what s.decode adds for one unit of each feature
        acts = torch.zeros(DSAE)
        acts[2], acts[9] = 1.5, -0.5
        delta = (s.decode(acts[None]) - s.decode(torch.zeros(1, DSAE))).detach()[0]
        want = _logits_with(model, ids, lambda h: h + delta)
        got = _patched_logits(model, ids, {SITE: sae.steer({2: 1.5, 9: -0.5})}, "fused")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=ATOL)
        with pytest.raises(fp.sae.SAEError, match="not exact for a TopK SAE"):
            sae.clamp({2: 1.0})


def test_saelens_refuses_what_saelens_writes_with_normalization(tmp_path):
    sl = import_sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    s = sl.StandardSAE(sl.StandardSAEConfig(d_in=D, d_sae=DSAE, normalize_activations="layer_norm",
                                            metadata=SAEMetadata(hook_name=HOOK)))
    s.save_model(tmp_path / "ln")
    with pytest.raises(fp.sae.SAEError, match="normalize_activations='layer_norm'"):
        fp.sae.load(tmp_path / "ln")
