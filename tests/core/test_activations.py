"""Per-component activations of the canonical patch (identity, ReLU, JumpReLU): the patch form, the
bank, the float64 reference, autograd, patch files, compose and GGUF.

The kernel grid every backend shares (tests/kernels/test_backend_grid.py) runs the
activation kinds of tests/casegen.py (ACT_KINDS) against the reference like every other kind.
"""
from __future__ import annotations

import json

import pytest
import torch

import fastpatch as fp
from fastpatch import reference
from fastpatch.core.patches import ACT_IDENTITY, ACT_JUMPRELU, ACT_RELU, CanonicalPatch
from fastpatch.files import patch_file
from fastpatch.kernels import autograd as ag
from fastpatch.kernels.backends import NormSpec, reference_backend

from casegen import make_case, make_patch, run_backend, assert_matches_reference, jump_thresholds

D = 24


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _saelens_jumprelu(z, theta):
    """SAELens' JumpReLUSAE.encode: ReLU(hidden_pre) * (hidden_pre > threshold)."""
    return torch.relu(z) * (z > theta).to(z.dtype)


# --- the patch form ----------------------------------------------------------------------------------

def test_encoded_matches_saelens_formulas():
    down, bias, up = _rand(5, D, seed=1), _rand(5, seed=2), _rand(5, D, seed=3)
    theta = torch.tensor([0.5, -0.7, 0.0, 1.5, -0.1], dtype=torch.float64)  # negative θ: ReLU still applies
    h = _rand(40, D, seed=4)
    z = h @ down.T + bias
    relu = fp.Encoded(down, bias, up, activation="relu")
    jump = fp.Encoded(down, bias, up, activation="jumprelu", threshold=theta)
    ident = fp.Encoded(down, bias, up, activation="identity")
    torch.testing.assert_close(relu.apply(h), h + torch.relu(z) @ up)
    torch.testing.assert_close(jump.apply(h), h + _saelens_jumprelu(z, theta) @ up)
    torch.testing.assert_close(ident.apply(h), h + z @ up)
    # an SAE clamp: h' = h + Σ (value_i − f_i(h))·d_i written as an Encoded with up = −d plus a shift
    d = _rand(5, D, seed=5)
    values = torch.tensor([2.0, 0.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    clamp = fp.Encoded(down, bias, -d, shift=values @ d, activation="jumprelu", threshold=theta)
    torch.testing.assert_close(clamp.apply(h), h + (values - _saelens_jumprelu(z, theta)) @ d)
    assert (_saelens_jumprelu(z, theta) > 0).any() and (_saelens_jumprelu(z, theta) == 0).any()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(activation="gelu"), ValueError, "not one of"),
    (dict(activation="jumprelu"), ValueError, "needs threshold"),
    (dict(activation="jumprelu", threshold=torch.zeros(2)), ValueError, r"shape \(3,\)"),
    (dict(activation="relu", threshold=torch.zeros(3)), ValueError, "only used by jumprelu"),
    (dict(activation=("relu", "identity")), ValueError, "one name per component"),
    (dict(activation=3), TypeError, "activation must be"),
    (dict(activation="jumprelu", threshold=torch.tensor([0.0, float("nan"), 1.0])), ValueError, "NaN"),
])
def test_activation_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        fp.Encoded(_rand(3, D), None, _rand(3, D), **kwargs)


def test_canonical_per_component_activations():
    theta = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)
    c = CanonicalPatch(_rand(3, D), _rand(3), _rand(3, D), torch.zeros(D, dtype=torch.float64),
                       activation=("identity", "jumprelu", "relu"), threshold=theta)
    assert c.activations == ("identity", "jumprelu", "relu") and not c.is_identity
    h = _rand(30, D, seed=9)
    z = h @ c.down.T + c.bias
    phi = torch.stack([z[:, 0], _saelens_jumprelu(z[:, 1], 0.3), torch.relu(z[:, 2])], dim=1)
    torch.testing.assert_close(c.apply(h), h + phi @ c.up)
    same = CanonicalPatch(c.down, c.bias, c.up, c.shift, activation=("relu",) * 3)
    assert same.activation == "relu"  # one name for all is kept in the plain form
    assert fp.Steer(_rand(D)).canonical().is_identity and fp.LowRank(_rand(D, 2), _rand(2, D)).canonical().is_identity


def test_gated_keeps_activation():
    e = fp.Encoded(_rand(3, D), _rand(3), _rand(3, D), activation="jumprelu", threshold=torch.full((3,), 0.2))
    g = fp.Gated(e, _rand(D, seed=7), 0.0).canonical()
    assert g.activation == "jumprelu" and torch.equal(g.threshold, e.canonical().threshold)


# --- the bank and the reference ----------------------------------------------------------------------

def test_bank_mixed_activations_index_and_padding():
    h = _rand(40, D, seed=11)
    gen = torch.Generator().manual_seed(12)
    patches = [make_patch("lowrank", D, gen, rank=6), make_patch("relu", D, gen, rank=2),
               make_patch("jumprelu", D, gen, rank=4, h=h), fp.Steer(_rand(D, seed=13))]
    bank = fp.PatchBank(patches, D)
    assert bank.rank == 6 and bank.has_activation
    assert bank.act_mode[1].tolist() == [ACT_RELU] * 2 + [ACT_IDENTITY] * 4  # padding: identity
    assert bank.act_mode[2, :4].tolist() == [ACT_JUMPRELU] * 4
    t = bank.act_threshold
    assert t.dtype == torch.float32 and t.shape == (4, 6)
    assert torch.isinf(t[0]).all() and (t[1, :2] == 0).all() and torch.isinf(t[1, 2:]).all()
    theta = patches[2].canonical().threshold
    torch.testing.assert_close(t[2, :4].double(), theta.clamp(min=0).float().double())
    idx = torch.arange(40) % 5 - 1  # −1, 0, 1, 2, 3, −1, ...
    got = reference.patch_rows(h, bank, idx)
    for k in range(-1, 4):
        rows = idx == k
        want = h[rows] if k < 0 else patches[k].apply(h[rows])
        torch.testing.assert_close(got[rows], want)
    assert not fp.PatchBank([fp.Steer(_rand(D)), fp.LowRank(_rand(D, 2), _rand(2, D))]).has_activation
    assert fp.PatchBank([fp.Steer(_rand(D))]).act_threshold is None


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_public_op_odd_sizes(backend, dtype):
    for N, Dn, seed in ((1, 1, 1), (5, 33, 2), (67, 129, 3)):
        case = make_case(N, Dn, dtype, kind="actmix", index_mode="mixed", num_patches=4, seed=seed, gated=Dn > 1,
                         metric="projection")
        out, res = run_backend(case, backend)
        assert_matches_reference(case, out, res)


def test_cpp_fast_path_plan_reads_the_activation():
    """Repeated calls with the same bank take the C++ plan (fastpatch/kernels/ops.py), which must hold
    act_threshold too: each call is compared with the reference, and the values change between calls."""
    case = make_case(9, 40, torch.float32, kind="actmix", index_mode="mixed", num_patches=4, seed=8)
    for _ in range(3):
        out, res = fp.fused_add_norm(case.x, case.residual, case.weight, backend="cpp", **case.kwargs())
        assert_matches_reference(case, out, res)
        case.x = case.x + 0.01  # new values, same objects for the plan


def test_casegen_thresholds_split_rows():
    h = _rand(64, D, seed=21)
    down, bias = _rand(4, D, seed=22) / D**0.5, _rand(4, seed=23) * 0.5
    thr = jump_thresholds(h, down, bias)
    z = h @ down.T + bias
    assert ((z > thr).any(0) & (z <= thr).any(0)).all()  # every component: some rows pass, some do not


# --- autograd ----------------------------------------------------------------------------------------

def _grads_vs_reference(bank, x, r, w, idx, dtype, backend):
    from test_training import TRAINED, _close, _reference_grads
    o, h = ag.fused_add_norm(x, r, w, eps=1e-5, bank=bank, index=idx, backend=backend)
    g = torch.Generator().manual_seed(99)
    g_out, g_res = torch.randn(*x.shape, generator=g), torch.randn(*x.shape, generator=g)
    ((o.float() * g_out).sum() + (h.float() * g_res).sum()).backward()
    ro, rh, rg = _reference_grads(x, r, w, None, bank, idx, "rms", 1e-5, 0.0, g_out, g_res)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _close(o, ro, tol, "out")
    _close(h, rh, tol, "residual_out")
    ours = {"x": x.grad, "residual": None if r is None else r.grad, "weight": w.grad, "norm_bias": None}
    ours.update({n: getattr(bank, n).grad for n in TRAINED})
    for name, ref in rg.items():
        if ref is not None:
            _close(ours[name], ref, tol, f"grad {name}")
    return ours


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_matches_reference(backend, dtype):
    N = 23
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(N, D, generator=gen).to(dtype)
    r = torch.randn(N, D, generator=gen).to(dtype)
    h = x.double() + r.double()
    patches = [make_patch("lowrank", D, gen, rank=3), make_patch("relu", D, gen, rank=4),
               make_patch("jumprelu", D, gen, rank=4, h=h), make_patch("steer", D, gen)]
    bank = ag.TrainableBank(patches, D)
    assert bank.has_activation
    idx = torch.randint(-1, 4, (N,), generator=gen)
    idx[:5] = torch.tensor([-1, 0, 1, 2, 3])
    w = torch.randn(D, generator=gen).to(dtype).requires_grad_()
    ours = _grads_vs_reference(bank, x.requires_grad_(), r.requires_grad_(), w, idx, dtype, backend)
    # not vacuous: the JumpReLU patch's inactive components get no down gradient, its active ones do
    assert ours["down"][2].abs().sum() > 0 and ours["up"][1].abs().sum() > 0


def test_autograd_one_patch_every_row():
    """index=None, one jumprelu patch: the gather-free path."""
    gen = torch.Generator().manual_seed(41)
    x, r = torch.randn(9, D, generator=gen), torch.randn(9, D, generator=gen)
    bank = ag.TrainableBank([make_patch("jumprelu", D, gen, rank=3, h=x.double() + r.double())], D)
    w = torch.randn(D, generator=gen).requires_grad_()
    _grads_vs_reference(bank, x.requires_grad_(), r.requires_grad_(), w, None, torch.float32, None)


def test_gradcheck_float64_with_activation():
    gen = torch.Generator().manual_seed(51)
    N = 6
    x = torch.randn(N, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h = x.detach()
    bank = ag.TrainableBank([make_patch("jumprelu", 5, gen, rank=2, h=h), make_patch("relu", 5, gen, rank=2),
                             make_patch("lowrank", 5, gen, rank=2)], 5)
    tensors = [getattr(bank, n).detach().double().requires_grad_() for n in ("down", "bias", "up", "shift")]
    idx = torch.tensor([0, -1, 1, 2, 0, 1])
    w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(x, w, down, lb, up, shift):
        return ag._FusedAddPatchNorm.apply(x, None, w, None, down, lb, up, shift, reference_backend.run,
                                           NormSpec(0, 1e-5, 0.0), bank.num_patches, None, bank.act_threshold, idx,
                                           None)

    assert torch.autograd.gradcheck(f, (x, w, *tensors), eps=1e-6, atol=1e-6)


def test_trainable_bank_keeps_activations(tmp_path):
    gen = torch.Generator().manual_seed(61)
    e = make_patch("jumprelu", D, gen, rank=3)
    bank = ag.TrainableBank([e, make_patch("lowrank", D, gen, rank=5)], D)
    c0 = bank.canonical_patches[0]
    assert c0.activations == ("jumprelu",) * 3 + ("identity",) * 2
    snap = bank.snapshot()
    torch.testing.assert_close(snap.act_threshold, bank.act_threshold)
    fp.save({"layers.0.resid_post": bank}, tmp_path / "t.safetensors")
    loaded = fp.load(tmp_path / "t.safetensors")["layers.0.resid_post"]
    assert torch.equal(loaded.act_threshold, bank.act_threshold)


# --- patch files ---------------------------------------------------------------------------------------

def test_patch_file_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(71)
    h = _rand(30, D, seed=72)
    enc = make_patch("jumprelu", D, gen, rank=3, h=h)
    patches = {
        "layers.0.resid_post": enc,
        "layers.1.resid_post": fp.Gated(make_patch("relu", D, gen, rank=2), _rand(D, seed=73), 0.1),
        "layers.2.resid_post": fp.compose(fp.Steer(_rand(D, seed=74)), enc),  # canonical, mixed components
        "layers.3.resid_post": [fp.Steer(_rand(D, seed=75)), make_patch("relu", D, gen, rank=2)],
    }
    path = tmp_path / "act.safetensors"
    fp.save(patches, path)
    manifest, _ = patch_file.read_manifest(path)
    spec0 = manifest["sites"]["layers.0.resid_post"]
    text = json.dumps(manifest)
    assert '"activation": "jumprelu"' in text and '"canonical": true' in text and "threshold" in text, spec0
    loaded = fp.load(path)
    for site, value in patches.items():
        got = loaded[site]
        want = value if isinstance(value, list) else [value]
        got = got if isinstance(got, list) else (got.patches if isinstance(got, fp.PatchBank) else [got])
        for a, b in zip(want, got):
            ca, cb = fp.core.patches.to_canonical(a), fp.core.patches.to_canonical(b)
            assert ca.activations == cb.activations, site
            torch.testing.assert_close(cb.apply(h), ca.apply(h), msg=site)
    assert isinstance(loaded["layers.0.resid_post"], fp.Encoded)


def test_old_format_file_still_loads(tmp_path):
    """A file as fastpatch wrote it before activations: canonical entries with no "activation" field."""
    c = fp.compose(fp.Ablate(_rand(D, seed=81)), fp.LowRank(_rand(D, 2, seed=82), _rand(2, D, seed=83)))
    path = tmp_path / "old.safetensors"
    fp.save({"layers.0.resid_post": c}, path)
    manifest, _ = patch_file.read_manifest(path)
    spec = manifest["sites"]["layers.0.resid_post"]
    text = json.dumps(spec)
    assert "activation" not in text and "encoded" not in text  # identity patches keep the old format
    got = fp.load(path)["layers.0.resid_post"]
    assert got.is_identity
    h = _rand(7, D, seed=84)
    torch.testing.assert_close(got.apply(h), c.apply(h))


def test_patch_file_rejects_bad_activation(tmp_path):
    e = fp.Encoded(_rand(2, D), None, _rand(2, D), activation="relu")
    path = tmp_path / "bad.safetensors"
    fp.save({"layers.0.resid_post": e}, path)
    metadata, tensors = patch_file.read_container(path)
    text = metadata[patch_file.KEY_MANIFEST]
    assert '"activation": "relu"' in text
    metadata[patch_file.KEY_MANIFEST] = text.replace('"activation": "relu"', '"activation": "gelu"')
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(fp.PatchFileError, match="gelu"):
        fp.load(path)


# --- compose and GGUF ----------------------------------------------------------------------------------

def _sequential(chain, h):
    for p in chain:
        h = p.apply(h)
    return h


def test_compose_folds_exactly_where_it_can():
    gen = torch.Generator().manual_seed(91)
    h = _rand(64, D, seed=92)
    relu, jump = make_patch("relu", D, gen, rank=3), make_patch("jumprelu", D, gen, rank=2, h=h)
    lin, steer, abl = make_patch("lowrank", D, gen, rank=2), fp.Steer(_rand(D, seed=93)), fp.Ablate(_rand(D, seed=94))
    for chain in ((relu, lin), (lin, jump), (steer, jump, abl), (abl, relu, steer), (jump,)):
        c = fp.compose(*chain)
        assert c.activations == tuple(a for p in chain for a in fp.core.patches.to_canonical(p).activations)
        torch.testing.assert_close(c.apply(h), _sequential(chain, h), rtol=1e-10, atol=1e-10)
    # an activated part feeding another activated part through a zero coupling: still exact
    # (disjoint supports, so U1·D2ᵀ is exactly 0: compose checks for an exact zero, not a rounded one)
    writes, reads = _rand(2, D, seed=95), _rand(2, D, seed=96)
    writes[:, D // 2:] = 0
    reads[:, :D // 2] = 0
    a = fp.Encoded(_rand(2, D, seed=97), _rand(2, seed=98), writes, activation="relu")
    b = fp.Encoded(reads, _rand(2, seed=99), _rand(2, D, seed=100), activation="relu")
    torch.testing.assert_close(fp.compose(a, b).apply(h), _sequential((a, b), h), rtol=1e-10, atol=1e-10)


def test_compose_refuses_activation_into_activation():
    gen = torch.Generator().manual_seed(101)
    a, b = make_patch("relu", D, gen, rank=2), make_patch("jumprelu", D, gen, rank=2)
    with pytest.raises(ValueError, match=r"part 1: component \d of the earlier part \(relu\).*\(jumprelu\).*separate"):
        fp.compose(a, b)


def test_gguf_refuses_activation(tmp_path):
    pytest.importorskip("gguf")
    e = fp.Encoded(_rand(2, D), None, _rand(2, D), activation="relu")
    with pytest.raises(ValueError, match="'relu' activation.*cannot be exported"):
        fp.export_gguf({"layers.1.resid_post": e}, tmp_path / "x.gguf")
