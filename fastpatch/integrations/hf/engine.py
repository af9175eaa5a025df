"""What the fused forwards and the hooks share: the validated plan, per-step patch indices, select,
scopes, CAST decisions, swap/pinned and fire counts.

Per forward of the base model (one pre-hook), :meth:`Engine.begin` builds a :class:`Step`: for
every patched site a :class:`Slot` ``(bank, index, fire, entry)`` or None (nothing to do this step).
Layers only read ``step.slots[k]``; no validation, no host sync happens per layer.

The step lives in the engine's thread-local state, with the calling thread's ``using`` ids, pinned
plan and ``generate`` mark; other modules reach it only through :class:`Engine` methods
(:meth:`~Engine.current`, :meth:`~Engine.active`, :meth:`~Engine.running`, :meth:`~Engine.using`,
:meth:`~Engine.generating`, :meth:`~Engine.pinned`).
"""
from __future__ import annotations

import inspect
import threading
import weakref
from contextlib import contextmanager
from functools import partial
from typing import NamedTuple, Optional

import torch

from ...core.bank import PatchBank
from ...core.patches import CanonicalPatch, Gate, Patch
from ...core.scope import Scope, Scoped
from .conditions import Condition, Conditional
from ...core.sites import order, parse_site, site_name
from .model_sites import ModelInfo, site_key

_SKIP = object()


class Entry:
    """One patched site of a plan."""

    __slots__ = ("key", "names", "bank", "scope", "condition", "fire", "slot", "_canon")

    def __init__(self, key, names, bank, scope, condition, fire, slot):
        self.key, self.names, self.bank, self.scope = key, names, bank, scope
        self.condition, self.fire, self.slot = condition, fire, slot
        self._canon = {}

    @property
    def num_patches(self) -> int:
        return self.bank.num_patches

    def canonical(self, dtype, device) -> list:
        """The bank's canonical patches with tensors already in (dtype, device) (for the hooks)."""
        key = (dtype, device)
        cps = self._canon.get(key)
        if cps is None:
            def cv(t):
                return t.to(device=device, dtype=dtype)
            cps = []
            for c in self.bank.canonical_patches:
                gate = None if c.gate is None else Gate(cv(c.gate.condition), c.gate.threshold, c.gate.metric,
                                                        c.gate.fire)
                # Every field of the canonical form travels (the activation too: a patch applied
                # without it would be a different edit).
                cps.append(CanonicalPatch(cv(c.down), cv(c.bias), cv(c.up), cv(c.shift), gate=gate, kind=c.kind,
                                          activation=c.activation,
                                          threshold=None if c.threshold is None else cv(c.threshold)))
            self._canon[key] = cps
        return cps


class Slot(NamedTuple):
    """One patched site's work in one step."""

    bank: PatchBank
    index: Optional[torch.Tensor]  # int32 patch id per row (-1: no patch), or None: patch 0 on every row
    fire: Optional[torch.Tensor]  # int32 fire count per patch, or None (not counted)
    entry: Entry


# Slot((bank, index, fire, entry)) without namedtuple's Python-level ``__new__`` (per site per forward)
_new_slot = partial(tuple.__new__, Slot)


class Pending(NamedTuple):
    """A CAST-conditioned site waiting for its condition's decision (its slot is filled by
    :meth:`Engine.decide`)."""

    entry: Entry
    index: Optional[torch.Tensor]  # the scope's index, before the decision gates it


class _IdsMemo(NamedTuple):
    """``select`` ids expanded to the batch ``generate`` runs (:meth:`Engine._expanded`)."""

    ids: torch.Tensor
    rows: int
    expanded: torch.Tensor


class _DecodeIndex(NamedTuple):
    """A decode step's index for a (batch, length), kept while the ids it was made from stay the same."""

    ids: Optional[torch.Tensor]
    index: Optional[torch.Tensor]


class Plan:
    """A validated, immutable site → patch mapping for one model (swap replaces it as a whole)."""

    def __init__(self, info: ModelInfo, entries: list, mapping: dict):
        L = info.num_layers
        self.entries = entries
        self.mapping = mapping
        self.by_key = {e.key: e for e in entries}
        self.pre_slot = self.slot(("pre", 0))
        self.mid_slot = [self.slot(("mid", i)) for i in range(L)]
        self.post_slot = [self.slot(("post", i)) for i in range(L)]
        self.conditions = []
        for e in entries:
            if e.condition is not None and all(e.condition is not c for c in self.conditions):
                self.conditions.append(e.condition)
        self.cond_keys = {}
        for c in self.conditions:
            self.cond_keys.setdefault(parse_site(c.site, L), []).append(c)
        self.max_patches = max((e.num_patches for e in entries), default=0)
        self.min_patches = min((e.num_patches for e in entries), default=0)
        self.needs_select = any(e.num_patches > 1 for e in entries)

    def slot(self, key) -> int:
        """The index in ``Step.slots`` of the site ``key`` (``("mid", 3)``), or -1 where nothing is patched."""
        e = self.by_key.get(key)
        return -1 if e is None else e.slot


def _unwrap(value):
    """site value → (inner patch/bank, scope, condition)."""
    condition = None
    if isinstance(value, Conditional):
        condition, value = value.condition, value.patch
    scope = Scope()
    if isinstance(value, Scoped):
        scope, value = value.scope, value.patch
    if isinstance(value, (Scoped, Conditional)):
        raise TypeError("wrap a patch as Conditional(Scoped(patch, scope), condition), each at most once")
    return value, scope, condition


def _bank_dtype(model_dtype):
    return model_dtype if model_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def build_plan(info: ModelInfo, patches: dict, count_fires: bool) -> Plan:
    """Validate ``patches`` fully and build a plan; raises before anything is changed."""
    if not isinstance(patches, dict):
        raise TypeError(f"patches must be a dict of site name -> patch, got {type(patches).__name__}")
    D = info.hidden_size
    seen = {}
    entries = []
    for name, value in patches.items():
        key = site_key(info, name)
        if key in seen:
            raise ValueError(f"sites {seen[key]!r} and {name!r} are the same point of the residual stream "
                             f"({site_name(key)}); give only one of them")
        seen[key] = name
        if value is None:
            continue
        inner, scope, condition = _unwrap(value)
        if isinstance(inner, PatchBank):
            bank = inner
            if bank.hidden_size != D:
                raise ValueError(f"site {name!r}: PatchBank hidden_size {bank.hidden_size} differs from the "
                                 f"model's hidden size {D}")
            if bank.device != info.device:
                raise ValueError(f"site {name!r}: PatchBank is on {bank.device}, the model on {info.device}; "
                                 f"move it with bank.to({str(info.device)!r})")
            if bank.dtype not in (torch.float32, info.dtype):
                raise TypeError(f"site {name!r}: PatchBank dtype {bank.dtype} must be float32 or the model's "
                                f"dtype {info.dtype}")
        else:
            plist = inner if isinstance(inner, (list, tuple)) else [inner]
            if not plist:
                raise ValueError(f"site {name!r}: empty patch list")
            for p in plist:
                if not isinstance(p, (Patch, CanonicalPatch)):
                    raise TypeError(f"site {name!r}: expected a fastpatch patch, PatchBank, Scoped, "
                                    f"cast.Conditional or None, got {type(p).__name__}")
                if p.hidden_size != D:
                    raise ValueError(f"site {name!r}: patch hidden size {p.hidden_size} differs from the "
                                     f"model's hidden size {D}")
            # In the model's dtype, like the hooks path (the kernels accumulate in float32 anyway): half
            # the memory and bandwidth of a float32 bank in a bf16/fp16 model, one less cast per site.
            bank = PatchBank(list(plist), D, device=info.device, dtype=_bank_dtype(info.dtype))
        if condition is not None:
            if not isinstance(condition, Condition):
                raise TypeError(f"site {name!r}: condition must be a fastpatch.cast.Condition")
            if condition.hidden_size != D:
                raise ValueError(f"site {name!r}: condition vector has size {condition.hidden_size}, the model's "
                                 f"hidden size is {D}")
            ckey = site_key(info, condition.site)
            if order(ckey) >= order(key):
                raise ValueError(f"site {name!r}: the condition is read at {condition.site!r}, which a forward "
                                 "does not reach before this site; behaviour sites must come after the "
                                 "condition site")
        fire = torch.zeros(bank.num_patches, dtype=torch.int32, device=info.device) if count_fires else None
        entries.append(Entry(key, [name], bank, scope, condition, fire, len(entries)))
    return Plan(info, entries, dict(patches))


class Step:
    """Per-forward state (thread-local): slots (:class:`Slot` or None per plan entry), the stash of the next
    layer's normed input (``fused.Stash`` or None), CAST decisions and the sites still waiting for one
    (:class:`Pending`), the hooks' kept residuals (``res``), the step this one interrupted (``prev``)."""

    __slots__ = ("plan", "ids", "slots", "stash", "prompt", "real", "B", "S", "base_ids", "decisions", "pending",
                 "cache", "prev", "res")

    def __init__(self, plan):
        self.plan = plan
        self.ids = None
        self.slots = [None] * len(plan.entries)
        self.stash = None
        self.prompt = True
        self.real = None
        self.B = self.S = 0
        self.base_ids = None
        self.decisions = None
        self.pending = None
        self.cache = None
        self.prev = None
        self.res = None


class Engine:
    def __init__(self, info: ModelInfo, plan: Plan, count_fires: bool):
        self.info = info
        self.count_fires = count_fires
        self.plan = plan
        self.ids = None  # (int32 device tensor [B] or [B, T]) or None
        self._tls = threading.local()
        self._decode_cache = {}
        self._decisions = weakref.WeakKeyDictionary()  # cache object -> {Condition: bool [B]}
        self._default_steps = {}
        # Fused layers that took their normed input from the previous fused site / had to recompute
        # it (see fused.py); plain ints, not updated inside torch.compile'd regions.
        self.fusion_hits = 0
        self.fusion_misses = 0
        self._expand_memo = None  # _IdsMemo
        self.removed = False  # set by handle.remove(): fused forwards still reachable pass through
        self.probe = None  # a list while drift.check_recompute counts fused layer forward runs
        self.recompute_check = None  # set by apply: drift.check_recompute for checkpointing.py

    # --- the calling thread's state ----------------------------------------------------------
    def current(self) -> Step:
        """The calling thread's step, or the default step for layers called outside a base-model forward."""
        step = getattr(self._tls, "step", None)
        if step is None:
            return self._default_step()
        return step

    def active(self) -> Optional[Step]:
        """The calling thread's step; None outside a base-model forward."""
        return getattr(self._tls, "step", None)

    @contextmanager
    def running(self, step: Optional[Step]):
        """``step`` is the calling thread's step inside the block (the one before it is back after)."""
        prev = getattr(self._tls, "step", None)
        self._tls.step = step
        try:
            yield step
        finally:
            self._tls.step = prev

    @contextmanager
    def using(self, ids):
        """Checked ``ids`` (:meth:`check_ids`) for the calling thread's forwards inside the block, ahead of
        :meth:`select`'s (``handle.using``); nested blocks restore the outer ids."""
        prev = getattr(self._tls, "ids", None)
        self._tls.ids = ids
        try:
            yield ids
        finally:
            self._tls.ids = prev

    @contextmanager
    def generating(self):
        """The calling thread is inside ``generate``: batches may be expanded copies of the selected
        sequences (:meth:`_expanded`)."""
        prev = getattr(self._tls, "generating", False)
        self._tls.generating = True
        try:
            yield
        finally:
            self._tls.generating = prev

    @contextmanager
    def pinned(self):
        """The calling thread's forwards use the plan active at entry for the whole block."""
        prev = getattr(self._tls, "pinned", None)
        self._tls.pinned = prev or self.plan
        try:
            yield self._tls.pinned
        finally:
            self._tls.pinned = prev

    # --- shared state ---------------------------------------------------------------------------
    def select(self, ids) -> None:
        """Patch ids for every thread's forwards (checked here); None resets."""
        self.ids = self.check_ids(ids, self.plan)
        self._decode_cache = {}

    def swap(self, plan: Plan) -> None:
        """Make a validated ``plan`` the active one, in one assignment (the selected ids must fit it)."""
        if self.ids is not None:
            self.check_ids(self.ids, plan)
        self._decode_cache = {}
        self.plan = plan

    # --- per forward -------------------------------------------------------------------------

    def _default_step(self) -> Step:
        """For layers called outside a base-model forward: unscoped, unconditioned, unselected only."""
        plan = getattr(self._tls, "pinned", None) or self.plan
        step = self._default_steps.get(id(plan))
        if step is None or step.plan is not plan:
            step = Step(plan)
            for e in plan.entries:
                if e.scope.kind == "all" and e.condition is None and e.num_patches == 1:
                    step.slots[e.slot] = Slot(e.bank, None, e.fire, e)
            self._default_steps = {id(plan): step}
        return step

    def begin(self, B: int, S: int, attention_mask, cache, device) -> Step:
        plan = getattr(self._tls, "pinned", None) or self.plan
        ids = getattr(self._tls, "ids", None)  # handle.using(ids) in this thread wins over select()
        if ids is None:
            ids = self.ids
        if plan.needs_select and ids is None:
            raise RuntimeError("a site holds a PatchBank of several patches: call handle.select(ids) to say "
                               "which patch each sequence (or token) uses before running the model")
        if ids is not None and ids.shape[0] != B:
            ids = self._expanded(ids, B)
        step = Step(plan)
        step.ids = ids
        step.prev = getattr(self._tls, "step", None)
        self._tls.step = step
        step.B, step.S, step.cache = B, S, cache
        past = 0
        if cache is not None:
            try:
                past = int(cache.get_seq_length())
            except Exception:
                past = 0
        step.prompt = past == 0
        if not plan.entries:
            return step
        # a 2-D padding mask says which prompt tokens are real; a 4-D mask or transformers' dict of
        # per-layer-type 4-D masks (generate with a static cache, e.g. Qwen2-MoE) is left as a 4-D mask is
        if step.prompt and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            step.real = attention_mask[:, -S:].to(torch.bool)
        stored = None
        if plan.conditions:
            step.decisions = {}
            if not step.prompt and cache is not None:
                try:
                    stored = self._decisions.get(cache)
                except TypeError:
                    stored = None
            if stored:
                step.decisions.update(stored)
        local = {}
        for e in plan.entries:
            skey = (e.scope.kind, e.scope.first, e.scope.last)
            if skey in local:
                idx = local[skey]
            else:
                idx = local[skey] = self._index(e.scope, step, device)
            if idx is _SKIP:
                continue
            if e.condition is not None:
                dec = step.decisions.get(e.condition)
                if dec is None:
                    if step.pending is None:
                        step.pending = []
                    step.pending.append(Pending(e, idx))
                    continue
                idx = self._gate_index(idx, dec, step, device)
            step.slots[e.slot] = _new_slot((e.bank, idx, e.fire, e))
        return step

    def _expanded(self, ids, B: int):
        """Inside ``generate`` (the handle marks it per thread), ids for n sequences on a batch of k·n
        rows: ``num_return_sequences`` and beam search run k consecutive copies of each sequence
        (transformers' ``_expand_inputs_for_generation`` repeat_interleaves the batch) and beam
        reordering only moves rows among the copies of one sequence, so row r belongs to sequence
        r // k for the whole generation. CAST decisions need nothing: every copy decides the same.
        Elsewhere a size mismatch is an error (a silent expansion could hide a wrong batch)."""
        n = ids.shape[0]
        if not getattr(self._tls, "generating", False) or B % n:
            raise ValueError(f"handle.select() was given ids for a batch of {n}, the model is running a "
                             f"batch of {B}" + ("" if B % n else " outside generate() (inside generate, "
                                                "num_return_sequences / num_beams copies follow the ids)"))
        memo = self._expand_memo
        if memo is not None and memo.ids is ids and memo.rows == B:
            return memo.expanded
        out = ids.repeat_interleave(B // n, dim=0)
        self._expand_memo = _IdsMemo(ids, B, out)  # same object every step: the decode index cache keeps hitting
        return out

    def end(self, output=None) -> None:
        step = getattr(self._tls, "step", None)
        if step is None:
            return
        self._tls.step = step.prev
        if step.decisions and step.prompt:
            cache = step.cache
            if cache is None and output is not None:
                cache = getattr(output, "past_key_values", None) or getattr(output, "cache", None)
            if cache is not None:
                try:
                    self._decisions[cache] = dict(step.decisions)
                except TypeError:
                    pass

    def _base(self, step: Step, device) -> Optional[torch.Tensor]:
        """Patch id per row before scoping: None (patch 0 everywhere) or int32 [B, S]."""
        ids = step.ids
        if ids is None:
            return None
        if ids.dim() == 1:
            return ids.unsqueeze(1).expand(step.B, step.S)
        if ids.shape[1] == step.S:
            return ids
        return ids[:, -1:].expand(step.B, step.S)

    def _index(self, scope: Scope, step: Step, device):
        kind = scope.kind
        if step.prompt:
            if kind == "generated":
                return _SKIP
            m = step.real
            if kind == "edges":
                real = m if m is not None else torch.ones(step.B, step.S, dtype=torch.bool, device=device)
                rank = real.to(torch.int32).cumsum(1) - 1
                n = real.sum(1, keepdim=True, dtype=torch.int32)
                half = torch.div(n, 2, rounding_mode="floor")  # pyreft caps p and s at n // 2 (see scope.py)
                m = real & ((rank < half.clamp(max=scope.first)) | (rank >= n - half.clamp(max=scope.last)))
        else:
            if kind in ("prompt", "edges"):
                return _SKIP
            m = None
            key = (step.B, step.S)
            hit = self._decode_cache.get(key)
            if hit is not None and hit.ids is step.ids:
                return hit.index
        base = self._base(step, device)
        if m is None and base is None:
            idx = None
        elif m is None:
            idx = base.reshape(-1).contiguous()
        else:
            src = base if base is not None else torch.zeros((), dtype=torch.int32, device=device)
            idx = torch.where(m, src, torch.full((), -1, dtype=torch.int32, device=device)).reshape(-1).contiguous()
        if not step.prompt:
            self._decode_cache[(step.B, step.S)] = _DecodeIndex(step.ids, idx)
        return idx

    def _gate_index(self, idx, decision, step: Step, device):
        rows = decision.unsqueeze(1).expand(step.B, step.S).reshape(-1)
        src = idx if idx is not None else torch.zeros((), dtype=torch.int32, device=device)
        return torch.where(rows, src, torch.full((), -1, dtype=torch.int32, device=device))

    def decide(self, step: Step, key, h: torch.Tensor) -> None:
        """At a condition site: decide per sequence (device ops) and fill the waiting slots."""
        conds = step.plan.cond_keys.get(key)
        if not conds or step.pending is None:
            return
        h3 = h.view(step.B, step.S, h.shape[-1])
        for c in conds:
            if c not in step.decisions:
                step.decisions[c] = c.decide(h3, step.real)
        waiting, step.pending = step.pending, None
        for p in waiting:
            e = p.entry
            dec = step.decisions.get(e.condition)
            if dec is None:
                step.pending = (step.pending or []) + [p]
                continue
            step.slots[e.slot] = Slot(e.bank, self._gate_index(p.index, dec, step, h.device), e.fire, e)

    # --- handle operations -------------------------------------------------------------------
    def check_ids(self, ids, plan: Plan):
        if ids is None:
            return None
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"select ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise ValueError(f"select ids must have shape [batch] (a patch id per sequence) or [batch, seq] "
                             f"(per token), got {tuple(ids.shape)}")
        if not plan.entries:
            raise ValueError("select(): no site holds a patch")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= plan.min_patches:
            raise ValueError(f"select ids must lie in [-1, {plan.min_patches}) (-1 = no patch; the smallest "
                             f"bank at a patched site has {plan.min_patches} patches), got min {lo}, max {hi}")
        return ids.to(device=self.info.device, dtype=torch.int32).contiguous()


def param_names(fn, skip_first: int = 1) -> tuple:
    """Names of ``fn``'s positional parameters (``self`` dropped), skipping the first ``skip_first``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return ()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if names and names[0] == "self":
        names = names[1:]
    return tuple(names[skip_first:])


def kwargs_of(names: tuple, args: tuple, kwargs: dict) -> dict:
    """Positional arguments mapped to their names (the model may call a module positionally)."""
    if args:
        kwargs = dict(kwargs)
        for n, a in zip(names, args):
            kwargs[n] = a
    return kwargs


def step_inputs(names: tuple, args: tuple, kwargs: dict):
    """(B, S, attention_mask, cache, device) from a base model's forward arguments."""
    kw = kwargs_of(names, args, kwargs) if args else kwargs
    x = kw.get("input_ids")
    if x is None:
        x = kw.get("inputs_embeds")
    if x is None:
        raise ValueError("fastpatch: the model was called without input_ids or inputs_embeds")
    B, S = x.shape[0], x.shape[1]
    if x.dim() == 1:
        B, S = 1, x.shape[0]
    cache = kw.get("cache")
    if cache is None:
        cache = kw.get("past_key_values")
    return B, S, kw.get("attention_mask"), cache, x.device
