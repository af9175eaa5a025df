"""The float64 oracle against independent, direct formulas for each patch kind."""
import pytest
import torch
import torch.nn.functional as F

import fastpatch as fp
from fastpatch import reference

from casegen import make_case, make_patch, run_backend, assert_matches_reference

D = 37


def _h(n=6, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _patched(patch, h):
    bank = fp.PatchBank([patch], D, dtype=torch.float32)
    # exact bank parameters: compare in float64 through the f64 copy the bank keeps
    return reference.patch_rows(h, bank, None)


def test_steer_adds_scaled_vector():
    v = torch.randn(D, dtype=torch.float64)
    h = _h()
    torch.testing.assert_close(_patched(fp.Steer(v, scale=2.5), h), h + 2.5 * v)


def test_ablate_removes_projection():
    u = torch.randn(D, dtype=torch.float64)
    h = _h()
    out = _patched(fp.Ablate(u), h)
    uh = u / u.norm()
    torch.testing.assert_close(out @ uh, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, h - (h @ uh)[:, None] * uh)


def test_clamp_sets_projection():
    u = torch.randn(D, dtype=torch.float64)
    out = _patched(fp.Clamp(u, 1.75), _h())
    torch.testing.assert_close(out @ (u / u.norm()), torch.full((6,), 1.75, dtype=torch.float64))


def test_lowrank_formula():
    f64 = dict(dtype=torch.float64)
    A, B, c = torch.randn(D, 3, **f64), torch.randn(3, D, **f64), torch.randn(3, **f64)
    h = _h()
    torch.testing.assert_close(_patched(fp.LowRank(A, B, bias=c, scale=0.5), h), h + 0.5 * (h @ A + c) @ B)


def test_loreft_formula():
    f64 = dict(dtype=torch.float64)
    R, W, b = torch.randn(2, D, **f64), torch.randn(2, D, **f64), torch.randn(2, **f64)
    h = _h()
    expected = h + (h @ W.T + b - h @ R.T) @ R
    torch.testing.assert_close(_patched(fp.LoReFT(R, W, b), h), expected)


@pytest.mark.parametrize("metric", ["cosine", "projection"])
@pytest.mark.parametrize("fire", ["above", "below"])
def test_gate_fires_where_metric_crosses_threshold(metric, fire):
    v, c = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    h = _h(50)
    thr = 0.05 if metric == "cosine" else 0.3
    out = _patched(fp.Gated(fp.Steer(v), c, thr, metric=metric, fire=fire), h)
    m = (h @ c) / c.norm()
    if metric == "cosine":
        m = m / h.norm(dim=-1)
    fires = (m > thr) if fire == "above" else (m < thr)
    assert 0 < int(fires.sum()) < 50
    torch.testing.assert_close(out, h + fires[:, None].double() * v)


def test_cosine_gate_zero_row_has_metric_zero():
    v, c = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    h = torch.zeros(2, D, dtype=torch.float64)
    out_below = _patched(fp.Gated(fp.Steer(v), c, 0.1, fire="below"), h)  # 0 < 0.1 fires
    out_above = _patched(fp.Gated(fp.Steer(v), c, -0.1, fire="above"), h)  # 0 > -0.1 fires
    torch.testing.assert_close(out_below, v.expand(2, D))
    torch.testing.assert_close(out_above, v.expand(2, D))


def test_index_selects_patch_per_row_and_counts_fires():
    gen = torch.Generator().manual_seed(3)
    patches = [make_patch(k, D, gen) for k in ("steer", "lowrank", "clamp")]
    bank = fp.PatchBank(patches, D)
    h = _h(7)
    index = torch.tensor([0, -1, 1, 2, 2, -1, 0])
    counts = torch.zeros(3, dtype=torch.int32)
    out = reference.patch_rows(h, bank, index, counts)
    for i, k in enumerate(index.tolist()):
        expected = h[i] if k < 0 else patches[k].canonical().apply(h[i:i + 1])[0]
        torch.testing.assert_close(out[i], expected)
    assert counts.tolist() == [2, 1, 2]


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_norms_match_torch(norm):
    x = torch.randn(5, D, dtype=torch.float64)
    w, b = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    if norm == "rms":
        out, res = reference.fused_add_norm(x, None, w, eps=1e-5, norm="rms")
        torch.testing.assert_close(out, F.rms_norm(x, (D,), w, eps=1e-5))
    else:
        out, res = reference.fused_add_norm(x, None, w, bias=b, eps=1e-5, norm="layer")
        torch.testing.assert_close(out, F.layer_norm(x, (D,), w, b, eps=1e-5))
    torch.testing.assert_close(res, x)


def test_weight_offset_scales_by_one_plus_weight():
    x, r, w = torch.randn(4, D), torch.randn(4, D), torch.randn(D)
    out, _ = reference.fused_add_norm(x, r, w, weight_offset=1.0, exact=True)
    h = (x + r).double()
    torch.testing.assert_close(out, F.rms_norm(h, (D,), eps=1e-6) * (1 + w.double()))


@pytest.mark.parametrize("kind", ["steer", "ablate", "clamp", "lowrank", "loreft", "mix"])
def test_reference_backend_through_public_op(kind):
    case = make_case(9, D, torch.float32, kind=kind, gated=True, index_mode="mixed")
    out, res = run_backend(case, "reference")
    assert_matches_reference(case, out, res)
