"""Conditional steering as CAST defines it (Lee et al., arXiv 2409.05907), decided per sequence on
the device.

A :class:`Condition` reads the hidden state at a condition site during the prompt forward, pools it
over the prompt (the mean over real tokens, padding excluded, or the last real token), scores it
against the condition vector c and compares the score with a threshold. The result is a bool per
sequence kept in a device tensor (no ``.item()``, no host sync) and held for the whole generation
(it is stored with the KV cache object). Behaviour patches wrapped in :class:`Conditional` act only
on the sequences whose decision is true, at sites after the condition site.

Scores (``metric``):

- ``"projection"`` (CAST's): cos(h̄, proj_c h̄) = |h̄·ĉ| / ‖h̄‖
- ``"cosine"``: the signed cosine h̄·ĉ / ‖h̄‖

Usage::

    cond = fastpatch.cast.Condition(c, site="layers.3.resid_post", threshold=0.1)
    handle = fastpatch.apply(model, {
        "layers.5.resid_post": fastpatch.cast.Conditional(fastpatch.Steer(v, 4.0), cond),
    })
    # or: fastpatch.cast.apply(model, cond, {"layers.5.resid_post": fastpatch.Steer(v, 4.0)})
"""
from __future__ import annotations

import math

import torch

_AGG = ("mean", "last")
_CMP = ("above", "below")
_METRIC = ("projection", "cosine")


class Condition:
    """When to steer: score(pooled hidden state at ``site``, c) compared with ``threshold``."""

    def __init__(self, vector, site: str, threshold: float, *, aggregate: str = "mean",
                 compare: str = "above", metric: str = "projection"):
        if not isinstance(vector, torch.Tensor):
            vector = torch.as_tensor(vector)
        if not vector.is_floating_point() or vector.dim() != 1 or vector.numel() == 0:
            raise ValueError(f"Condition vector must be a non-empty 1-D float tensor, got {tuple(vector.shape)} "
                             f"{vector.dtype}")
        v = vector.detach().to(torch.float64).cpu()
        n = float(v.norm())
        if not math.isfinite(n) or n == 0.0:
            raise ValueError("Condition vector must be finite and non-zero")
        if aggregate not in _AGG:
            raise ValueError(f"Condition aggregate must be one of {_AGG}, got {aggregate!r}")
        if compare not in _CMP:
            raise ValueError(f"Condition compare must be one of {_CMP}, got {compare!r}")
        if metric not in _METRIC:
            raise ValueError(f"Condition metric must be one of {_METRIC}, got {metric!r}")
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"Condition threshold must be a finite number, got {threshold!r}")
        self.unit = v / n
        self.site = site
        self.threshold = float(threshold)
        self.aggregate = aggregate
        self.compare = compare
        self.metric = metric
        self._dev = {}

    @property
    def hidden_size(self) -> int:
        return int(self.unit.shape[0])

    def _vec(self, device) -> torch.Tensor:
        t = self._dev.get(device)
        if t is None:
            t = self._dev[device] = self.unit.to(device=device, dtype=torch.float32)
        return t

    def score(self, h: torch.Tensor, real=None) -> torch.Tensor:
        """Float [B]: the score per sequence for hidden states ``h`` [B, S, D] (device ops only).

        ``real`` is a bool [B, S] mask of real (non-padding) prompt tokens, or None (all real).
        """
        hf = h.float()
        B, S, _ = hf.shape
        if self.aggregate == "mean":
            if real is None:
                pooled = hf.mean(1)
            else:
                m = real.to(hf.dtype)
                pooled = (hf * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        elif real is None:
            pooled = hf[:, -1]
        else:
            pos = torch.arange(S, device=h.device).expand(B, S)
            last = torch.where(real, pos, torch.zeros_like(pos)).amax(1)
            pooled = hf[torch.arange(B, device=h.device), last]
        proj = pooled @ self._vec(h.device)
        if self.metric == "projection":
            proj = proj.abs()
        return proj / pooled.norm(dim=-1).clamp_min(1e-30)

    def decide(self, h: torch.Tensor, real=None) -> torch.Tensor:
        """Bool [B]: the decision per sequence (device tensor, no host sync)."""
        s = self.score(h, real)
        return s > self.threshold if self.compare == "above" else s < self.threshold

    def __repr__(self) -> str:
        return (f"Condition(site={self.site!r}, threshold={self.threshold}, aggregate={self.aggregate!r}, "
                f"compare={self.compare!r}, metric={self.metric!r})")


class Conditional:
    """A site value (patch, PatchBank or Scoped) that acts only where ``condition`` decided true."""

    def __init__(self, patch, condition: Condition):
        if not isinstance(condition, Condition):
            raise TypeError(f"Conditional needs a fastpatch.cast.Condition, got {type(condition).__name__}")
        if isinstance(patch, Conditional):
            raise TypeError("Conditional cannot wrap another Conditional")
        self.patch = patch
        self.condition = condition
