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


def _fold_two(a: CanonicalPatch, b: CanonicalPatch) -> tuple:
    """(down, bias, up, shift) of 'a then b', both ungated, float64."""
    d1, b1, u1, s1 = (t.to(torch.float64) for t in (a.down, a.bias, a.up, a.shift))
    d2, b2, u2, s2 = (t.to(torch.float64) for t in (b.down, b.bias, b.up, b.shift))
    m = u1 @ d2.T  # [r1, r2]: how a's low-rank output feeds b's read-out
    down = torch.cat([d1, d2 + m.T @ d1], dim=0)
    bias = torch.cat([b1, b2 + m.T @ b1 + d2 @ s1], dim=0)
    up = torch.cat([u1, u2], dim=0)
    return down, bias, up, s1 + s2


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
    acc = CanonicalPatch(down, bias, up, shift)
    for c in canon[1:]:
        acc = CanonicalPatch(*_fold_two(acc, c))
    parts = [k for c in canon for k in _parts_kinds(c)]
    return CanonicalPatch(acc.down.contiguous(), acc.bias.contiguous(), acc.up.contiguous(),
                          acc.shift.contiguous(), gate=gate, kind=COMPOSED_KIND, params={"parts": parts})
