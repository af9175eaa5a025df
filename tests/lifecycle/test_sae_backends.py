"""SAELens SAEs' feature edits through every kernel backend's fused residual-add + patch + norm.

Fixtures: SAELens ``StandardSAE`` / ``JumpReLUSAE`` objects written with their own ``save_model`` (random
weights, b_dec ≠ 0, thresholds placed between the test rows' pre-activations with no row within MARGIN of
a jump). Oracle: ``SAE.load_from_disk(..., dtype="float64").encode()`` and its ``W_dec``, the edit and the
norm written out here in float64. Grid: backend (reference, cpp, triton: the interpreter on CPU under ``-m slow``,
and on a GPU cuda + triton, marked ``gpu``) × dtype × architecture × edit (clamp / ablate / scale of 1, 8 or 32
features) × norm × residual × index (one edit on every row, or a bank of three edits with −1 rows).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fastpatch as fp
from fastpatch.kernels import backends

from casegen import DTYPES, TOLERANCES, poisoned_like
from sae_lens_util import import_sae_lens

D, DSAE, ROWS = 64, 96, 48
HOOK = "blocks.0.hook_resid_post"
MARGIN = 0.05  # no row's JumpReLU pre-activation lies closer than this to its threshold (z is O(1..10))
RANKS = (1, 8, 32)


def _rows(dtype, residual):
    """The test rows (x, residual) in ``dtype``, and h = x + residual in float64 from the rounded inputs."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, D, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(ROWS, D, generator=g, dtype=torch.float64).to(dtype)
    h = x.double() + r.double() if residual else x.double()
    return x, (r if residual else None), h


def _all_h():
    return torch.cat([_rows(dt, res)[2] for dt, res in itertools.product(DTYPES, (True, False))])


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    sl = import_sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    root = tmp_path_factory.mktemp("sae_backends")
    h = _all_h()
    out = {}
    for arch, seed in (("standard", 41), ("jumprelu", 42)):
        g = torch.Generator().manual_seed(seed)
        w = dict(W_enc=torch.randn(D, DSAE, generator=g) * (3 / D**0.5),
                 W_dec=torch.randn(DSAE, D, generator=g) * (0.5 / D**0.5),
                 b_enc=torch.randn(DSAE, generator=g) * 0.5, b_dec=torch.randn(D, generator=g) * 0.1)
        cls, cfg_cls = (sl.StandardSAE, sl.StandardSAEConfig) if arch == "standard" else \
            (sl.JumpReLUSAE, sl.JumpReLUSAEConfig)
        sae = cls(cfg_cls(d_in=D, d_sae=DSAE, apply_b_dec_to_input=True, metadata=SAEMetadata(hook_name=HOOK)))
        feats = list(range(DSAE))
        if arch == "jumprelu":
            z = (h - w["b_dec"].double()) @ w["W_enc"].double() + w["b_enc"].double()  # every case's rows
            theta, feats = torch.full((DSAE,), 1e3), []
            for i in range(DSAE):
                v = torch.sort(z[:, i][z[:, i] > MARGIN]).values
                if len(v) < 4:
                    continue
                lo, hi = len(v) // 4, (3 * len(v)) // 4  # a gap in the middle: fires on some rows, not others
                gaps = v[lo + 1:hi + 1] - v[lo:hi]
                j = int(gaps.argmax()) + lo
                if float(gaps[j - lo]) >= 2 * MARGIN:
                    theta[i] = float((v[j] + v[j + 1]) / 2)
                    feats.append(i)
            w["threshold"] = theta
        sae.load_state_dict(w)
        sae.save_model(root / arch)
        assert len(feats) >= 3 * max(RANKS) // 2, f"{arch}: too few features with a clear jump ({len(feats)})"
        out[arch] = (root / arch, feats)
    return out


def _oracle(folder):
    """SAELens' float64 encode and W_dec."""
    from sae_lens import SAE

    s = SAE.load_from_disk(str(folder), dtype="float64")
    return (lambda h: s.encode(h).detach()), s.W_dec.detach(), s


def _edits(sae, feats, rank, encode, W_dec):
    """(fastpatch patch, float64 oracle edit h -> h') for clamp, ablate and scale of ``rank`` features."""
    g = torch.Generator().manual_seed(rank)
    pick = [feats[int(i)] for i in torch.randperm(len(feats), generator=g)[:rank]]
    vals = (torch.rand(rank, generator=g, dtype=torch.float64) * 6 - 2).tolist()
    ks = (torch.rand(rank, generator=g, dtype=torch.float64) * 3).tolist()
    Wd = W_dec[pick]  # [r, D]

    def clamp(h):
        return h + (torch.tensor(vals, dtype=torch.float64) - encode(h)[:, pick]) @ Wd

    def ablate(h):
        return h - encode(h)[:, pick] @ Wd

    def scale(h):
        return h + (encode(h)[:, pick] * (torch.tensor(ks, dtype=torch.float64) - 1)) @ Wd

    return {"clamp": (sae.clamp(dict(zip(pick, vals))), clamp), "ablate": (sae.ablate(pick), ablate),
            "scale": (sae.scale(dict(zip(pick, ks))), scale)}


def _norm(h, weight, bias, norm, eps=1e-6):
    if norm == "rms":
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
    c = h - h.mean(-1, keepdim=True)
    return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps) * weight + bias


def _params():
    out = []
    for backend, device in (("reference", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("cuda", "cuda"),
                            ("triton", "cuda")):
        # the Triton interpreter takes ~10 s a case set here: -m slow (tests/kernels runs its relu / jumprelu grid)
        marks = [pytest.mark.gpu] if device == "cuda" else [pytest.mark.slow] if backend == "triton" else []
        out.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return out


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
@pytest.mark.parametrize("backend,device", _params())
def test_sae_edits_every_backend(backend, device, arch, saes):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not backends.load(backend).is_available(torch.device(device)):
        pytest.skip(f"backend {backend} unavailable on {device}")
    folder, feats = saes[arch]
    encode, W_dec, s = _oracle(folder)
    sae = fp.sae.load(folder)
    assert sae.architecture == arch
    interp = backend == "triton" and device == "cpu"  # the Triton interpreter is slow: fewer cases
    checked = fired = 0
    for rank in RANKS:
        edits = _edits(sae, feats, rank, encode, W_dec)
        grid = itertools.product(DTYPES, ("rms", "layer"), (True, False), ("none", "mixed"))
        for n, (dtype, norm, residual, index_mode) in enumerate(grid):
            if interp and n % 8 != rank % 8:
                continue
            x, r, h = _rows(dtype, residual)
            g = torch.Generator().manual_seed(n)
            weight = (1 + 0.3 * torch.randn(D, generator=g, dtype=torch.float64)).to(dtype)
            bias = (0.2 * torch.randn(D, generator=g, dtype=torch.float64)).to(dtype) if norm == "layer" else None
            names = list(edits)
            if index_mode == "none":
                name = names[n % 3]
                bank, index = fp.PatchBank([edits[name][0]], D), None
                want_h = edits[name][1](h)
            else:
                bank = fp.PatchBank([edits[k][0] for k in names], D)
                index = torch.randint(-1, 3, (ROWS,), generator=g)
                want_h = h.clone()
                for k, name in enumerate(names):
                    rows = index == k
                    want_h[rows] = edits[name][1](h[rows]) if bool(rows.any()) else want_h[rows]
            if arch == "jumprelu":  # the rows sit clear of every jump (what the thresholds were placed for)
                z = (h - s.b_dec.detach()) @ s.W_enc.detach() + s.b_enc.detach()
                assert float((z[:, feats] - s.threshold.detach()[feats]).abs().min()) > MARGIN
                fired += int((z[:, feats] > s.threshold.detach()[feats]).sum())
            want_out = _norm(want_h, weight.double(), None if bias is None else bias.double(), norm)
            dev = torch.device(device)

            def mv(t):
                return None if t is None else t.to(dev)

            out, res_out = poisoned_like(mv(x)), poisoned_like(mv(x))
            fp.fused_add_norm(mv(x), mv(r), mv(weight), bias=mv(bias), norm=norm, bank=bank.to(dev),
                              index=mv(index), out=out, residual_out=res_out, backend=backend)
            rtol, atol = TOLERANCES[dtype]
            what = f"{backend}/{device} {arch} rank {rank} {dtype} {norm} residual={residual} index={index_mode}"
            torch.testing.assert_close(res_out.cpu().double(), want_h, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what}: residual_out: {m}")
            torch.testing.assert_close(out.cpu().double(), want_out, rtol=rtol, atol=atol,
                                       msg=lambda m: f"{what}: out: {m}")
            assert (want_h - h).abs().max() > 1e-2, what  # the edit changes something
            checked += 1
    assert checked == (9 if interp else 72)
    if arch == "jumprelu":
        assert fired > 0
