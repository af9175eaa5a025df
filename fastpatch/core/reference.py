"""The float64 oracle: fused add + patch + norm written with plain torch ops.

Every backend is tested against :func:`fused_add_norm` here. It is deliberately simple:
no fusion, no tricks, everything in float64.
"""
from __future__ import annotations

from typing import Optional

import torch

from .bank import PatchBank
from .patches import ACT_IDENTITY, ACT_JUMPRELU, GATE_COSINE_ABOVE, GATE_COSINE_BELOW, GATE_NONE, GATE_PROJECTION_ABOVE

NORM_KINDS = {"rms": 0, "layer": 1}


def patch_rows(h: torch.Tensor, bank: PatchBank, index: Optional[torch.Tensor],
               fire_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply bank patches to float64 rows ``h`` [N, D]; ``index`` [N] (−1 = none) or None (patch 0)."""
    p = {k: v.to(h.device) for k, v in bank.float64().items()}
    N = h.shape[0]
    if index is None:
        idx = torch.zeros(N, dtype=torch.long, device=h.device)
    else:
        idx = index.to(device=h.device, dtype=torch.long).reshape(N)
    valid = (idx >= 0) & (idx < bank.num_patches)
    k = torch.where(valid, idx, torch.zeros_like(idx))

    down, bias, up, shift = p["down"][k], p["bias"][k], p["up"][k], p["shift"][k]
    z = torch.einsum("nd,nrd->nr", h, down) + bias
    # The activation as SAELens writes it, not as the kernels do (one compare against a level):
    # ReLU for relu and jumprelu, then JumpReLU's mask [z > θ]; identity components pass z.
    mode_r = p["act_mode"][k].to(h.device)
    relu_z = torch.where(z > 0, z, torch.zeros_like(z))
    jumped = relu_z * (z > p["act_jump"][k]).to(z.dtype)
    z = torch.where(mode_r == ACT_IDENTITY, z, torch.where(mode_r == ACT_JUMPRELU, jumped, relu_z))
    delta = torch.einsum("nr,nrd->nd", z, up) + shift

    mode = p["gate_mode"][k].to(h.device)
    cdir = p["gate_dir"][k]
    thr = p["gate_threshold"][k]
    proj = (h * cdir).sum(-1)
    hn = h.norm(dim=-1)
    cosine = torch.where(hn > 0, proj / torch.where(hn > 0, hn, torch.ones_like(hn)), torch.zeros_like(hn))
    is_cos = (mode == GATE_COSINE_ABOVE) | (mode == GATE_COSINE_BELOW)
    metric = torch.where(is_cos, cosine, proj)
    above = (mode == GATE_COSINE_ABOVE) | (mode == GATE_PROJECTION_ABOVE)
    fires = torch.where(above, metric > thr, metric < thr)
    fires = torch.where(mode == GATE_NONE, torch.ones_like(fires), fires) & valid

    if fire_counts is not None:
        counts = torch.bincount(k[fires], minlength=bank.num_patches)
        fire_counts += counts.to(device=fire_counts.device, dtype=fire_counts.dtype)
    return h + fires.to(h.dtype).unsqueeze(-1) * delta


def normalize(h: torch.Tensor, weight, bias, eps: float, norm: str, weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm or LayerNorm of float64 rows, times (weight + weight_offset), plus bias."""
    if norm == "rms":
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    elif norm == "layer":
        mu = h.mean(-1, keepdim=True)
        var = (h - mu).pow(2).mean(-1, keepdim=True)
        y = (h - mu) * torch.rsqrt(var + eps)
    else:
        raise ValueError(f"norm must be one of {tuple(NORM_KINDS)}, got {norm!r}")
    if weight is not None:
        y = y * (weight.to(h.device, torch.float64) + weight_offset)
    elif weight_offset:
        y = y * (1.0 + weight_offset)
    if bias is not None:
        y = y + bias.to(h.device, torch.float64)
    return y


def fused_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], *,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6, norm: str = "rms",
                   bank: Optional[PatchBank] = None, index: Optional[torch.Tensor] = None,
                   weight_offset: float = 0.0, fire_counts: Optional[torch.Tensor] = None,
                   backend=None, exact: bool = False):
    """Reference semantics of :func:`fastpatch.fused_add_norm`, in float64.

    Returns ``(out, residual_out)`` in x's dtype, or in float64 with ``exact=True``.
    """
    shape = x.shape
    D = shape[-1]
    h = x.reshape(-1, D).to(torch.float64)
    if residual is not None:
        h = h + residual.reshape(-1, D).to(torch.float64)
    if bank is not None:
        h = patch_rows(h, bank, None if index is None else index.reshape(-1), fire_counts)
    out = normalize(h, weight, bias, eps, norm, weight_offset)
    dt = torch.float64 if exact else x.dtype
    return out.to(dt).reshape(shape), h.to(dt).reshape(shape)
