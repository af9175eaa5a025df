"""The differentiable fused op (add + patch + norm with a hand-written backward) and the bank it trains.

The kernels have no backward. When the stream or a parameter needs a gradient, the integrations call
:func:`run` instead of a backend's ``run`` (same arguments, a NormSpec and the bank's KernelArgs, plus
the backend's ``run`` first):

- forward: h = x + residual in fp32, the patch in fp32 torch ops (one [N, P·R] matmul each way, never
  an [N, R, D] gather), h' rounded to x's dtype, then the backend kernel for the norm of h' (out and
  residual_out exactly as the kernels define them). The patch runs in torch rather than in the kernel so
  that the gate decisions the backward uses are the ones the forward made (a kernel's reduction order
  could flip a row sitting on the threshold).
- saved for backward: a private copy of h' in x's dtype (N·D; a copy, so that a hook editing the
  returned stream in place, as steering-vectors and pyvene do, cannot invalidate it), z = h·downᵀ + bias
  [N, R] fp32 (after the activation, with its mask [z > t] when the bank has one), the row's patch k
  and gate mask [N]. Everything else (rstd, mean, the normalised rows, h
  before the patch = h' − m·(z·up + shift)) is recomputed in the backward.
- backward, in fp32 per row: RMSNorm / LayerNorm with ``weight + weight_offset`` (Gemma's 1 + w), then
  the patch: dh = dh' + m·((dh'·upᵀ)·φ'(z))·down, where φ'(z) = [z > t] for a component's activation
  (1 for the identity, the indicator for ReLU / JumpReLU: the jump itself is piecewise constant, so the
  threshold θ gets no gradient, as with gates). Gradients go to x, residual, the norm's weight and bias and
  the bank's down / bias / up / shift. Gates are piecewise constant: no gradient through g(h) and none to
  the gate's direction or threshold (the float64 reference, differentiated by torch, says the same).

:class:`TrainableBank` is a :class:`~fastpatch.core.bank.PatchBank` whose down / bias / up / shift are
``torch.nn.Parameter`` s (or any tensors you assign, e.g. a LoReFT built each step from an orthogonal
parametrisation): put it at a site with ``fastpatch.apply`` and hand ``bank.parameters()`` to an
optimiser. The kernels read those very tensors on every call (no copies).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.bank import PatchBank
from ..core.patches import (ACT_JUMPRELU, ACTIVATIONS, GATE_COSINE_ABOVE, GATE_COSINE_BELOW, GATE_NONE,
                            GATE_PROJECTION_ABOVE, CanonicalPatch)
from ..core.reference import NORM_KINDS
from . import backends
from .backends.calls import NormSpec
from .checks import check_inputs

_RMS = NORM_KINDS["rms"]
_TRAINED = ("down", "bias", "up", "shift")
_ACT_NAMES = {code: name for name, code in ACTIVATIONS.items()}


# --------------------------------------------------------------------------------------------------
# The trainable bank
# --------------------------------------------------------------------------------------------------
class TrainableBank(PatchBank):
    """A bank whose ``down`` [P, R, D], ``bias`` [P, R], ``up`` [P, R, D] and ``shift`` [P, D] are
    trainable tensors, initialised from ``patches`` (gates, if any, stay fixed).

    ``bank.parameters()`` are leaf ``nn.Parameter`` s; an optimiser updating them in place changes what
    the next forward applies. For a patch whose canonical tensors are functions of your own parameters
    (LoReFT: down = W − R, up = R with R orthonormal), call :meth:`assign` with the freshly computed
    tensors before each forward; gradients then flow on into your parameters.

    ``patches`` / ``canonical_patches`` / ``float64()`` read the current values (the reference and patch
    files see what was trained); :meth:`snapshot` freezes them into a plain :class:`PatchBank`.
    """

    def __init__(self, patches, hidden_size: Optional[int] = None, *, device=None, dtype=torch.float32):
        super().__init__(patches, hidden_size, device=device, dtype=dtype)
        self._live = True

    @property
    def num_patches(self) -> int:
        return len(self.__dict__["_initial"])

    # PatchBank.__init__ assigns these two; here they are views of the live tensors.
    @property
    def canonical_patches(self) -> list:
        if "_live" not in self.__dict__:  # inside PatchBank.__init__
            return self._initial
        f = self.float64()
        # every patch at the bank's full rank: rows that were zero padding may have been trained
        # activations stay fixed (like gates), per component at the full rank
        acts = [tuple(_ACT_NAMES[int(a)] for a in row) for row in f["act_mode"]]
        return [CanonicalPatch(f["down"][k].clone(), f["bias"][k].clone(), f["up"][k].clone(), f["shift"][k].clone(),
                               gate=c.gate, kind="affine", activation=acts[k] or "identity",
                               threshold=f["act_jump"][k].clone() if (f["act_mode"][k] == ACT_JUMPRELU).any() else None)
                for k, c in enumerate(self._initial)]

    @canonical_patches.setter
    def canonical_patches(self, value) -> None:
        self.__dict__["_initial"] = list(value)

    @property
    def patches(self) -> list:
        return self.canonical_patches

    @patches.setter
    def patches(self, value) -> None:
        pass  # the initial Patch objects describe the start only; canonical_patches is what is current

    def _materialise(self, device, dtype) -> None:
        super()._materialise(device, dtype)
        for name in _TRAINED:
            setattr(self, name, torch.nn.Parameter(getattr(self, name).detach().clone()))
        # A shift that starts at zero may not stay zero: the kernels must always read it.
        self.has_shift = True

    def parameters(self) -> list:
        """The trainable leaf tensors (down, bias, up, shift; those that are leaves requiring grad)."""
        return [t for t in (getattr(self, n) for n in _TRAINED) if t.is_leaf and t.requires_grad]

    def assign(self, **tensors) -> "TrainableBank":
        """Replace some of down / bias / up / shift by tensors of the same shape, dtype and device (any
        autograd history is kept). Checked here, so that a bad shape fails before any kernel runs."""
        for name, t in tensors.items():
            if name not in _TRAINED:
                raise ValueError(f"assign() takes {_TRAINED}, got {name!r}")
            cur = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.shape != cur.shape or t.dtype != cur.dtype or t.device != cur.device:
                raise ValueError(f"{name} must be {tuple(cur.shape)} {cur.dtype} on {cur.device} (the bank's "
                                 f"P, R, D, dtype and device), got {tuple(t.shape)} {t.dtype} on {t.device}")
        for name, t in tensors.items():
            setattr(self, name, t if t.is_contiguous() else t.contiguous())
        return self

    def float64(self) -> dict:
        f = dict(super().float64())
        for name in _TRAINED:
            f[name] = getattr(self, name).detach().to(device="cpu", dtype=torch.float64)
        return f

    def snapshot(self) -> PatchBank:
        """A plain (frozen) bank of the current values, e.g. to ``fastpatch.save`` or to use with hooks."""
        return PatchBank(self.canonical_patches, self.hidden_size, device=self.device, dtype=self.dtype)

    def to(self, device=None, dtype=None) -> "TrainableBank":
        """A copy on ``device`` / in ``dtype`` with new leaf parameters holding the current values."""
        new = object.__new__(TrainableBank)
        new.__dict__.update(self.__dict__)
        new._f64 = dict(self._f64, **{n: getattr(self, n).detach().to("cpu", torch.float64) for n in _TRAINED})
        new._materialise(self.device if device is None else torch.device(device),
                         self.dtype if dtype is None else dtype)
        return new


# --------------------------------------------------------------------------------------------------
# The differentiable op
# --------------------------------------------------------------------------------------------------
def needs_grad(x2d, residual2d, weight, bias, bank) -> bool:
    """True when autograd is recording and any input of the op requires grad."""
    if not torch.is_grad_enabled():
        return False
    if x2d.requires_grad or (residual2d is not None and residual2d.requires_grad):
        return True
    if (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad):
        return True
    return bank is not None and (bank.down.requires_grad or bank.up.requires_grad or bank.bias.requires_grad
                                 or bank.shift.requires_grad)


def _rows(index, N: int, P: int, gate, h):
    """(k, m): each row's patch (int64 [N], 0 where none) and its gate mask (fp32 [N], 1 = applied);
    (None, None) when one patch applies to every row (no index, no gate: the common training case,
    which then needs no gathers and no masks)."""
    if index is None and gate is None and P == 1:
        return None, None
    if index is None:
        k = torch.zeros(N, dtype=torch.long, device=h.device)
        fires = None
    else:
        idx = index.reshape(N).long()
        fires = (idx >= 0) & (idx < P)
        k = torch.where(fires, idx, torch.zeros_like(idx))
    if gate is not None:
        gdir, gthr, gmode = gate
        proj = (h @ gdir.to(h.dtype).t()).gather(1, k.unsqueeze(1)).squeeze(1)  # [N, P] then the row's patch
        hn = h.norm(dim=-1)
        safe = torch.where(hn > 0, hn, torch.ones_like(hn))
        cosine = torch.where(hn > 0, proj / safe, torch.zeros_like(hn))
        mode = gmode.long()[k]
        metric = torch.where((mode == GATE_COSINE_ABOVE) | (mode == GATE_COSINE_BELOW), cosine, proj)
        thr = gthr.to(h.dtype)[k]
        above = (mode == GATE_COSINE_ABOVE) | (mode == GATE_PROJECTION_ABOVE)
        f = torch.where(above, metric > thr, metric < thr) | (mode == GATE_NONE)
        fires = f if fires is None else fires & f
    if fires is None:
        return k, torch.ones(N, dtype=h.dtype, device=h.device)
    return k, fires.to(h.dtype)


def _acc(dtype):
    """The accumulation dtype: fp32 as the kernels use (float64 only for gradcheck through the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked(t, m):
    """Rows of ``t`` times the gate mask ``m`` (None: every row applied)."""
    return t if m is None else t * m.unsqueeze(1)


def _shift_rows(shift, k, m):
    """Each row's shift, gated: [D] (broadcast) when one patch applies to every row, else [N, D]."""
    if k is None:
        return shift[0]
    return shift[k] * m.unsqueeze(1)


def _block(z, k, P: int):
    """[N, R] → [N, P·R] with row n's values in block k[n] and zeros elsewhere (P == 1: z itself).
    A matmul with a bank tensor viewed as [P·R, D] then applies each row's own patch without
    gathering a [N, R, D] tensor."""
    if P == 1:
        return z
    N, R = z.shape
    out = z.new_zeros(N, P, R)
    out.scatter_(1, k.view(N, 1, 1).expand(N, 1, R), z.unsqueeze(1))
    return out.view(N, P * R)


def _unblock(zf, k, P: int):
    """[N, P·R] → [N, R]: each row's own block."""
    if P == 1:
        return zf
    N = zf.shape[0]
    R = zf.shape[1] // P
    return zf.view(N, P, R).gather(1, k.view(N, 1, 1).expand(N, 1, R)).squeeze(1)


class _FusedAddPatchNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, residual, weight, nbias, down, lbias, up, shift, run, norm, P, gate, act, index, fire_counts):
        N, D = x.shape
        ctx.cfg = (norm.eps, norm.kind, norm.weight_offset, residual is not None, x.dtype,
                   None if nbias is None else nbias.dtype)
        if not P:  # no bank: the kernel does add + norm
            out, h1 = run(x, residual, weight, nbias, norm, None, None, None)
            ctx.save_for_backward(h1.clone(), weight)
            ctx.bank = None
            return out, h1
        R = down.shape[1] if down is not None else 0
        acc = _acc(x.dtype)
        h = x.to(acc)
        if residual is not None:
            h = h + residual.to(acc)
        k, m = _rows(index, N, P, gate, h)
        # no shift (a bank whose shifts are all zero): h itself, copied when nothing else makes a new tensor
        hp = (h if R else h.clone()) if shift is None else h + _shift_rows(shift.to(acc), k, m)
        z = None
        if R:
            zf = torch.addmm(lbias.to(acc).reshape(1, P * R), h, down.to(acc).reshape(P * R, D).t())
            z = _unblock(zf, k, P)
            if act is not None:  # φ(z) = z if z > t else 0 per component (t: PatchBank.act_threshold)
                level = act.to(acc)[0] if k is None else act.to(acc)[k]
                amask = z > level
                z = torch.where(amask, z, torch.zeros_like(z))
            hp = torch.addmm(hp, _block(_masked(z, m), k, P), up.to(acc).reshape(P * R, D))
        h1 = hp.to(x.dtype)
        out, _ = run(h1, None, weight, nbias, norm, None, None, None, None, h1)
        if fire_counts is not None:
            if k is None:
                fire_counts.add_(N)
            else:
                fire_counts.index_add_(0, k, m.to(fire_counts.dtype))
        ctx.save_for_backward(h1.clone(), weight, z, k, m, down, up, shift,
                              amask if (R and act is not None) else None)
        ctx.bank = (P, R)
        return out, h1

    @staticmethod
    def backward(ctx, g_out, g_res):
        eps, norm_kind, offset, has_res, xdtype, nbdtype = ctx.cfg
        saved = ctx.saved_tensors
        h1, weight = saved[0], saved[1]
        need = ctx.needs_input_grad
        acc = _acc(xdtype)
        y = h1.to(acc)
        N, D = y.shape
        dw = dnb = None
        dh = None
        if g_out is not None:
            if norm_kind == _RMS:
                rstd = torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
                yhat = y * rstd
            else:
                yc = y - y.mean(-1, keepdim=True)
                rstd = torch.rsqrt(yc.square().mean(-1, keepdim=True) + eps)
                yhat = yc * rstd
            go = g_out.to(acc)
            if need[2]:
                dw = (go * yhat).sum(0).to(weight.dtype)
            if need[3]:
                dnb = go.sum(0).to(nbdtype)
            gy = go * (weight.to(acc) + offset) if weight is not None else go * (1.0 + offset)
            c = (gy * yhat).mean(-1, keepdim=True)
            if norm_kind == _RMS:
                dh = rstd * (gy - yhat * c)
            else:
                dh = rstd * (gy - gy.mean(-1, keepdim=True) - yhat * c)
        if g_res is not None:
            dh = g_res.to(acc) if dh is None else dh + g_res.to(acc)
        if dh is None:
            dh = y.new_zeros(N, D)
        ddown = dlb = dup = dshift = None
        if ctx.bank is not None:
            P, R = ctx.bank
            z, k, m, down, up, shift, amask = saved[2:]
            if need[7]:
                if k is None:
                    dshift = dh.sum(0, keepdim=True)
                else:
                    dshift = torch.zeros(P, D, dtype=acc, device=y.device).index_add_(0, k, _masked(dh, m))
                dshift = dshift.to(shift.dtype)
            if R:
                up2 = up.to(acc).reshape(P * R, D)
                down2 = down.to(acc).reshape(P * R, D)
                dz = _masked(_unblock(dh @ up2.t(), k, P), m)  # dL/dz per row (its own patch), gated
                if amask is not None:
                    dz = dz * amask.to(dz.dtype)  # φ'(z): the indicator [z > t]; θ gets no gradient
                dzb = _block(dz, k, P)
                if need[5]:
                    dlb = dzb.sum(0).view(P, R).to(up.dtype)
                zb = _block(_masked(z, m), k, P) if (need[4] or need[6]) else None
                if need[6]:
                    dup = (zb.t() @ dh).view(P, R, D).to(up.dtype)
                if need[4]:
                    # h before the patch, recovered from h' (h = h' − m·(z·up + shift)): no N·D saved for it
                    hpre = torch.addmm(y if shift is None else y - _shift_rows(shift.to(acc), k, m), zb, up2,
                                       alpha=-1)
                    ddown = (dzb.t() @ hpre).view(P, R, D).to(down.dtype)
                dh = torch.addmm(dh, dzb, down2)
        dx = dh.to(xdtype) if (need[0] or need[1]) else None
        return (dx if need[0] else None, dx if (has_res and need[1]) else None, dw, dnb,
                ddown, dlb, dup, dshift, None, None, None, None, None, None, None)


def run(fast_run, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
    """A backend's ``run`` (see :mod:`fastpatch.kernels.backends`: ``norm`` a NormSpec, ``args`` the bank's
    ``kernel_args()`` or None), differentiable; ``fast_run`` is the backend's ``run`` used for the norm.
    ``out`` / ``residual_out`` are not supported (autograd needs fresh outputs): pass None."""
    if out is not None or residual_out is not None:
        raise ValueError("the differentiable op allocates its outputs: out and residual_out must be None")
    if args is None:
        tensors, P, gate, act = (None, None, None, None), 0, None, None
    else:
        tensors = args[:4]  # down, down_bias, up (None at rank 0), shift (None when every shift is zero)
        P = args.num_patches
        gate = (args.gate_dir, args.gate_threshold, args.gate_mode) if args.gate_dir is not None else None
        act = args.act_threshold
    return _FusedAddPatchNorm.apply(x2d, residual2d, weight, bias, *tensors, fast_run, norm, P, gate, act, index,
                                    fire_counts)


def fused_add_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], *,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6, norm: str = "rms",
                   bank: Optional[PatchBank] = None, index: Optional[torch.Tensor] = None,
                   weight_offset: float = 0.0, fire_counts: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None):
    """:func:`fastpatch.fused_add_norm` with a backward: same arguments (no ``out`` / ``residual_out``),
    same checks, same outputs; gradients flow to x, residual, weight, bias and the bank's tensors."""
    x2d, res2d, w, b, norm_kind, idx = check_inputs(
        x, residual, weight, bias, eps, norm, bank, index, weight_offset, fire_counts)
    impl = backends.resolve(backend, x.device, x.dtype)
    if x2d.shape[0] == 0:
        return torch.empty_like(x), torch.empty_like(x)
    o, r = run(impl.run, x2d, res2d, w, b, NormSpec(norm_kind, float(eps), float(weight_offset)),
               None if bank is None else bank.kernel_args(), idx, fire_counts)
    return o.view_as(x), r.view_as(x)
