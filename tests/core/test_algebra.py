"""fastpatch.compose and Steer arithmetic: composing then applying == applying one after another."""
from __future__ import annotations

import itertools

import pytest
import torch

import fastpatch as fp
from casegen import KINDS, gate_threshold, make_patch

D = 24


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rows(gen, n=64):
    return torch.randn(n, D, generator=gen, dtype=torch.float64) * 2


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _sequential(patches, h):
    for p in patches:
        h = p.apply(h)
    return h


@pytest.mark.parametrize("k1,k2", list(itertools.product(KINDS, KINDS)))
def test_compose_pair_equals_sequential(k1, k2):
    gen = _gen(hash((k1, k2)) % 1000)
    p1, p2 = make_patch(k1, D, gen, rank=3), make_patch(k2, D, gen, rank=2)
    h = _rows(gen)
    c = fp.compose(p1, p2)
    assert isinstance(c, fp.CanonicalPatch) and c.kind == "composed"
    assert c.rank == p1.rank + p2.rank  # ranks add
    assert c.params["parts"] == [k1, k2]
    _close(c.apply(h), _sequential([p1, p2], h))


def test_compose_is_order_sensitive():
    gen = _gen(1)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    ablate, steer = fp.Ablate(u), fp.Steer(u, 3.0)
    h = _rows(gen)
    # ablate then steer leaves 3·û·|u| along û; steer then ablate leaves nothing along û
    un = u / u.norm()
    _close(fp.compose(ablate, steer).apply(h) @ un, torch.full((h.shape[0],), 3.0 * float(u.norm()),
                                                               dtype=torch.float64))
    _close(fp.compose(steer, ablate).apply(h) @ un, torch.zeros(h.shape[0], dtype=torch.float64))


def test_compose_triple_and_nested():
    gen = _gen(2)
    ps = [make_patch(k, D, gen) for k in ("ablate", "lowrank", "steer")]
    h = _rows(gen)
    c = fp.compose(*ps)
    _close(c.apply(h), _sequential(ps, h))
    assert c.params["parts"] == ["ablate", "lowrank", "steer"]
    # associativity: folding a composed part gives the same map and flattened parts
    nested = fp.compose(fp.compose(ps[0], ps[1]), ps[2])
    _close(nested.apply(h), c.apply(h))
    assert nested.params["parts"] == ["ablate", "lowrank", "steer"]
    assert fp.compose(ps).rank == c.rank  # a list argument works too


def test_compose_result_in_a_bank_matches_reference():
    gen = _gen(3)
    ps = [make_patch(k, D, gen) for k in ("clamp", "loreft")]
    x = _rows(gen, 16)
    bank = fp.PatchBank([fp.compose(*ps)], D, dtype=torch.float32)
    w = torch.ones(D, dtype=torch.float64)
    out, res = fp.reference.fused_add_norm(x, None, w, bank=bank, exact=True)
    torch.testing.assert_close(res, _sequential(ps, x), rtol=1e-6, atol=1e-5)  # bank holds float32


def _orthogonal_patch(kind, gen, c):
    """A patch whose edit never has a component along unit vector c."""
    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    def perp(t):  # remove the c component of each row (or of the vector)
        return t - (t @ c)[..., None] * c if t.dim() == 2 else t - (t @ c) * c

    if kind == "steer":
        return fp.Steer(perp(randn(D)), 1.5)
    if kind == "ablate":
        return fp.Ablate(perp(randn(D)))
    if kind == "clamp":
        return fp.Clamp(perp(randn(D)), 0.7)
    if kind == "lowrank":
        return fp.LowRank(randn(D, 3) / D ** 0.5, perp(randn(3, D)), bias=randn(3), scale=0.5)
    if kind == "loreft":
        q, _ = torch.linalg.qr(perp(randn(D, 3).T).T)
        R = q.T.contiguous()  # rows orthonormal and ⊥ c
        return fp.LoReFT(R, R + randn(3, D) * 0.2, randn(3) * 0.3)
    raise ValueError(kind)


@pytest.mark.parametrize("k1,k2", [("steer", "ablate"), ("ablate", "steer"), ("lowrank", "clamp"),
                                   ("loreft", "lowrank"), ("clamp", "steer")])
@pytest.mark.parametrize("fire", ["above", "below"])
def test_compose_same_gate_exact_when_first_edit_keeps_the_gate(k1, k2, fire):
    # projection gate, first edit ⊥ condition: the gate reads the same value before and after it,
    # so applying the gated parts one after another equals the composed patch on every row
    gen = _gen(4)
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    c = c / c.norm()
    h = _rows(gen)
    thr = gate_threshold(h, c, "projection")
    p1 = fp.Gated(_orthogonal_patch(k1, gen, c), c, thr, metric="projection", fire=fire)
    p2 = fp.Gated(make_patch(k2, D, gen), c, thr, metric="projection", fire=fire)
    composed = fp.compose(p1, p2)
    assert composed.gate is not None and composed.gate.same_as(p1.canonical().gate)
    fired = composed.fires(h)
    assert 0 < int(fired.sum()) < h.shape[0]  # both fired and unfired rows are tested
    _close(composed.apply(h), _sequential([p1, p2], h))


@pytest.mark.parametrize("k1,k2", list(itertools.product(KINDS, KINDS)))
def test_compose_same_cosine_gate_matches_where_gate_decision_is_kept(k1, k2):
    gen = _gen(5 + KINDS.index(k1) * 7 + KINDS.index(k2))
    c = torch.randn(D, generator=gen, dtype=torch.float64)
    h = _rows(gen, 128)
    thr = gate_threshold(h, c, "cosine")
    p1 = fp.Gated(make_patch(k1, D, gen), c, thr)
    p2 = fp.Gated(make_patch(k2, D, gen), c, thr)
    composed = fp.compose(p1, p2)
    h1 = p1.apply(h)
    kept = p2.canonical().fires(h1) == p2.canonical().fires(h)
    assert int(kept.sum()) >= h.shape[0] // 4  # the comparison is not vacuous
    _close(composed.apply(h)[kept], _sequential([p1, p2], h)[kept])


def test_compose_gate_errors():
    gen = _gen(6)
    v = torch.randn(D, generator=gen, dtype=torch.float64)
    c1 = torch.randn(D, generator=gen, dtype=torch.float64)
    c2 = torch.randn(D, generator=gen, dtype=torch.float64)
    s = fp.Steer(v)
    with pytest.raises(ValueError, match="cannot mix gated and ungated"):
        fp.compose(s, fp.Gated(fp.Ablate(v), c1, 0.1))
    with pytest.raises(ValueError, match="cannot mix gated and ungated"):
        fp.compose(fp.Gated(fp.Ablate(v), c1, 0.1), s)
    with pytest.raises(ValueError, match="different gate"):
        fp.compose(fp.Gated(s, c1, 0.1), fp.Gated(s, c2, 0.1))
    with pytest.raises(ValueError, match="different gate"):
        fp.compose(fp.Gated(s, c1, 0.1), fp.Gated(s, c1, 0.2))
    with pytest.raises(ValueError, match="different gate"):
        fp.compose(fp.Gated(s, c1, 0.1), fp.Gated(s, c1, 0.1, fire="below"))


def test_compose_argument_errors():
    with pytest.raises(ValueError, match="at least one"):
        fp.compose()
    with pytest.raises(ValueError, match="hidden sizes"):
        fp.compose(fp.Steer(torch.ones(4)), fp.Steer(torch.ones(5)))
    with pytest.raises(TypeError, match="part 1"):
        fp.compose(fp.Steer(torch.ones(4)), "steer")


def test_compose_single_patch_is_its_canonical_form():
    gen = _gen(7)
    p = make_patch("lowrank", D, gen)
    h = _rows(gen)
    _close(fp.compose(p).apply(h), p.apply(h))


# -- steering arithmetic ------------------------------------------------------------------------

def test_steer_add_sub_mul_neg():
    gen = _gen(8)
    a = fp.Steer(torch.randn(D, generator=gen, dtype=torch.float64), 2.0)
    b = fp.Steer(torch.randn(D, generator=gen, dtype=torch.float64), -0.5)
    h = _rows(gen)
    for expr, expect in [
        (a + b, a.apply(h) + b.apply(h) - h),
        (a - b, a.apply(h) - (b.apply(h) - h)),
        (3 * a, h + 3 * (a.apply(h) - h)),
        (a * 3, h + 3 * (a.apply(h) - h)),
        (-a, h - (a.apply(h) - h)),
        (0.5 * a + 2 * b - a, _sequential([0.5 * a, 2 * b, -a], h)),
    ]:
        assert isinstance(expr, fp.Steer)
        _close(expr.apply(h), expect)
    _close(sum([a, b, a]).apply(h), (a + b + a).apply(h))
    # Steer + Steer equals composing them (steering commutes)
    _close((a + b).apply(h), fp.compose(a, b).apply(h))


def test_steer_same_vector_keeps_direction():
    v = torch.randn(D, dtype=torch.float32)
    s = fp.Steer(v, 1.0) + fp.Steer(v, 2.5)
    assert s.v.dtype == v.dtype and torch.equal(s.v, v) and s.scale == 3.5  # stays float32, exact
    assert torch.equal((-fp.Steer(v, 2.0)).v, v)


def test_steer_arithmetic_errors():
    s = fp.Steer(torch.ones(D))
    with pytest.raises(TypeError, match="compose"):
        s + fp.Ablate(torch.ones(D))
    with pytest.raises(ValueError, match="sizes differ"):
        s + fp.Steer(torch.ones(D + 1))
    with pytest.raises(TypeError):
        s + 1.0
    with pytest.raises(TypeError):
        s * s
    with pytest.raises(ValueError, match="finite"):
        s * float("inf")
