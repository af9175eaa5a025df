"""The flat argument list the C++ and CUDA ops take, built from a PatchBank."""
from __future__ import annotations

import torch


def call_flat(call, x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
              out, residual_out):
    """Allocate missing outputs and call ``call`` (a bound op) with the bank's tensors spread out.

    Parts no patch uses are passed as None so the kernel skips them: rank 0 -> no dots, no shift
    -> no shift load, no gate -> no gate statistics, all-identity activations -> no act_threshold.
    Hot path: no dicts, no host syncs.
    """
    if out is None:
        out = torch.empty_like(x2d)
    if residual_out is None:
        residual_out = torch.empty_like(x2d)
    if bank is None:
        call(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, None, None, None, None,
             None, None, None, None, None, None, out, residual_out)
    else:
        low_rank = bank.rank > 0
        gated = bank.has_gate
        call(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset,
             bank.down if low_rank else None, bank.bias if low_rank else None,
             bank.up if low_rank else None, bank.shift if bank.has_shift else None,
             bank.gate_dir if gated else None, bank.gate_threshold if gated else None,
             bank.gate_mode, bank.act_threshold, index, fire_counts, out, residual_out)
    return out, residual_out
