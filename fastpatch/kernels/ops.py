"""The public fused op: input checks, backend choice, and the call into one backend.

All checks happen here, in Python, before any kernel runs, so that a bad call gets a
clear error naming the argument instead of an out-of-bounds read in a kernel.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch

from . import backends
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


def fused_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], *,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6, norm: str = "rms",
                   bank: Optional[PatchBank] = None, index: Optional[torch.Tensor] = None,
                   weight_offset: float = 0.0, fire_counts: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None):
    """Residual add, activation patch and norm in one pass.

    h = x + residual (fp32 math; h = x when residual is None), h' = patch(h) by ``bank[index]``,
    ``residual_out`` = h' in x's dtype, ``out`` = norm(residual_out)·(weight + weight_offset) (+ bias).

    Args:
        x, residual: [..., D] float32/bfloat16/float16, same shape, dtype and device.
        weight, bias: [D] norm affine parameters (bias only with ``norm="layer"``); None = none.
        norm: "rms" or "layer".
        bank: a :class:`PatchBank` on x's device, or None for no patch.
        index: int32/int64, one entry per row (−1 = no patch, k = bank patch k); None applies a
            one-patch bank to every row.
        weight_offset: added to weight (Gemma's RMSNorm scales by 1 + w).
        fire_counts: optional int32 [P] buffer; each row where patch k fired adds 1 to entry k.
        out, residual_out: optional preallocated contiguous outputs shaped like x (x's dtype). Either
            may alias x or residual (vLLM writes the sum back into ``residual``): every backend
            reads a row in full before writing it.
        backend: "reference", "cpp", "triton", "cuda" or None (fastest available for the device).

    Returns:
        (out, residual_out), both shaped like x.

    Calling it in a loop: on CPU (cpp backend) the first call checks everything; later calls with
    the same ``weight``, ``bias``, ``bank`` and ``fire_counts`` objects (and the same eps, norm,
    weight_offset, backend) skip those objects' checks and only check the per-call tensors, in C++
    (about 0.5 µs instead of 10). Keep those objects and pass ``out=x, residual_out=residual`` to
    update in place as vLLM's kernel does. Values of the kept objects may change between calls;
    their storage must not be swapped (``.data =``, ``set_``, ``resize_``). Bad input gets the same
    error either way.
    """
    # Fast path (see _Plan): a call whose weight, bias, bank and fire_counts were checked before.
    plan = None
    # Never while torch.compile traces (the pybind11 kernel is opaque to it; is_compiling() is a
    # constant there, so this whole block drops out of the trace).
    if not _is_compiling():
        try:
            plan = _plans[id(weight), id(bank), id(bias), id(fire_counts), eps, norm, weight_offset, backend,
                          index is None]
        except (KeyError, TypeError):  # TypeError: an unhashable argument, which the checked path names
            pass
        if plan is not None and not (plan.bank() is bank and plan.weight is weight and plan.bias is bias
                                     and plan.fire_counts is fire_counts):
            plan = None  # cannot happen while the plan holds its objects; checked, never assumed
        if plan is not None:
            try:
                o = torch.empty_like(x) if out is None else out
                r = torch.empty_like(x) if residual_out is None else residual_out
                # Plan.run checks every tensor it reads or writes (device, dtype, contiguity, sizes,
                # index range) before touching memory; what it does not take goes to the checked
                # path, which raises the error a first call would (or handles e.g. a non-contiguous x).
                if plan.run(x, residual, index, fire_counts, o, r, config.check_index_values):
                    return o, r
            except (RuntimeError, TypeError, ValueError):
                pass
        return _checked_call(x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts,
                             out, residual_out, backend, plan is None)
    return _checked_call(x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts,
                         out, residual_out, backend, False)


def _checked_call(x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts, out,
                  residual_out, backend, remember):
    """Every check of check_inputs, then the backend; with ``remember`` records a _Plan for the cpp
    backend (not when a plan exists and declined the call: that would rebuild it on every call)."""
    x2d, res2d, w, b, norm_kind, idx = check_inputs(
        x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts)
    out2d = _check_output("out", out, x)
    res_out2d = _check_output("residual_out", residual_out, x)
    impl = backends.resolve(backend, x.device, x.dtype)  # one dict lookup after the first call
    if remember and impl.__name__ == _CPP_MODULE:
        _remember(weight, w, bias, b, bank, fire_counts, eps, norm, weight_offset, backend, index is None,
                  x.shape[-1], norm_kind, impl)
    if x2d.shape[0] == 0:
        return (torch.empty_like(x) if out is None else out), (torch.empty_like(x) if residual_out is None else residual_out)
    o, r = impl.run(x2d, res2d, w, b, float(eps), norm_kind, float(weight_offset), bank, idx, fire_counts,
                    out2d, res_out2d)
    return o.view_as(x), r.view_as(x)  # view_as: ~1.3 µs each on CPU, view(x.shape) ~3.4 µs


# --- the fast path ---------------------------------------------------------------------------------
#
# check_inputs costs ~10 µs per call, ten times the C++ kernel on a decode step (1 × 576: kernel
# ~0.8 µs). Most of it re-checks the same weight, bank and fire_counts objects on every call. The
# first fully checked call with the cpp backend records a _Plan keyed on those objects (and eps,
# norm, weight_offset, backend, whether an index is given); later calls with the same objects skip
# check_inputs and call the C++ Plan (csrc/cpu/fused_add_norm.cpp), which holds the checked tensors:
#   - weight, bias and fire_counts are held by the plan (so their ids cannot be reused while it
#     lives); the bank is held by a weak reference and the plan is dropped when the bank dies, so a
#     new bank that gets a dead one's id never finds its plan, and a plan never keeps a bank's
#     tensors alive. At most _MAX_PLANS plans are kept (then all are dropped: small tensors only);
#   - x, residual, out, residual_out and index are new on every call and are checked on every call
#     by the C++ plan before it touches memory: x of the plan's hidden size, every tensor shaped like
#     x, devices, dtypes, contiguity, an index with one entry per row. Anything it does not take re-runs
#     through the checked path, so bad input gets exactly the checked path's error;
#   - index values are range-checked on every call while config.check_index_values is on (a C++
#     scan, ~0.1 µs), so in-place edits of a reused index buffer are caught as before;
#   - what a plan does not see: replacing a checked tensor's storage in place (``weight.data =
#     other``, ``set_``, ``resize_``) or a bank's attributes after the first call. The C++ op still
#     checks the sizes and dtypes of everything it reads, so this can change results but never read
#     out of bounds. Values may change freely (they are read on every call).

_CPP_MODULE = "fastpatch.kernels.backends.cpp"
_MAX_PLANS = 256
_plans: dict = {}
_is_compiling = torch.compiler.is_compiling


def _no_bank():
    return None


class _Plan:
    __slots__ = ("bank", "weight", "bias", "fire_counts", "run", "__weakref__")


def _remember(weight, w, bias, b, bank, fire_counts, eps, norm, weight_offset, backend, index_is_none, hidden,
              norm_kind, impl):
    if w is not weight or b is not bias:
        return  # non-contiguous weight/bias: check_inputs copies them, every call (keep the checked path)
    key = (id(weight), id(bank), id(bias), id(fire_counts), eps, norm, weight_offset, backend, index_is_none)
    plan = _Plan()
    plan_ref = weakref.ref(plan)

    def forget(_dead_bank, key=key):
        if _plans.get(key) is plan_ref():
            _plans.pop(key, None)

    plan.bank = _no_bank if bank is None else weakref.ref(bank, forget)
    plan.weight, plan.bias, plan.fire_counts = weight, bias, fire_counts
    if bank is None:
        bank_args = (None,) * 7
    else:  # the bank's tensors spread as call_flat does (parts no patch uses are None)
        low_rank, gated = bank.rank > 0, bank.has_gate
        bank_args = (bank.down if low_rank else None, bank.bias if low_rank else None,
                     bank.up if low_rank else None, bank.shift if bank.has_shift else None,
                     bank.gate_dir if gated else None, bank.gate_threshold if gated else None,
                     bank.gate_mode)
    plan.run = impl.make_plan(weight, bias, float(eps), norm_kind, float(weight_offset), *bank_args, hidden).run
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan


def _check_output(name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must match x in shape, dtype and device: got {tuple(t.shape)} {t.dtype} "
                         f"{t.device}, x is {tuple(x.shape)} {x.dtype} {x.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t.view(-1, x.shape[-1])
