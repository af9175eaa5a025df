"""The Triton backend: fastpatch/kernels/triton_ops kernels on CUDA tensors, or on CPU under TRITON_INTERPRET=1.

Eager calls launch the kernel directly (a custom op costs tens of µs per call in Python dispatch,
too much for decode). Under torch.compile the launch goes through the custom op
``fastpatch::fused_add_norm_triton`` with a fake impl, so graphs and CUDA graphs trace through
(a ``custom_op``, not ``torch.library.triton_op`` / ``wrap_triton``: those fail under TRITON_INTERPRET=1,
the interpreter the CPU tests run the kernels with).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..triton_ops.dispatch import interpreting

_import_error = ""
try:
    from ..triton_ops import fused_add_norm as _kernels
except Exception as exc:  # triton missing or broken: the backend is just unavailable
    _kernels = None
    _import_error = f"{type(exc).__name__}: {exc}"


def why_unavailable(device) -> str:
    device = torch.device(device)
    if _kernels is None:
        return f"triton could not be imported ({_import_error})"
    if device.type == "cuda":
        return "available" if torch.cuda.is_available() else "CUDA is not available in this torch build"
    if device.type == "cpu":
        return "available" if interpreting() else (
            "the triton backend runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
            "before fastpatch is imported")
    return f"the triton backend does not support device type {device.type!r}"


def is_available(device) -> bool:
    return why_unavailable(device) == "available"


@torch.library.custom_op("fastpatch::fused_add_norm_triton",
                         mutates_args=("out", "residual_out", "fire_counts"))
def fused_add_norm_triton(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float, norm_kind: int, weight_offset: float,
    down: Optional[torch.Tensor], down_bias: Optional[torch.Tensor], up: Optional[torch.Tensor],
    shift: Optional[torch.Tensor], gate_dir: Optional[torch.Tensor], gate_threshold: Optional[torch.Tensor],
    gate_mode: Optional[torch.Tensor], act_threshold: Optional[torch.Tensor], index: Optional[torch.Tensor],
    fire_counts: Optional[torch.Tensor],
    out: torch.Tensor, residual_out: torch.Tensor, num_patches: int,
) -> None:
    _kernels.launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift,
                    gate_dir, gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out,
                    num_patches=num_patches)


@fused_add_norm_triton.register_fake
def _(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
      gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, num_patches):
    return None  # writes only into its out-arguments


def _bank_args(bank):
    """The bank tensors the kernel needs; unused parts are None so the kernel compiles them out."""
    if bank is None:
        return (None,) * 8, 1
    low_rank = bank.rank > 0
    gated = bank.has_gate
    return ((bank.down if low_rank else None, bank.bias if low_rank else None, bank.up if low_rank else None,
             bank.shift if bank.has_shift else None, bank.gate_dir if gated else None,
             bank.gate_threshold if gated else None, bank.gate_mode, bank.act_threshold), bank.num_patches)


def run(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
        out=None, residual_out=None):
    if _kernels is None:
        raise RuntimeError(why_unavailable(x2d.device))
    if out is None:
        out = torch.empty_like(x2d)
    if residual_out is None:
        residual_out = torch.empty_like(x2d)
    parts, num_patches = _bank_args(bank)
    if torch.compiler.is_compiling():
        fused_add_norm_triton(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, *parts, index,
                              fire_counts, out, residual_out, num_patches)
    else:
        _kernels.launch(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, *parts, index,
                        fire_counts, out, residual_out, num_patches=num_patches)
    return out, residual_out
