"""The public fused op: input checks, backend choice, and the call into one backend.

All checks (:func:`fastpatch.kernels.checks.check_inputs`) run in Python before any kernel runs, so
that a bad call gets a clear error naming the argument instead of an out-of-bounds read in a kernel.
The kernels have no backward: a call that needs a gradient goes to the differentiable op in
:mod:`fastpatch.kernels.autograd` instead (same arguments, same outputs).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import autograd as _autograd
from . import backends
from .backends import NormSpec
from ..core.bank import PatchBank
# check_inputs and config live in .checks (shared with .autograd); importable from here as before
from .checks import Config, check_inputs, config  # noqa: F401  (Config: re-exported)


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

    Gradients: when grad mode is on and x, residual, weight, bias or a bank tensor requires grad, the
    call runs :func:`fastpatch.kernels.autograd.fused_add_norm` (the kernel's norm forward with a
    hand-written backward; same outputs), which allocates its outputs: ``out`` / ``residual_out``
    then raise a ValueError.
    """
    # The kernels have no backward; without this a training step would get outputs detached from its
    # parameters and train nothing, silently. Under no_grad / inference_mode (serving, generate) this
    # costs the one is_grad_enabled() call.
    if torch.is_grad_enabled() and _wants_grad(x, residual, weight, bias, bank):
        if out is not None or residual_out is not None:
            raise ValueError(
                "fastpatch.fused_add_norm: out= / residual_out= cannot be filled while an input requires grad "
                "under grad mode: the differentiable op (fastpatch.kernels.autograd) must allocate the outputs "
                "autograd tracks. Drop out= and residual_out= to get gradients, or call under torch.no_grad() "
                "(or pass detached tensors) when no gradient is wanted.")
        return _autograd.fused_add_norm(x, residual, weight, bias=bias, eps=eps, norm=norm, bank=bank, index=index,
                                        weight_offset=weight_offset, fire_counts=fire_counts, backend=backend)
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


def _wants_grad(x, residual, weight, bias, bank) -> bool:
    """Whether any input of the op requires grad (the caller checked that grad mode is on)."""
    try:
        return bool(x.requires_grad or (residual is not None and residual.requires_grad)
                    or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
                    or (bank is not None and (bank.down.requires_grad or bank.up.requires_grad
                                              or bank.bias.requires_grad or bank.shift.requires_grad)))
    except AttributeError:
        return False  # not a tensor / not a bank: the checked path raises the error naming the argument


def _checked_call(x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts, out,
                  residual_out, backend, remember):
    """Every check of check_inputs, then the backend; with ``remember`` records a _Plan for the cpp
    backend (not when a plan exists and declined the call: that would rebuild it on every call)."""
    x2d, res2d, w, b, norm_kind, idx = check_inputs(
        x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts)
    out2d = _check_output("out", out, x)
    res_out2d = _check_output("residual_out", residual_out, x)
    impl = backends.resolve(backend, x.device, x.dtype)  # one dict lookup after the first call
    spec = NormSpec(norm_kind, float(eps), float(weight_offset))
    args = None if bank is None else bank.kernel_args()
    if remember and impl is _cpp_module:
        _remember(weight, w, bias, b, bank, fire_counts, eps, norm, weight_offset, backend, index is None,
                  x.shape[-1], spec, args, impl)
    if x2d.shape[0] == 0:
        return ((torch.empty_like(x) if out is None else out),
                (torch.empty_like(x) if residual_out is None else residual_out))
    o, r = impl.run(x2d, res2d, w, b, spec, args, idx, fire_counts, out2d, res_out2d)
    return o.view_as(x), r.view_as(x)  # view_as: ~1.3 µs each on CPU, view(x.shape) ~3.4 µs


# --- the fast path ---------------------------------------------------------------------------------
#
# check_inputs costs ~10 µs per call, ten times the C++ kernel on a decode step (1 × 576: kernel
# ~0.8 µs). Most of it re-checks the same weight, bank and fire_counts objects on every call. The
# first fully checked call with the cpp backend records a _Plan keyed on those objects (and eps,
# norm, weight_offset, backend, whether an index is given); later calls with the same objects skip
# check_inputs and call the C++ Plan (csrc/cpu/torch_bindings.cpp), which holds the checked tensors
# and calls the op torch.ops.fastpatch.fused_add_norm through the dispatcher from C++:
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

_cpp_module = backends.load("cpp")  # imported up front by the registry; an identity check per call
_MAX_PLANS = 256
_plans: dict = {}
_is_compiling = torch.compiler.is_compiling


def _no_bank():
    return None


class _Plan:
    __slots__ = ("bank", "weight", "bias", "fire_counts", "run", "__weakref__")


def _remember(weight, w, bias, b, bank, fire_counts, eps, norm, weight_offset, backend, index_is_none, hidden,
              spec, args, impl):
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
    plan.run = impl.make_plan(weight, bias, spec, args, hidden).run
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
