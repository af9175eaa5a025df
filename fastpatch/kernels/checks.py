"""The checks of the public op's arguments (:func:`check_inputs`) and the process-wide switches they read.

A module of its own, below both :mod:`.ops` and :mod:`.autograd`: ``fastpatch.fused_add_norm`` hands
calls that need a gradient to the differentiable op, and both run these same checks, so neither of the
two may import the other's module for them (an import circle, which tests/test_layout.py refuses).
"""
from __future__ import annotations

import math

import torch

from ..core.bank import PatchBank
from ..core.reference import NORM_KINDS

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Config:
    """Process-wide switches.

    check_index_values: check that index entries lie in [-1, P) before launching. On a GPU
    that reads the index back to the host (a sync); serving loops that build the index
    themselves can turn it off. Kernels treat out-of-range entries as "no patch" either way,
    so an unchecked bad index never reads out of bounds. Skipped while torch.compile traces
    or a CUDA graph is being captured.
    """

    check_index_values: bool = True


config = Config()


def _is_capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    if device.type == "cuda":
        try:
            return torch.cuda.is_current_stream_capturing()
        except Exception:  # pragma: no cover - CUDA present but not initialised
            return False
    return False


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_inputs(x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts):
    """Validate and normalise the arguments of :func:`fused_add_norm`.

    Returns ``(x2d, residual2d, weight, bias, norm_kind, index1d)`` with contiguous tensors;
    raises TypeError/ValueError naming the offending argument.
    """
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    dev = x.device
    x2d = x.reshape(-1, D).contiguous()
    res2d = None
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} differs from x dtype {x.dtype}")
        if residual.device != dev:
            raise ValueError(f"residual is on {residual.device}, x on {dev}")
        res2d = residual.reshape(-1, D).contiguous()
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        _check_float(name, t)
        if t.shape != (D,):
            raise ValueError(f"{name} must have shape ({D},) (the hidden size), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} dtype must be float32 or x's dtype {x.dtype}, got {t.dtype}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, x on {dev}")
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {tuple(NORM_KINDS)}, got {norm!r}")
    if bias is not None and norm != "layer":
        raise ValueError("bias is only supported with norm='layer'")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    if not isinstance(weight_offset, (int, float)) or not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be a finite number, got {weight_offset!r}")

    N = x2d.shape[0]
    idx = None
    if bank is None:
        if index is not None:
            raise ValueError("index was given without a bank")
        if fire_counts is not None:
            raise ValueError("fire_counts was given without a bank")
    else:
        if not isinstance(bank, PatchBank):
            raise TypeError(f"bank must be a fastpatch.PatchBank, got {type(bank).__name__}")
        if bank.hidden_size != D:
            raise ValueError(f"bank hidden_size {bank.hidden_size} differs from x's hidden size {D}")
        if bank.device != dev:
            raise ValueError(f"bank is on {bank.device}, x on {dev}; move it with bank.to(device)")
        if index is None:
            if bank.num_patches != 1:
                raise ValueError(
                    f"index is required with a bank of {bank.num_patches} patches "
                    "(index=None applies a one-patch bank to every row)"
                )
        else:
            if not isinstance(index, torch.Tensor):
                raise TypeError(f"index must be an integer tensor, got {type(index).__name__}")
            if index.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"index must be int32 or int64, got {index.dtype}")
            if index.numel() != N or (index.dim() != 1 and tuple(index.shape) != tuple(x.shape[:-1])):
                raise ValueError(
                    f"index must have one entry per row: shape ({N},) or {tuple(x.shape[:-1])}, "
                    f"got {tuple(index.shape)}"
                )
            if index.device != dev:
                raise ValueError(f"index is on {index.device}, x on {dev}")
            idx = index.reshape(N).contiguous()
            if config.check_index_values and N and not _is_capturing(dev):
                lo, hi = int(idx.min()), int(idx.max())
                if lo < -1 or hi >= bank.num_patches:
                    raise ValueError(
                        f"index values must lie in [-1, {bank.num_patches}) for a bank of "
                        f"{bank.num_patches} patches, got min {lo}, max {hi}"
                    )
        if fire_counts is not None:
            if not isinstance(fire_counts, torch.Tensor) or fire_counts.dtype != torch.int32:
                raise TypeError("fire_counts must be an int32 tensor")
            if fire_counts.shape != (bank.num_patches,) or not fire_counts.is_contiguous():
                raise ValueError(
                    f"fire_counts must be a contiguous tensor of shape ({bank.num_patches},), "
                    f"got {tuple(fire_counts.shape)}"
                )
            if fire_counts.device != dev:
                raise ValueError(f"fire_counts is on {fire_counts.device}, x on {dev}")
    return x2d, res2d, weight, bias, NORM_KINDS[norm], idx
