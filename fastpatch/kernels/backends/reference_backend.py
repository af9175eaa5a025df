"""The float64 reference as a backend (any device): slow, exact, always there. Also the op's CPU
implementation when the C++ extension cannot be built (``library.register_fallback``)."""
from __future__ import annotations

import torch

from ...core import reference
from ...core.patches import ACT_IDENTITY, ACT_JUMPRELU, GATE_NONE
from .calls import invoke

_NORMS = {v: k for k, v in reference.NORM_KINDS.items()}


def is_available(device) -> bool:
    return True


class _Bank:
    """What reference.fused_add_norm reads of a bank, rebuilt from the op's flat arguments (absent
    parts as zeros / "none", which is what the kernels read them as)."""

    def __init__(self, x, down, down_bias, up, shift, gate_dir, gate_threshold, gate_mode, act_threshold):
        P, D = gate_mode.numel(), x.shape[1]
        R = 0 if down is None else down.shape[1]
        z = torch.zeros
        self.num_patches, self.hidden_size, self.rank = P, D, R
        self._f = dict(
            down=(z(P, R, D, dtype=torch.float64) if down is None else down.double().cpu()),
            bias=(z(P, R, dtype=torch.float64) if down_bias is None else down_bias.double().cpu()),
            up=(z(P, R, D, dtype=torch.float64) if up is None else up.double().cpu()),
            shift=(z(P, D, dtype=torch.float64) if shift is None else shift.double().cpu()),
            gate_dir=(z(P, D, dtype=torch.float64) if gate_dir is None else gate_dir.double().cpu()),
            gate_threshold=(z(P, dtype=torch.float64) if gate_threshold is None else gate_threshold.double().cpu()),
            gate_mode=gate_mode.cpu() if gate_dir is not None else torch.full((P,), GATE_NONE, dtype=torch.int32))
        # The kernels' level t (φ(z) = z if z > t else 0; −inf: identity) as the reference's activation:
        # JumpReLU with θ = t ≥ 0 is exactly z·[z > t].
        level = (torch.full((P, R), -float("inf"), dtype=torch.float64) if act_threshold is None or R == 0
                 else act_threshold.double().cpu())
        identity = torch.isinf(level)
        self._f["act_mode"] = torch.where(identity, ACT_IDENTITY, ACT_JUMPRELU).to(torch.int32)
        self._f["act_jump"] = torch.where(identity, torch.zeros_like(level), level)

    def float64(self):
        return self._f


def launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
           gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    """The op's flat arguments (see ``library``) computed by the reference, written into out / residual_out."""
    bank = None if gate_mode is None else _Bank(x, down, down_bias, up, shift, gate_dir, gate_threshold, gate_mode,
                                                act_threshold)
    o, r = reference.fused_add_norm(x, residual, weight, bias=bias, eps=eps, norm=_NORMS[norm_kind], bank=bank,
                                    index=index, weight_offset=weight_offset, fire_counts=fire_counts)
    out.copy_(o)
    residual_out.copy_(r)


def run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
    bank = None if args is None or args.source is None else args.source()
    if bank is not None:  # the bank's exact float64 parameters, not its tensors
        o, r = reference.fused_add_norm(
            x2d, residual2d, weight, bias=bias, eps=norm.eps, norm=_NORMS[norm.kind], bank=bank, index=index,
            weight_offset=norm.weight_offset, fire_counts=fire_counts)
        if out is not None:
            o = out.copy_(o)
        if residual_out is not None:
            r = residual_out.copy_(r)
        return o, r
    return invoke(launch, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out)
