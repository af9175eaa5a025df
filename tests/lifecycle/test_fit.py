"""fastpatch.fit: recording (padding-aware pooling) and the maths against direct computation."""
import pytest
import torch

from fastpatch.lifecycle import fitting as F
from fastpatch.core.patches import Ablate, Clamp, LowRank, Steer

from models import tiny_model

SITE = "layers.1.resid_mid"


def _prompts(n, seed, lo=2, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _direct(model, prompt, site_layer=1):
    """The activation at layers.1.resid_mid of one unpadded prompt, by running the layers by hand."""
    from fastpatch.integrations.hf.hooks import record

    with torch.no_grad(), record(model, [SITE]) as acts:
        model(input_ids=torch.tensor([prompt]))
    return acts[SITE][0].double()


@pytest.mark.parametrize("position", ["last", "mean"])
def test_collect_is_padding_aware(llama, position):
    prompts = _prompts(7, 0)
    got = F.collect(llama, None, prompts, SITE, position=position, batch_size=3, progress=False)[SITE]
    want = torch.stack([(_direct(llama, p)[-1] if position == "last" else _direct(llama, p).mean(0))
                        for p in prompts])
    assert got.shape == (7, 64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_pool_left_padding():
    acts = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    torch.testing.assert_close(F.pool(acts, mask, "last"), torch.stack([acts[0, 3], acts[1, 2]]))
    torch.testing.assert_close(F.pool(acts, mask, "mean"), torch.stack([acts[0, 2:].mean(0), acts[1, :3].mean(0)]))


def _pairs_data(n=24, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    neg = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Differences vary mostly along `direction` (so it is the first PC) with a positive mean.
    amount = 2.0 + torch.randn(n, 1, generator=g, dtype=torch.float64)
    pos = neg + amount * direction + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return pos, neg, direction


def test_mean_difference_and_ablation():
    pos, neg, _ = _pairs_data()
    v = F.mean_difference(pos, neg)
    torch.testing.assert_close(v, pos.mean(0) - neg.mean(0))
    u = F.ablation_direction(pos, neg)
    torch.testing.assert_close(u, v / v.norm())
    assert isinstance(Ablate(u), Ablate)


def test_principal_direction_matches_pca_and_points_positive():
    pos, neg, direction = _pairs_data()
    diffs = pos - neg
    centred = diffs - diffs.mean(0)
    # Direct: top eigenvector of the covariance matrix of the differences.
    evals, evecs = torch.linalg.eigh(centred.T @ centred)
    top = evecs[:, -1]
    v = F.principal_direction(pos, neg)
    u = v / v.norm()
    assert abs(float(u @ top)) == pytest.approx(1.0, abs=1e-9)
    assert float(u @ direction) > 0  # signed towards the positives
    assert float(v.norm()) == pytest.approx(float((diffs @ u).mean()), rel=1e-9)
    # Swapping the sets flips it.
    v2 = F.principal_direction(neg, pos)
    torch.testing.assert_close(v2 / v2.norm(), -u)


def test_clamp_value():
    pos, neg, _ = _pairs_data()
    u = F.ablation_direction(pos, neg)
    value = F.clamp_value(pos, u)
    assert value == pytest.approx(float((pos @ u).mean()))
    out = Clamp(u, value).apply(neg)
    torch.testing.assert_close(out @ u, torch.full((neg.shape[0],), value, dtype=torch.float64))


def test_least_squares_full_rank_is_ridge_closed_form():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(50, 8, generator=g, dtype=torch.float64)
    t = torch.randn(50, 8, generator=g, dtype=torch.float64)
    for ridge in (0.0, 3.0):
        fit = F.least_squares(h, t, ridge=ridge)
        X = torch.cat([h, torch.ones(50, 1, dtype=torch.float64)], 1)
        pen = torch.diag(torch.tensor([ridge] * 8 + [0.0], dtype=torch.float64))
        W = torch.linalg.solve(X.T @ X + pen, X.T @ (t - h))
        got = fit.A @ fit.B
        torch.testing.assert_close(got, W[:8], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(fit.bias @ fit.B, W[8], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(fit.patch.apply(h), h + X @ W, atol=1e-9, rtol=1e-9)


def test_least_squares_low_rank_recovers_and_is_optimal():
    g = torch.Generator().manual_seed(2)
    D, r, N = 12, 2, 80
    A0 = torch.randn(D, r, generator=g, dtype=torch.float64)
    B0 = torch.randn(r, D, generator=g, dtype=torch.float64)
    b0 = torch.randn(r, generator=g, dtype=torch.float64)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    t = h + (h @ A0 + b0) @ B0
    fit = F.least_squares(h, t, rank=r)
    assert isinstance(fit.patch, LowRank)
    torch.testing.assert_close(fit.patch.apply(h), t, atol=1e-8, rtol=1e-8)
    assert fit.residual < 1e-16
    # With noise, the reduced-rank solution beats truncating the full solution's SVD
    # (the reduced-rank regression optimum is never worse).
    t_noisy = t + 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64)
    rr = F.least_squares(h, t_noisy, rank=1)
    full = F.least_squares(h, t_noisy)
    W = torch.cat([full.A @ full.B, (full.bias @ full.B)[None]], 0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W1 = U[:, :1] * S[:1] @ Vh[:1]
    X = torch.cat([h, torch.ones(N, 1, dtype=torch.float64)], 1)
    trunc_err = float((h + X @ W1 - t_noisy).pow(2).mean())
    assert rr.residual <= trunc_err + 1e-12
    assert full.residual <= rr.residual


def test_fit_on_tiny_model_every_method(llama):
    pos, neg = _prompts(6, 10), _prompts(6, 11)
    pairs = [{"positive": a, "negative": b} for a, b in zip(pos, neg)]
    P = F.collect(llama, None, pos, SITE, progress=False)[SITE]
    N = F.collect(llama, None, neg, SITE, progress=False)[SITE]
    r = F.fit(llama, None, pairs, SITE, "mean_diff", scale=2.0, progress=False)
    assert isinstance(r.patch, Steer) and r.patch.scale == 2.0
    torch.testing.assert_close(r.patch.v, F.mean_difference(P, N))
    r = F.fit(llama, None, pairs, SITE, "pca", progress=False)
    torch.testing.assert_close(r.patch.v, F.principal_direction(P, N))
    r = F.fit(llama, None, pairs, SITE, "ablate", progress=False)
    assert isinstance(r.patch, Ablate)
    r = F.fit(llama, None, pairs, SITE, "clamp", clamp_to="negative", progress=False)
    assert r.patch.value == pytest.approx(F.clamp_value(N, F.ablation_direction(P, N)))
    r = F.fit(llama, None, pairs, SITE, "lowrank", rank=3, ridge=0.1, progress=False)
    assert r.patch.rank == 3 and r.stats["mse"] < r.stats["mse_before"]
    assert "lowrank" in r.summary()


def test_errors():
    with pytest.raises(ValueError, match="paired"):
        F.principal_direction(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="rank"):
        F.least_squares(torch.zeros(3, 4), torch.zeros(3, 4), rank=5)
    with pytest.raises(ValueError, match="method"):
        F.fit(None, None, [("a", "b")], SITE, "nope")
    with pytest.raises(ValueError, match="tokenizer"):
        F.tokenize(None, ["text"])
    with pytest.raises(ValueError, match="position"):
        F.pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "first")


def _repeng_sign(diffs, u):
    """repeng's rule written out directly: +u if most pairs project positive on it, else −u."""
    positive = sum(1 for d in diffs if float(d @ u) > 0)
    negative = sum(1 for d in diffs if float(d @ u) < 0)
    return 1.0 if positive >= negative else -1.0


def test_principal_direction_sign_follows_the_majority_not_the_magnitude():
    # The repro: differences +1, +1, +1, −10 along x. Three pairs of four agree with +x, the
    # mean projection is −1.75; repeng returns [1, 0], the vote decides, the scale must not flip it.
    neg = torch.zeros(4, 2, dtype=torch.float64)
    pos = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-10.0, 0.0]], dtype=torch.float64)
    v = F.principal_direction(pos, neg)
    assert float(v[0]) > 0 and float(v[1]) == 0.0
    assert float(v.norm()) == pytest.approx(1.75)
    # Random data with a few large outliers against the majority, vs a direct computation.
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        D = 6
        axis = torch.randn(D, generator=g, dtype=torch.float64)
        axis = axis / axis.norm()
        k = 7
        diffs = axis * torch.rand(k, 1, generator=g, dtype=torch.float64) \
            + 0.05 * torch.randn(k, D, generator=g, dtype=torch.float64)
        diffs[:2] = -axis * (5.0 + 5 * torch.rand(2, 1, generator=g, dtype=torch.float64))  # big, opposite
        neg = torch.randn(k, D, generator=g, dtype=torch.float64)
        pos = neg + diffs
        centred = diffs - diffs.mean(0)
        _, evecs = torch.linalg.eigh(centred.T @ centred)
        top = evecs[:, -1]
        expected_u = top * _repeng_sign(diffs, top)
        v = F.principal_direction(pos, neg)
        u = v / v.norm()
        assert float(u @ expected_u) == pytest.approx(1.0, abs=1e-9), trial
        assert float(v.norm()) == pytest.approx(abs(float((diffs @ u).mean())), rel=1e-9)
