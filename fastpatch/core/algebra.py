"""Patch algebra: fold a chain of patches into one canonical patch, exactly.

Every patch is h ↦ h + g(h)·((h·Dᵀ + b)·U + s). Applying p1 then p2 (ungated) gives

    h1 = h + z1·U1 + s1,            z1 = h·D1ᵀ + b1
    h2 = h1 + (h1·D2ᵀ + b2)·U2 + s2

and h1·D2ᵀ = h·D2ᵀ + z1·(U1·D2ᵀ) + s1·D2ᵀ, so with M = U1·D2ᵀ [r1, r2] the chain is one
canonical patch of rank r1 + r2:

    down  = [D1; D2 + Mᵀ·D1]
    bias  = [b1; b2 + Mᵀ·b1 + D2·s1]
    up    = [U1; U2]
    shift = s1 + s2

Everything is computed in float64. Ranks add (no compression: an SVD would round).

Activations (φ per component, see :class:`~fastpatch.core.patches.CanonicalPatch`): with φ₁ on the
first patch's components, h1·D2ᵀ = h·D2ᵀ + φ₁(z1)·M + s1·D2ᵀ. A row i of M from an *identity*
component of p1 folds into D2 as above (z1 is linear in h). A row i from a ReLU/JumpReLU component
cannot (φ₁(z1_i) is not linear in h), so it is kept as φ₁(z1_i): into a component j of p2 that is
the identity, its contribution φ₁(z1_i)·M_ij·U2_j folds into U1_i (up1' = U1 + M_nl·U2); into a
component j of p2 with its own activation, φ₂ would act on a sum that holds φ₁(z1_i), which no
canonical patch can express, so compose refuses where such an M_ij ≠ 0 (it names the components).
Where every M_ij between activated components is 0 (e.g. p1 writes orthogonally to what p2 reads),
the composition is exact and keeps every component's activation. All-identity chains fold as before.

Gates: patches compose only when all are ungated or all carry the *same* gate. The composed
patch evaluates that gate once, on its input h. Applying the parts one after another evaluates
the second part's gate on h1 instead; the two agree on every row where the first edit does not
move the row across the gate's threshold (always the case, for instance, when the gate uses
the "projection" metric and the first edit is orthogonal to the condition vector).
"""
from __future__ import annotations

from typing import Iterable

import torch

from .patches import CanonicalPatch, Gate, Patch, to_canonical

COMPOSED_KIND = "composed"


def _parts_kinds(c: CanonicalPatch) -> list:
    """Kinds of the original parts (a composed part contributes its own parts, flattened)."""
    if c.kind == COMPOSED_KIND and isinstance(c.params.get("parts"), list):
        return list(c.params["parts"])
    return [c.kind]


def _common_gate(canon: list) -> Gate | None:
    gated = [c.gate is not None for c in canon]
    if not any(gated):
        return None
    if not all(gated):
        which = ", ".join(f"part {i} ({c.kind}) is {'gated' if g else 'ungated'}"
                          for i, (c, g) in enumerate(zip(canon, gated)))
        raise ValueError(f"compose: cannot mix gated and ungated patches ({which}); "
                         "a composed patch has one gate for all its parts")
    first = canon[0].gate
    for i, c in enumerate(canon[1:], start=1):
        if not first.same_as(c.gate):
            raise ValueError(
                f"compose: part {i} ({c.kind}) has a different gate than part 0 "
                f"(metric {c.gate.metric!r}/{first.metric!r}, fire {c.gate.fire!r}/{first.fire!r}, "
                f"threshold {c.gate.threshold}/{first.threshold}, condition equal: "
                f"{bool(torch.equal(c.gate.condition, first.condition))}); "
                "only patches with the same gate compose")
    return first


def _fold_two(a: CanonicalPatch, b: CanonicalPatch, where: str = "") -> CanonicalPatch:
    """'a then b', both ungated, float64 (activations: see the module docstring)."""
    d1, b1, u1, s1 = (t.to(torch.float64) for t in (a.down, a.bias, a.up, a.shift))
    d2, b2, u2, s2 = (t.to(torch.float64) for t in (b.down, b.bias, b.up, b.shift))
    m = u1 @ d2.T  # [r1, r2]: how a's low-rank output feeds b's read-out
    acts1, acts2 = a.activations, b.activations
    lin1 = torch.tensor([x == "identity" for x in acts1], dtype=torch.bool)
    lin2 = torch.tensor([x == "identity" for x in acts2], dtype=torch.bool)
    m_lin = m * lin1.to(m.dtype)[:, None]  # rows of identity components: fold into b's read-out
    m_act = m - m_lin                     # rows of activated components: kept as φ₁(z1)
    blocked = (m_act != 0) & ~lin2[None, :]
    if bool(blocked.any()):
        i, j = (int(v) for v in blocked.nonzero()[0])
        raise ValueError(
            f"compose: {where}component {i} of the earlier part ({acts1[i]}) writes into what component {j} of the "
            f"next part ({acts2[j]}) reads (U1_{i}·D2_{j} = {float(m[i, j]):.3g} ≠ 0), so the second activation "
            "would act on the first one's output, which one canonical patch cannot express exactly. Apply them "
            "as separate patches (e.g. at two sites, or two hooks), or make the first write orthogonal to the "
            "second's read-out")
    down = torch.cat([d1, d2 + m_lin.T @ d1], dim=0)
    bias = torch.cat([b1, b2 + m_lin.T @ b1 + d2 @ s1], dim=0)
    up = torch.cat([u1 + (m_act * lin2.to(m.dtype)[None, :]) @ u2, u2], dim=0)
    acts = acts1 + acts2
    thr = None
    if "jumprelu" in acts:
        thr = torch.cat([a.threshold if a.threshold is not None else torch.zeros(a.rank, dtype=torch.float64),
                         b.threshold if b.threshold is not None else torch.zeros(b.rank, dtype=torch.float64)])
    return CanonicalPatch(down, bias, up, s1 + s2, activation=acts or "identity", threshold=thr)


def compose(*patches: Patch | CanonicalPatch | Iterable) -> CanonicalPatch:
    """One canonical patch equal to applying ``patches`` in order (the first one first).

    ``compose(Ablate(u), Steer(v))`` removes the u component and then steers along v.
    A single list argument is accepted too: ``compose([p1, p2, p3])``. The result has kind
    ``"composed"`` and ``params["parts"]``, the kinds of the parts in order.
    """
    if len(patches) == 1 and isinstance(patches[0], (list, tuple)):
        patches = tuple(patches[0])
    if not patches:
        raise ValueError("compose needs at least one patch")
    canon = []
    for i, p in enumerate(patches):
        try:
            canon.append(to_canonical(p))
        except TypeError as exc:
            raise TypeError(f"compose: part {i}: {exc}") from None
    sizes = {c.hidden_size for c in canon}
    if len(sizes) != 1:
        raise ValueError(f"compose: parts have different hidden sizes {[c.hidden_size for c in canon]}")
    gate = _common_gate(canon)
    down, bias, up, shift = (t.to(torch.float64) for t in (canon[0].down, canon[0].bias, canon[0].up,
                                                            canon[0].shift))
    acc = CanonicalPatch(down, bias, up, shift, activation=canon[0].activation, threshold=canon[0].threshold)
    for i, c in enumerate(canon[1:], start=1):
        acc = _fold_two(acc, c, f"part {i}: ")
    parts = [k for c in canon for k in _parts_kinds(c)]
    return CanonicalPatch(acc.down.contiguous(), acc.bias.contiguous(), acc.up.contiguous(),
                          acc.shift.contiguous(), gate=gate, kind=COMPOSED_KIND, params={"parts": parts},
                          activation=acc.activation, threshold=acc.threshold)
