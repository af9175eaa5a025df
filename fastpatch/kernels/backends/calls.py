"""How every backend is called: one norm spec, a bank's :class:`~fastpatch.core.bank.KernelArgs`, and the
one place both are spread into the flat arguments of ``torch.ops.fastpatch.fused_add_norm``.

A backend's ``run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None)``
takes a :class:`NormSpec` and ``bank.kernel_args()`` (None: no bank).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...core.reference import NORM_KINDS

NO_BANK = (None,) * 8  # the op's eight bank arguments when there is no bank


class NormSpec(NamedTuple):
    """The norm of a fused call: ``kind`` (``fastpatch.core.reference.NORM_KINDS``: 0 = RMS, 1 = Layer),
    ``eps`` and ``weight_offset`` (added to the weight: Gemma's 1 + w). Hashable and fixed per norm
    module, so a site builds it once. The weight and bias tensors are passed beside it (read per call)."""

    kind: int
    eps: float
    weight_offset: float = 0.0

    @classmethod
    def of(cls, norm: str = "rms", eps: float = 1e-6, weight_offset: float = 0.0) -> "NormSpec":
        return cls(NORM_KINDS[norm], float(eps), float(weight_offset))


def invoke(call, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out, *extra):
    """Allocate missing outputs and call ``call`` (the op, or a backend's kernel launcher, which take the
    op's flat arguments) with the norm spec and the bank's tensors spread out; returns (out, residual_out).
    Hot path: no dicts, no host syncs."""
    if out is None:
        out = torch.empty_like(x2d)
    if residual_out is None:
        residual_out = torch.empty_like(x2d)
    call(x2d, residual2d, weight, bias, norm.eps, norm.kind, norm.weight_offset,
         *(NO_BANK if args is None else args[:8]), index, fire_counts, out, residual_out, *extra)
    return out, residual_out

