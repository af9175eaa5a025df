"""PatchBank: P canonical patches stacked into dense tensors that kernels index per row."""
from __future__ import annotations

import weakref
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

from .patches import ACT_IDENTITY, ACT_JUMPRELU, ACTIVATIONS, GATE_NONE, CanonicalPatch, Patch, to_canonical

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelArgs(NamedTuple):
    """A bank as every kernel takes it (:meth:`PatchBank.kernel_args`): the eight bank tensors of the op
    ``torch.ops.fastpatch.fused_add_norm``, in its argument order, then what the launchers read.

    A part no patch uses is None, so the kernel skips it: rank 0 → no ``down`` / ``down_bias`` / ``up``
    (no dots), a zero shift → no ``shift``, no gate → no ``gate_dir`` / ``gate_threshold`` (no gate
    statistics), identity activations only → no ``act_threshold``. ``gate_mode`` is always given: it
    marks a bank (and fixes P) in the op. ``args[:8]`` are the op's bank arguments; ``num_patches`` and
    ``rank`` are what launchers size grids by; ``source()`` is the bank (a weak reference: the bank
    caches its KernelArgs).
    """

    down: Optional[torch.Tensor]
    down_bias: Optional[torch.Tensor]
    up: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    gate_dir: Optional[torch.Tensor]
    gate_threshold: Optional[torch.Tensor]
    gate_mode: torch.Tensor
    act_threshold: Optional[torch.Tensor]
    num_patches: int
    rank: int
    source: Optional[weakref.ref] = None  # the bank they came from (the reference reads its float64 parameters)


# What kernel_args() reads: assigning any of these drops the cached KernelArgs.
_KERNEL_FIELDS = frozenset(("down", "bias", "up", "shift", "gate_dir", "gate_threshold", "gate_mode", "act_threshold",
                            "has_shift", "has_gate", "has_activation", "rank", "patches", "canonical_patches"))


def kernel_args_of(bank) -> KernelArgs:
    """:meth:`PatchBank.kernel_args` computed now from the bank's current attributes (uncached)."""
    low_rank = bank.rank > 0
    gated = bank.has_gate
    return KernelArgs(bank.down if low_rank else None, bank.bias if low_rank else None,
                      bank.up if low_rank else None, bank.shift if bank.has_shift else None,
                      bank.gate_dir if gated else None, bank.gate_threshold if gated else None,
                      bank.gate_mode, bank.act_threshold if low_rank else None, bank.num_patches, bank.rank,
                      weakref.ref(bank))


class PatchBank:
    """P patches in the canonical form, ranks zero-padded to the largest.

    Tensors (P patches, rank R, hidden D), all contiguous on one device:

    - ``down`` [P, R, D], ``bias`` [P, R], ``up`` [P, R, D]: the low-rank part (R may be 0)
    - ``shift`` [P, D]: the constant part
    - ``gate_dir`` [P, D] (unit condition vectors, zero rows for ungated patches),
      ``gate_threshold`` [P] float32, ``gate_mode`` [P] int32 (``fastpatch.core.patches.GATE_*``)

    - ``act_mode`` [P, R] int32 (``fastpatch.core.patches.ACT_*``) and ``act_jump`` [P, R] float64
      (JumpReLU θ): the activation of each component, as the reference reads it;
      ``act_threshold`` [P, R] float32, what the kernels read: φ(z) = z if z > t else 0 with
      t = −inf (identity), 0 (ReLU), max(θ, 0) (JumpReLU: ReLU(z)·[z > θ] is z·[z > max(θ, 0)]).
      ``has_activation`` is False when every component is the identity: the kernels then get
      no ``act_threshold`` and run today's code. Padding components (rank < R) are identity with
      zero down/bias/up, so they add nothing.

    Float tensors are in ``self.dtype`` (float32 by default); ``gate_threshold`` is always
    float32. Validation (shapes, finite values) happens once, here.
    """

    def __init__(self, patches: Sequence[Patch | CanonicalPatch] | Patch | CanonicalPatch,
                 hidden_size: Optional[int] = None, *, device=None, dtype=torch.float32):
        if isinstance(patches, (Patch, CanonicalPatch)):
            patches = [patches]
        patches = list(patches)
        if not patches:
            raise ValueError("PatchBank needs at least one patch")
        canon = [to_canonical(p) for p in patches]
        if hidden_size is None:
            hidden_size = canon[0].hidden_size
        for i, c in enumerate(canon):
            if c.hidden_size != hidden_size:
                raise ValueError(
                    f"patch {i} has hidden size {c.hidden_size}, but the bank's hidden_size is {hidden_size}"
                )
        if dtype not in _PARAM_DTYPES:
            raise TypeError(f"PatchBank dtype must be one of {_PARAM_DTYPES}, got {dtype}")
        self.patches = patches
        self.canonical_patches = canon
        self.hidden_size = int(hidden_size)
        P, D = len(canon), self.hidden_size
        R = max(c.rank for c in canon)
        self.rank = R
        down = torch.zeros(P, R, D, dtype=torch.float64)
        up = torch.zeros(P, R, D, dtype=torch.float64)
        bias = torch.zeros(P, R, dtype=torch.float64)
        shift = torch.zeros(P, D, dtype=torch.float64)
        gate_dir = torch.zeros(P, D, dtype=torch.float64)
        gate_threshold = torch.zeros(P, dtype=torch.float64)
        gate_mode = torch.full((P,), GATE_NONE, dtype=torch.int32)
        act_mode = torch.full((P, R), ACT_IDENTITY, dtype=torch.int32)
        act_jump = torch.zeros(P, R, dtype=torch.float64)
        for k, c in enumerate(canon):
            r = c.rank
            if r and not c.is_identity:
                act_mode[k, :r] = torch.tensor([ACTIVATIONS[a] for a in c.activations], dtype=torch.int32)
                if c.threshold is not None:
                    act_jump[k, :r] = torch.where(act_mode[k, :r] == ACT_JUMPRELU, c.threshold,
                                                  torch.zeros_like(c.threshold))
            down[k, :r] = c.down
            up[k, :r] = c.up
            bias[k, :r] = c.bias
            shift[k] = c.shift
            if c.gate is not None:
                gate_dir[k] = c.gate.condition
                gate_threshold[k] = c.gate.threshold
                gate_mode[k] = c.gate.mode
        for name, t in (("down", down), ("up", up), ("bias", bias), ("shift", shift)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"PatchBank {name} contains NaN or infinite values")
        self._f64 = dict(down=down, up=up, bias=bias, shift=shift, gate_dir=gate_dir,
                         gate_threshold=gate_threshold)
        self.gate_mode = gate_mode
        self.act_mode = act_mode
        self.act_jump = act_jump
        self.has_activation = bool((act_mode != ACT_IDENTITY).any())
        # The kernels' level t per component (see the class docstring); -inf keeps identity
        # components (and padding) linear through the same one compare + select.
        level = torch.where(act_mode == ACT_JUMPRELU, act_jump.clamp(min=0.0), torch.zeros_like(act_jump))
        self._act_level = torch.where(act_mode == ACT_IDENTITY, torch.full_like(level, -float("inf")), level)
        self.has_gate = bool((gate_mode != GATE_NONE).any())
        self.has_shift = bool((shift != 0).any())
        self._materialise(torch.device("cpu") if device is None else torch.device(device), dtype)

    def _materialise(self, device: torch.device, dtype: torch.dtype) -> None:
        f = self._f64
        self.device = device
        self.dtype = dtype
        self.down = f["down"].to(device=device, dtype=dtype).contiguous()
        self.up = f["up"].to(device=device, dtype=dtype).contiguous()
        self.bias = f["bias"].to(device=device, dtype=dtype).contiguous()
        self.shift = f["shift"].to(device=device, dtype=dtype).contiguous()
        self.gate_dir = f["gate_dir"].to(device=device, dtype=dtype).contiguous()
        self.gate_threshold = f["gate_threshold"].to(device=device, dtype=torch.float32).contiguous()
        self.gate_mode = self.gate_mode.to(device=device).contiguous()
        # float32 whatever the bank dtype: θ compares against z, which every kernel holds in fp32
        self.act_threshold = (self._act_level.to(device=device, dtype=torch.float32).contiguous()
                              if self.has_activation else None)

    def __setattr__(self, name, value) -> None:
        object.__setattr__(self, name, value)
        if name in _KERNEL_FIELDS:  # e.g. TrainableBank.assign, vLLM's slots forcing has_shift / has_gate
            object.__setattr__(self, "_kernel_args", None)

    def kernel_args(self) -> KernelArgs:
        """The bank's tensors as the kernels take them (:class:`KernelArgs`): the one place a bank is
        spread into kernel arguments. Built on first use and kept until an attribute it reads is assigned
        (in-place edits of the tensors need nothing: the same tensors are passed)."""
        args = self.__dict__.get("_kernel_args")
        if args is None:
            args = kernel_args_of(self)
            object.__setattr__(self, "_kernel_args", args)
        return args

    @property
    def num_patches(self) -> int:
        return len(self.canonical_patches)

    def __len__(self) -> int:
        return self.num_patches

    def to(self, device=None, dtype=None) -> "PatchBank":
        """A copy on ``device`` with float parameters in ``dtype`` (this bank is left as it is)."""
        new = object.__new__(PatchBank)
        new.__dict__.update(self.__dict__)
        new._materialise(self.device if device is None else torch.device(device),
                         self.dtype if dtype is None else dtype)
        if new.dtype not in _PARAM_DTYPES:
            raise TypeError(f"PatchBank dtype must be one of {_PARAM_DTYPES}, got {new.dtype}")
        return new

    def tensors(self) -> dict:
        """The bank's device tensors by name, as the kernels take them."""
        t = dict(down=self.down, bias=self.bias, up=self.up, shift=self.shift,
                 gate_dir=self.gate_dir, gate_threshold=self.gate_threshold, gate_mode=self.gate_mode)
        if self.act_threshold is not None:  # only with an activation: identity banks list what they always did
            t["act_threshold"] = self.act_threshold
        return t

    def float64(self) -> dict:
        """The exact float64 CPU parameters (what the reference computes with)."""
        return dict(self._f64, gate_mode=self.gate_mode.cpu(), act_mode=self.act_mode, act_jump=self.act_jump)

    def __repr__(self) -> str:
        def act(c):
            return "" if c.is_identity else "+" + (c.activation if isinstance(c.activation, str) else "mixed")
        kinds = ",".join(c.kind + ("+gate" if c.gate is not None else "") + act(c) for c in self.canonical_patches[:8])
        more = "" if self.num_patches <= 8 else f",…(+{self.num_patches - 8})"
        return (f"PatchBank(P={self.num_patches}, hidden_size={self.hidden_size}, rank={self.rank}, "
                f"dtype={self.dtype}, device={self.device}, kinds=[{kinds}{more}])")


def as_bank(value, hidden_size: Optional[int] = None) -> PatchBank:
    """A bank from a bank, a single patch, or a list of patches."""
    if isinstance(value, PatchBank):
        return value
    if isinstance(value, (Patch, CanonicalPatch)):
        return PatchBank([value], hidden_size)
    if isinstance(value, Iterable):
        return PatchBank(list(value), hidden_size)
    raise TypeError(f"expected a patch, a list of patches or a PatchBank, got {type(value).__name__}")
