"""Gradient checkpointing through a patched model: the recomputed forward sees the same step.

transformers 5.x checkpoints a decoder layer in ``GradientCheckpointingLayer.__call__``: when the layer
has ``gradient_checkpointing`` set and is in training mode, it calls
``layer._gradient_checkpointing_func(partial(nn.Module.__call__, **kwargs), *args)`` (torch's
``checkpoint``, reentrant or not), which runs the layer's forward (fastpatch's instance forward) once
now and once more during backward. Two things make that recompute exact:

- the fused forward must not pass tensors around the layer boundary: ``fused.py`` keeps no stash into
  or out of a checkpointed layer (see :func:`checkpointed`);
- the recompute happens in backward, after the base model's forward ended, possibly on another thread,
  so the engine's thread-local ``Step`` (select ids, scope indices, CAST decisions) is gone. Each
  layer's ``_gradient_checkpointing_func`` is wrapped (:class:`StepCheckpoint`, put in place by a
  forward pre-hook on the base model, so ``gradient_checkpointing_enable()`` may come before or after
  ``apply``): it copies the step as it was when the layer started and installs that copy around the
  recompute, so slots, ids and decisions (CAST decisions made inside the layer included: the copy still
  has them pending and decides again on the same values) are those of the forward.

Fire counts are counted in the forward only (:func:`recomputing`).
"""
from __future__ import annotations

import threading

_ATTR = "_gradient_checkpointing_func"
_local = threading.local()


def checkpointed(layer) -> bool:
    """True when ``GradientCheckpointingLayer.__call__`` will checkpoint ``layer`` (its own test)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


def recomputing() -> bool:
    """True inside the backward recompute of a checkpointed layer (this thread)."""
    return getattr(_local, "depth", 0) > 0


def _copy_step(step):
    """A copy of ``step`` whose mutable parts (slots, decisions, pending) are its own."""
    new = object.__new__(type(step))
    for name in type(step).__slots__:
        setattr(new, name, getattr(step, name, None))
    new.slots = list(step.slots)
    if step.decisions is not None:
        new.decisions = dict(step.decisions)
    if step.pending is not None:
        new.pending = list(step.pending)
    new.stash = None
    new.prev = None
    return new


class StepCheckpoint:
    """A layer's checkpoint function, wrapped: the first call of the layer's function runs in the live
    step; every later call (a backward recompute) runs in a copy of the step taken at entry."""

    __slots__ = ("engine", "inner")

    def __init__(self, engine, inner):
        self.engine, self.inner = engine, inner

    def __call__(self, function, *args, **kwargs):
        tls = self.engine._tls
        step = getattr(tls, "step", None)
        if step is None:  # layer called outside a base-model forward: the default step both times
            return self.inner(function, *args, **kwargs)
        at_entry = _copy_step(step)
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return function(*a, **k)
            prev = getattr(tls, "step", None)
            tls.step = _copy_step(at_entry)  # a fresh copy per recompute (backward may run twice)
            _local.depth = getattr(_local, "depth", 0) + 1
            try:
                return function(*a, **k)
            finally:
                _local.depth -= 1
                tls.step = prev

        return self.inner(run, *args, **kwargs)


class _Checkpointing:
    """Keeps every layer's checkpoint function wrapped while the handle lives; ``remove`` unwraps."""

    def __init__(self, engine, layers):
        self.engine, self.layers = engine, list(layers)
        self.hook = None

    def wrap(self) -> None:
        for layer in self.layers:
            f = layer.__dict__.get(_ATTR)
            if f is None or (type(f) is StepCheckpoint and f.engine is self.engine):
                continue
            if type(f) is StepCheckpoint:
                f = f.inner
            layer.__dict__[_ATTR] = StepCheckpoint(self.engine, f)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        for layer in self.layers:
            f = layer.__dict__.get(_ATTR)
            if type(f) is StepCheckpoint and f.engine is self.engine:
                layer.__dict__[_ATTR] = f.inner


def install(handle) -> None:
    """Wrap the layers' checkpoint functions before every training-mode forward of the base model."""
    engine = handle.engine
    ck = _Checkpointing(engine, engine.info.layers)

    def pre(module, args):
        if module.training:
            ck.wrap()

    ck.hook = engine.info.base.register_forward_pre_hook(pre)
    handle._hooks.append(ck)
