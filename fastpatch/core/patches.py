"""User-facing patch constructors and the one canonical form they compile to.

Every patch, whatever its kind, acts on a residual-stream row h in R^D as

    h' = h + g(h) * (φ(h @ down.T + bias) @ up + shift)

with ``down`` and ``up`` of shape [r, D] (r may be 0), ``bias`` [r], ``shift`` [D],
a gate g(h) in {0, 1} and a per-component activation φ on z = h·downᵀ + bias: identity
(the default), ReLU, or JumpReLU (z where z > θ_i and z > 0, else 0: SAELens' JumpReLUSAE,
ReLU(z)·[z > θ]). Backends only ever see that form (stacked into a
:class:`~fastpatch.core.bank.PatchBank`), so adding a patch kind never touches a kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# Gate modes as the kernels see them (one int32 per patch).
GATE_NONE = 0
GATE_COSINE_ABOVE = 1
GATE_COSINE_BELOW = 2
GATE_PROJECTION_ABOVE = 3
GATE_PROJECTION_BELOW = 4

# Activations on z = h·downᵀ + bias, per component, as the kernels see them. Every kernel applies
# one as φ(z) = z if z > t else 0 with a per-component level t (-inf, 0, max(θ, 0)): see
# PatchBank.act_threshold.
ACT_IDENTITY = 0
ACT_RELU = 1
ACT_JUMPRELU = 2
ACTIVATIONS = {"identity": ACT_IDENTITY, "relu": ACT_RELU, "jumprelu": ACT_JUMPRELU}

_METRICS = ("cosine", "projection")
_FIRE = ("above", "below")


def _as_float_tensor(name: str, value: Any, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as exc:  # pragma: no cover - message is what matters
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}") from exc
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if value.numel() == 0 and ndim == 1:
        raise ValueError(f"{name} must not be empty")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.detach()


def _unit(name: str, u: torch.Tensor) -> torch.Tensor:
    u64 = u.to(torch.float64)
    norm = float(u64.norm())
    if norm == 0.0 or not math.isfinite(norm):
        raise ValueError(f"{name} must be a non-zero direction (its norm is {norm})")
    return u64 / norm


@dataclass(frozen=True)
class Gate:
    """Fire the patch on a row only where metric(h, condition) crosses ``threshold``."""

    condition: torch.Tensor  # [D], unit norm, float64
    threshold: float
    metric: str = "cosine"
    fire: str = "above"

    @property
    def mode(self) -> int:
        base = GATE_COSINE_ABOVE if self.metric == "cosine" else GATE_PROJECTION_ABOVE
        return base + (0 if self.fire == "above" else 1)

    def same_as(self, other: "Gate") -> bool:
        return (
            self.metric == other.metric
            and self.fire == other.fire
            and self.threshold == other.threshold
            and self.condition.shape == other.condition.shape
            and bool(torch.equal(self.condition, other.condition))
        )


@dataclass(frozen=True)
class CanonicalPatch:
    """The one form every backend applies: h + g(h)·(φ(h·downᵀ + bias)·up + shift).

    Tensors are float64 on the CPU; a bank converts them to the serving dtype/device.
    ``activation``: φ for every component ("identity", "relu", "jumprelu"), or a tuple with one
    name per component (what :func:`fastpatch.compose` makes of mixed parts). ``threshold`` [r]:
    the JumpReLU thresholds θ (required when a component is "jumprelu"; entries of the other
    components are ignored).
    """

    down: torch.Tensor  # [r, D]
    bias: torch.Tensor  # [r]
    up: torch.Tensor  # [r, D]
    shift: torch.Tensor  # [D]
    gate: Optional[Gate] = None
    kind: str = "affine"
    params: dict = field(default_factory=dict, compare=False)
    activation: Any = "identity"  # str, or tuple of str (one per component)
    threshold: Optional[torch.Tensor] = None  # [r], JumpReLU θ

    @property
    def activations(self) -> tuple:
        """The activation name of each of the r components."""
        if isinstance(self.activation, str):
            return (self.activation,) * self.rank
        return tuple(self.activation)

    @property
    def is_identity(self) -> bool:
        """True when φ is the identity on every component (the patch is affine in h)."""
        return all(a == "identity" for a in self.activations)

    @property
    def hidden_size(self) -> int:
        return int(self.shift.shape[0])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def canonical(self) -> "CanonicalPatch":
        return self

    def __post_init__(self) -> None:
        d = self.shift.shape[0]
        r = self.down.shape[0]
        if self.down.shape != (r, d) or self.up.shape != (r, d) or self.bias.shape != (r,):
            raise ValueError(
                "canonical patch shapes disagree: "
                f"down {tuple(self.down.shape)}, up {tuple(self.up.shape)}, "
                f"bias {tuple(self.bias.shape)}, shift {tuple(self.shift.shape)}"
            )
        if self.gate is not None and self.gate.condition.shape != (d,):
            raise ValueError(
                f"gate condition has shape {tuple(self.gate.condition.shape)}, expected ({d},)"
            )
        self._check_activation(r)

    def _check_activation(self, r: int) -> None:
        act = self.activation
        names = [act] if isinstance(act, str) else list(act) if isinstance(act, (tuple, list)) else None
        if names is None or not all(isinstance(a, str) for a in names):
            raise TypeError(f"activation must be one of {tuple(ACTIVATIONS)} or a tuple of them (one per "
                            f"component), got {act!r}")
        for a in names:
            if a not in ACTIVATIONS:
                raise ValueError(f"activation {a!r} is not one of {tuple(ACTIVATIONS)}")
        if not isinstance(act, str):
            if len(names) != r:
                raise ValueError(f"activation has {len(names)} entries, the patch has rank {r}: give one "
                                 "name per component, or one name for all")
            if len(set(names)) <= 1:  # one name for all: keep the plain form (compare, files, repr)
                object.__setattr__(self, "activation", names[0] if names else "identity")
            else:
                object.__setattr__(self, "activation", tuple(names))
        needs = "jumprelu" in names
        if self.threshold is None:
            if needs and r > 0:
                raise ValueError("a jumprelu activation needs threshold=[θ_1..θ_r] (one per component): "
                                 "pass the SAE's per-feature thresholds")
            return
        thr = _as_float_tensor("threshold", self.threshold, 1) if r > 0 else self.threshold.detach()
        if thr.shape != (r,):
            raise ValueError(f"threshold must have shape ({r},) (one per component), got {tuple(thr.shape)}")
        if not needs:
            raise ValueError(f"threshold is only used by jumprelu components; this patch's activation is "
                             f"{self.activation!r}: drop threshold= or use activation='jumprelu'")
        object.__setattr__(self, "threshold", thr.to(torch.float64))

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """φ(z) for z [N, r] in z's dtype: identity, ReLU or JumpReLU (ReLU(z)·[z > θ]) per component."""
        if self.is_identity:
            return z
        acts = self.activations
        relu = torch.tensor([a != "identity" for a in acts], device=z.device)
        out = torch.where(relu & (z <= 0), torch.zeros_like(z), z)
        if self.threshold is not None:
            jump = torch.tensor([a == "jumprelu" for a in acts], device=z.device)
            thr = self.threshold.to(device=z.device, dtype=z.dtype)
            out = torch.where(jump & (z <= thr), torch.zeros_like(z), out)
        return out

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The ungated edit for rows ``h`` [N, D], in h's dtype (used by the reference and hooks)."""
        dt = h.dtype
        out = self.shift.to(device=h.device, dtype=dt).expand_as(h).clone()
        if self.rank:
            z = h @ self.down.to(device=h.device, dtype=dt).T + self.bias.to(device=h.device, dtype=dt)
            out = out + self.activate(z) @ self.up.to(device=h.device, dtype=dt)
        return out

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        """Boolean [N]: where the gate lets the patch act on rows ``h`` [N, D]."""
        if self.gate is None:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        c = self.gate.condition.to(device=h.device, dtype=h.dtype)
        proj = h @ c
        if self.gate.metric == "cosine":
            hn = h.norm(dim=-1)
            metric = torch.where(hn > 0, proj / torch.where(hn > 0, hn, torch.ones_like(hn)), torch.zeros_like(hn))
        else:
            metric = proj
        if self.gate.fire == "above":
            return metric > self.gate.threshold
        return metric < self.gate.threshold

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """h' for rows ``h`` [N, D] in h's dtype: the patch's definition in plain torch ops."""
        g = self.fires(h).to(h.dtype).unsqueeze(-1)
        return h + g * self.delta(h)


class Patch:
    """Base of the public constructors: they keep their own parameters and compile to canonical."""

    kind = "patch"

    def canonical(self) -> CanonicalPatch:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.canonical().hidden_size

    @property
    def rank(self) -> int:
        return self.canonical().rank

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.canonical().apply(h)

    def __repr__(self) -> str:
        c = self.canonical()
        return f"{type(self).__name__}(hidden_size={c.hidden_size}, rank={c.rank})"


def _empty_lowrank(d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = torch.zeros(0, d, dtype=torch.float64)
    return z, torch.zeros(0, dtype=torch.float64), z.clone()


class Steer(Patch):
    """Add a steering vector: δ = scale·v."""

    kind = "steer"

    def __init__(self, v: torch.Tensor, scale: float = 1.0):
        self.v = _as_float_tensor("Steer vector v", v, 1)
        if not math.isfinite(float(scale)):
            raise ValueError(f"Steer scale must be finite, got {scale}")
        self.scale = float(scale)
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            d = self.v.shape[0]
            down, bias, up = _empty_lowrank(d)
            self._canon = CanonicalPatch(
                down, bias, up, self.v.to(torch.float64) * self.scale,
                kind=self.kind, params={"scale": self.scale},
            )
        return self._canon

    # Steering arithmetic: δ = scale·v is linear in v, so sums, multiples and negations of
    # steering patches are steering patches again. Other kinds combine with fastpatch.compose.
    def _effective(self) -> torch.Tensor:
        return self.v.to(torch.float64) * self.scale

    def _check_other(self, other: Any, op: str) -> "Steer":
        if isinstance(other, Steer):
            if other.v.shape != self.v.shape:
                raise ValueError(f"Steer {op}: vector sizes differ ({self.v.shape[0]} vs {other.v.shape[0]})")
            return other
        if isinstance(other, (Patch, CanonicalPatch)):
            raise TypeError(f"Steer {op} {type(other).__name__}: only steering patches add up; "
                            "use fastpatch.compose(p1, p2) to chain other kinds")
        return NotImplemented

    def __add__(self, other: Any) -> "Steer":
        other = self._check_other(other, "+")
        if other is NotImplemented:
            return other
        if self.v is other.v or (self.v.dtype == other.v.dtype and bool(torch.equal(self.v, other.v))):
            return Steer(self.v, self.scale + other.scale)  # same direction: keep it, add the scales
        return Steer(self._effective() + other._effective(), 1.0)

    def __radd__(self, other: Any) -> "Steer":
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self  # lets sum([s1, s2, ...]) start from 0
        return self.__add__(other)

    def __sub__(self, other: Any) -> "Steer":
        other = self._check_other(other, "-")
        if other is NotImplemented:
            return other
        return self + (-other)

    def __neg__(self) -> "Steer":
        return Steer(self.v, -self.scale)

    def __mul__(self, factor: Any) -> "Steer":
        if isinstance(factor, torch.Tensor) and factor.numel() == 1:
            factor = float(factor)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            return NotImplemented
        return Steer(self.v, self.scale * float(factor))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Steer(hidden_size={self.v.shape[0]}, scale={self.scale})"


class Ablate(Patch):
    """Remove the component along u: δ = −(h·û)û."""

    kind = "ablate"

    def __init__(self, u: torch.Tensor):
        self.u = _as_float_tensor("Ablate direction u", u, 1)
        self._unit = _unit("Ablate direction u", self.u)
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            u = self._unit
            self._canon = CanonicalPatch(
                u[None].clone(), torch.zeros(1, dtype=torch.float64), -u[None].clone(),
                torch.zeros_like(u), kind=self.kind,
            )
        return self._canon


class Clamp(Patch):
    """Set the projection on û to ``value``: δ = (value − h·û)û."""

    kind = "clamp"

    def __init__(self, u: torch.Tensor, value: float):
        self.u = _as_float_tensor("Clamp direction u", u, 1)
        self._unit = _unit("Clamp direction u", self.u)
        if not math.isfinite(float(value)):
            raise ValueError(f"Clamp value must be finite, got {value}")
        self.value = float(value)
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            u = self._unit
            self._canon = CanonicalPatch(
                u[None].clone(), torch.tensor([-self.value], dtype=torch.float64), -u[None].clone(),
                torch.zeros_like(u), kind=self.kind, params={"value": self.value},
            )
        return self._canon


class LowRank(Patch):
    """Low-rank affine edit: δ = scale·(h·A + bias)·B with A [D, r], B [r, D], bias [r]."""

    kind = "lowrank"

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 scale: float = 1.0):
        self.A = _as_float_tensor("LowRank A", A, 2)
        self.B = _as_float_tensor("LowRank B", B, 2)
        d, r = self.A.shape
        if self.B.shape != (r, d):
            raise ValueError(
                f"LowRank B must have shape (rank, hidden) = ({r}, {d}) to match A {tuple(self.A.shape)}, "
                f"got {tuple(self.B.shape)}"
            )
        if bias is None:
            self.bias = None
        else:
            self.bias = _as_float_tensor("LowRank bias", bias, 1)
            if self.bias.shape != (r,):
                raise ValueError(f"LowRank bias must have shape ({r},), got {tuple(self.bias.shape)}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"LowRank scale must be finite, got {scale}")
        self.scale = float(scale)
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            d, r = self.A.shape
            bias = torch.zeros(r, dtype=torch.float64) if self.bias is None else self.bias.to(torch.float64)
            self._canon = CanonicalPatch(
                self.A.to(torch.float64).T.contiguous(), bias.clone(),
                self.B.to(torch.float64) * self.scale, torch.zeros(d, dtype=torch.float64),
                kind=self.kind, params={"scale": self.scale},
            )
        return self._canon


class Encoded(Patch):
    """Encode, activate, decode: δ = φ(h·downᵀ + bias)·up + shift, φ per component.

    ``down`` [r, D] (rows: encoder directions, e.g. an SAE's W_enc columns), ``bias`` [r] (e.g.
    b_enc − b_dec·W_enc), ``up`` [r, D] (what each active component adds, e.g. −W_dec rows for an
    ablation), ``shift`` [D]. ``activation``: "identity", "relu" or "jumprelu" (ReLU(z)·[z > θ],
    SAELens' JumpReLUSAE), or one name per component; ``threshold`` [r]: θ, for jumprelu.
    """

    kind = "encoded"

    def __init__(self, down: torch.Tensor, bias: Optional[torch.Tensor], up: torch.Tensor,
                 shift: Optional[torch.Tensor] = None, activation: Any = "relu",
                 threshold: Optional[torch.Tensor] = None):
        self.down = _as_float_tensor("Encoded down", down, 2)
        self.up = _as_float_tensor("Encoded up", up, 2)
        r, d = self.down.shape
        if self.up.shape != (r, d):
            raise ValueError(f"Encoded up must have the shape of down {(r, d)} (rank, hidden), "
                             f"got {tuple(self.up.shape)}")
        self.bias = None if bias is None else _as_float_tensor("Encoded bias", bias, 1)
        if self.bias is not None and self.bias.shape != (r,):
            raise ValueError(f"Encoded bias must have shape ({r},), got {tuple(self.bias.shape)}")
        self.shift = None if shift is None else _as_float_tensor("Encoded shift", shift, 1)
        if self.shift is not None and self.shift.shape != (d,):
            raise ValueError(f"Encoded shift must have shape ({d},), got {tuple(self.shift.shape)}")
        # lists become tuples (hashable, as CanonicalPatch keeps them); anything else is its to refuse
        self.activation = tuple(activation) if isinstance(activation, list) else activation
        self.threshold = None if threshold is None else torch.as_tensor(threshold)
        self._canon: Optional[CanonicalPatch] = None
        self.canonical()  # validates activation/threshold now, not at first use

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            r, d = self.down.shape
            f = torch.float64
            self._canon = CanonicalPatch(
                self.down.to(f).clone(),
                torch.zeros(r, dtype=f) if self.bias is None else self.bias.to(f).clone(),
                self.up.to(f).clone(),
                torch.zeros(d, dtype=f) if self.shift is None else self.shift.to(f).clone(),
                kind=self.kind, activation=self.activation,
                threshold=None if self.threshold is None else self.threshold.to(f).clone(),
            )
        return self._canon

    def __repr__(self) -> str:
        c = self.canonical()
        return f"Encoded(hidden_size={c.hidden_size}, rank={c.rank}, activation={c.activation!r})"


class LoReFT(Patch):
    """pyreft's intervention: δ = Rᵀ(W h + b − R h) with R, W [r, D] and b [r]."""

    kind = "loreft"

    def __init__(self, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
        self.R = _as_float_tensor("LoReFT R", R, 2)
        self.W = _as_float_tensor("LoReFT W", W, 2)
        self.b = _as_float_tensor("LoReFT b", b, 1)
        r, d = self.R.shape
        if self.W.shape != (r, d):
            raise ValueError(f"LoReFT W must have the shape of R {(r, d)}, got {tuple(self.W.shape)}")
        if self.b.shape != (r,):
            raise ValueError(f"LoReFT b must have shape ({r},), got {tuple(self.b.shape)}")
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            R = self.R.to(torch.float64)
            W = self.W.to(torch.float64)
            self._canon = CanonicalPatch(
                (W - R).contiguous(), self.b.to(torch.float64).clone(), R.clone(),
                torch.zeros(R.shape[1], dtype=torch.float64), kind=self.kind,
            )
        return self._canon


class Gated(Patch):
    """Apply ``patch`` only on rows where metric(h, condition) is above/below ``threshold``.

    metric "cosine": h·c/(‖h‖‖c‖) (0 where ‖h‖ = 0); "projection": h·c/‖c‖.
    The gate is computed on h before the patch.
    """

    kind = "gated"

    def __init__(self, patch: Patch, condition: torch.Tensor, threshold: float,
                 metric: str = "cosine", fire: str = "above"):
        if not isinstance(patch, (Patch, CanonicalPatch)):
            raise TypeError(f"Gated patch must be a fastpatch patch, got {type(patch).__name__}")
        if metric not in _METRICS:
            raise ValueError(f"Gated metric must be one of {_METRICS}, got {metric!r}")
        if fire not in _FIRE:
            raise ValueError(f"Gated fire must be one of {_FIRE}, got {fire!r}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"Gated threshold must be finite, got {threshold}")
        inner = patch.canonical()
        if inner.gate is not None:
            raise ValueError("Gated patch is already gated; a patch has at most one gate")
        self.patch = patch
        self.condition = _as_float_tensor("Gated condition", condition, 1)
        if self.condition.shape[0] != inner.hidden_size:
            raise ValueError(
                f"Gated condition has size {self.condition.shape[0]}, patch hidden size is {inner.hidden_size}"
            )
        self._unit_condition = _unit("Gated condition", self.condition)
        self.threshold = float(threshold)
        self.metric = metric
        self.fire = fire
        self._canon: Optional[CanonicalPatch] = None

    def canonical(self) -> CanonicalPatch:
        if self._canon is None:
            inner = self.patch.canonical()
            gate = Gate(self._unit_condition, self.threshold, self.metric, self.fire)
            self._canon = CanonicalPatch(
                inner.down, inner.bias, inner.up, inner.shift, gate=gate,
                kind=inner.kind, params=dict(inner.params), activation=inner.activation,
                threshold=inner.threshold,
            )
        return self._canon


def to_canonical(patch: Any) -> CanonicalPatch:
    if isinstance(patch, (Patch, CanonicalPatch)):
        return patch.canonical()
    raise TypeError(f"expected a fastpatch patch (Steer, Ablate, ...), got {type(patch).__name__}")
