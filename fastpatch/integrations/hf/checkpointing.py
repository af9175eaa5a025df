"""Gradient checkpointing through a patched model: the fused layer forward is recomputed in backward,
and the recompute sees the same step.

transformers has checkpointed a decoder layer in two ways, and fastpatch's per-instance ``forward`` meets
them differently (:func:`mechanism`):

- ``"call"`` (transformers <= ~5.19): ``GradientCheckpointingLayer.__call__`` calls
  ``layer._gradient_checkpointing_func(partial(nn.Module.__call__, **kwargs), *args)``; ``nn.Module.__call__``
  then runs the instance forward, i.e. fastpatch's: it is checkpointed with nothing to do.
- ``"forward"`` (transformers 5.24+): ``GradientCheckpointingLayer.__init_subclass__`` wraps each layer
  class's ``forward`` and checkpoints inside that wrapper. An instance ``forward`` shadows the class
  attribute, so the wrapper never runs: fastpatch's fused forward would run un-checkpointed and every
  activation would be kept (no error, 1.7x the memory). :func:`checkpoint_call` is that wrapper's logic,
  applied by ``fused.py`` to the fused forward: same test (``gradient_checkpointing``, training, grad
  enabled), same cache arguments dropped, same ``_gradient_checkpointing_func`` (so the same
  ``use_reentrant``), hidden states positional.
- anything else (``"unknown"``: a later transformers): fastpatch adds nothing; whether the fused forward
  is recomputed is then decided by running it (``drift.check_recompute``), which refuses with
  :class:`~.drift.CheckpointingMismatchError` when it is not. That check runs in any case, for every
  mechanism, at ``apply`` when checkpointing is already on and at the first training forward after
  checkpointing is (re-)enabled (:meth:`_Checkpointing.wrap` notices transformers' new checkpoint
  function): a mechanism change can never make training silently keep every activation.

Two things make the recompute exact:

- the fused forward must not pass tensors around the layer boundary: ``fused.py`` keeps no stash into
  or out of a checkpointed layer (see :func:`checkpointed`);
- the recompute happens in backward, after the base model's forward ended, possibly on another thread,
  so the engine's thread-local ``Step`` (select ids, scope indices, CAST decisions) is gone. Each
  layer's ``_gradient_checkpointing_func`` is wrapped (:class:`StepCheckpoint`, put in place by a
  forward pre-hook on the base model, so ``gradient_checkpointing_enable()`` may come before or after
  ``apply``): it copies the step as it was when the layer started and installs that copy around the
  recompute, so slots, ids and decisions (CAST decisions made inside the layer included: the copy still
  has them pending and decides again on the same values) are those of the forward. Both mechanisms
  call ``_gradient_checkpointing_func``, so this works the same for either.

Fire counts are counted in the forward only (:func:`recomputing`).
"""
from __future__ import annotations

import threading
from functools import partial

import torch

_ATTR = "_gradient_checkpointing_func"
_local = threading.local()
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")  # 5.24 names it "cache", 5.19 "past_key_values"


def _gc_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except Exception:  # no transformers, or it moved: nothing here to vouch for
        return None
    return GradientCheckpointingLayer


def mechanism(cls) -> str:
    """How transformers checkpoints a layer of class ``cls`` (see the module docstring):

    ``"call"``     ``GradientCheckpointingLayer.__call__`` (the instance forward runs inside it);
    ``"forward"``  a class-``forward`` wrapper made by ``GradientCheckpointingLayer.__init_subclass__``
                   (the instance forward shadows it: fastpatch must checkpoint itself);
    ``"none"``     not a ``GradientCheckpointingLayer``: nothing in the layer checkpoints it;
    ``"unknown"``  anything else, including both at once: only running it can tell (``drift.check_recompute``).
    """
    gcl = _gc_layer_class()
    if gcl is None or not isinstance(cls, type) or not issubclass(cls, gcl):
        return "none" if gcl is not None else "unknown"
    by_call = "__call__" in gcl.__dict__
    fwd = cls.forward
    # functools.wraps copies __module__/__qualname__ from the wrapped forward; the wrapper's globals
    # are still those of the module that defined it
    by_forward = ("__init_subclass__" in gcl.__dict__ and hasattr(fwd, "__wrapped__")
                  and getattr(fwd, "__globals__", {}).get("__name__") == gcl.__module__)
    if by_call and not by_forward:
        return "call"
    if by_forward and not by_call:
        return "forward"
    return "unknown"


def checkpointed(layer) -> bool:
    """True when transformers may checkpoint ``layer`` (its own flags; conservative: under ``no_grad``
    the ``"forward"`` mechanism does not checkpoint, but keeping no stash there is merely unfused)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


def checkpoint_call(layer, fn, hidden_states, args, kwargs):
    """What transformers 5.24's ``forward_with_checkpointing`` does for the outermost class ``forward``,
    around ``fn`` (fastpatch's fused forward, which shadows that wrapper): when ``layer`` has
    ``gradient_checkpointing`` set, is training and grad is enabled, drop the cache (a recompute must not
    update it twice) and run ``fn`` through ``layer._gradient_checkpointing_func`` (torch's
    ``checkpoint`` with the ``use_reentrant`` given to ``gradient_checkpointing_enable``); tensors that
    need grad go positionally, as reentrant checkpointing requires. Otherwise call ``fn`` directly."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
        return fn(hidden_states, *args, **kwargs)
    changed = []
    if kwargs.get("use_cache"):
        kwargs = dict(kwargs, use_cache=False)
        changed.append("`use_cache=False`")
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs = dict(kwargs, **{name: None})
                changed.append(f"`{name}=None`")
    if changed:
        _warn_once(f"Caching is incompatible with gradient checkpointing in {type(layer).__name__}. Setting "
                   + ", ".join(changed) + ".")
    return getattr(layer, _ATTR)(partial(fn, **kwargs), hidden_states, *args)


def _warn_once(message: str) -> None:
    try:
        from transformers.utils import logging
        logging.get_logger("transformers.modeling_layers").warning_once(message)
    except Exception:  # pragma: no cover - transformers' logging moved
        import warnings
        warnings.warn(message, stacklevel=3)


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
        engine = self.engine
        step = engine.active()
        if step is None:  # layer called outside a base-model forward: the default step both times
            return self.inner(function, *args, **kwargs)
        at_entry = _copy_step(step)
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return function(*a, **k)
            # a fresh copy per recompute (backward may run twice)
            with engine.running(_copy_step(at_entry)):
                _local.depth = getattr(_local, "depth", 0) + 1
                try:
                    return function(*a, **k)
                finally:
                    _local.depth -= 1

        return self.inner(run, *args, **kwargs)


class _Checkpointing:
    """Keeps every layer's checkpoint function wrapped while the handle lives; ``remove`` unwraps.

    ``check`` (``drift.check_recompute`` bound to the model's captured block inputs, or None when
    ``apply(verify=False)`` or post-LN) runs once after each (re-)enabling of checkpointing, seen as a
    checkpoint function fastpatch has not wrapped yet: at ``apply`` (:meth:`verify`) or at the next
    training forward with grad enabled, before the base model runs."""

    def __init__(self, engine, layers, check=None):
        self.engine, self.layers = engine, list(layers)
        self.hook = None
        self.check = check
        self.verified = False

    def wrap(self) -> None:
        for layer in self.layers:
            f = layer.__dict__.get(_ATTR)
            if f is None or (type(f) is StepCheckpoint and f.engine is self.engine):
                continue
            if type(f) is StepCheckpoint:
                f = f.inner
            layer.__dict__[_ATTR] = StepCheckpoint(self.engine, f)
            self.verified = False  # a new checkpoint function: gradient_checkpointing_enable ran (again)

    def verify(self) -> None:
        """Run the recompute check if some layer is set to checkpoint and it has not run since."""
        self.wrap()
        if self.check is None or self.verified:
            return
        if any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
            self.check()
            self.verified = True

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        for layer in self.layers:
            f = layer.__dict__.get(_ATTR)
            if type(f) is StepCheckpoint and f.engine is self.engine:
                layer.__dict__[_ATTR] = f.inner


def install(handle) -> None:
    """Wrap the layers' checkpoint functions before every training-mode forward of the base model, and
    check (once per enabling) that the fused layers are really recomputed (``engine.recompute_check``)."""
    engine = handle.engine
    ck = _Checkpointing(engine, engine.info.layers, getattr(engine, "recompute_check", None))
    handle._checkpointing = ck

    def pre(module, args):
        if module.training:
            if torch.is_grad_enabled():
                ck.verify()
            else:
                ck.wrap()

    ck.hook = engine.info.base.register_forward_pre_hook(pre)
    handle._hooks.append(ck)
