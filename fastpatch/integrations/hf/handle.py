"""The handle that :func:`fastpatch.apply` and :func:`fastpatch.hooks.apply` return, and the step hooks
both install on the base model (one :class:`~.engine.Step` per forward)."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional

from .engine import Engine, build_plan, param_names, step_inputs
from .fused import ours, uninstall
from .checkpointing import install as install_checkpointing

MARK = "_fastpatch_handle"


class Handle:
    """What :func:`apply` returns: select / swap / pinned / fire_counts / remove."""

    implementation = "fused"

    def __init__(self, model, engine: Engine, backend: Optional[str]):
        self.model = model
        self.engine = engine
        self.backend = backend
        self._targets = []
        self._hooks = []
        self._removed = False
        self._lock = threading.Lock()

    # -- per-sequence choice ------------------------------------------------------------------
    def select(self, ids) -> "Handle":
        """Patch id per sequence ([batch]) or per token ([batch, seq]); −1 = no patch; None resets.

        Validated here (one host read of min/max), then only device tensors are used per step.
        """
        self.engine.select(ids)
        return self

    @contextmanager
    def using(self, ids):
        """``with handle.using(ids): model(...)``: like :meth:`select`, but only for forwards of the calling
        thread inside the block, so concurrent requests (one thread each) choose their patches without
        serialising on the handle. Nested blocks restore the outer ids on exit."""
        with self.engine.using(self.engine.check_ids(ids, self.engine.plan)):
            yield self

    # -- versions -----------------------------------------------------------------------------
    def swap(self, patches: dict) -> "Handle":
        """Validate a new site → patch mapping fully, then make it active in one assignment."""
        self._check_alive()
        # a plan that needs select() while none is made is fine: its forwards will ask for select()
        self.engine.swap(build_plan(self.engine.info, patches, self.engine.count_fires))
        return self

    def pinned(self):
        """Forwards of the calling thread use the mapping active at entry for the whole block."""
        return self.engine.pinned()

    @property
    def patches(self) -> dict:
        return dict(self.engine.plan.mapping)

    # -- fire counts --------------------------------------------------------------------------
    def fire_counts(self) -> dict:
        if not self.engine.count_fires:
            raise RuntimeError("fire counts are off: apply(..., count_fires=True) to count them")
        return {e.names[0]: e.fire for e in self.engine.plan.entries}

    def reset_fire_counts(self) -> None:
        for e in self.engine.plan.entries:
            if e.fire is not None:
                e.fire.zero_()

    # -- fusion --------------------------------------------------------------------------------
    def fusion_stats(self) -> dict:
        """``{"hits": n, "misses": m}`` since apply / the last reset: a hit is a fused layer (or the final
        norm) that took its normed input from the previous fused site, a miss one that recomputed it
        because a hook could have changed the stream in between (exact either way; misses cost one
        norm each). Forwards inside torch.compile'd code are not counted; the hooks implementation
        never fuses (always zero)."""
        return {"hits": self.engine.fusion_hits, "misses": self.engine.fusion_misses}

    def reset_fusion_stats(self) -> None:
        self.engine.fusion_hits = self.engine.fusion_misses = 0

    # -- lifetime -----------------------------------------------------------------------------
    def remove(self) -> None:
        with self._lock:
            if self._removed:
                return
            self.engine.removed = True
            for h in self._hooks:
                h.remove()
            uninstall(self._targets)
            self._hooks, self._targets = [], []
            if getattr(self.model, MARK, None) is self:
                try:
                    delattr(self.model, MARK)
                except AttributeError:
                    pass
            self._removed = True

    @property
    def active(self) -> bool:
        return not self._removed

    def _check_alive(self):
        if self._removed:
            raise RuntimeError("this handle was removed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self) -> str:
        sites = ", ".join(e.names[0] for e in self.engine.plan.entries)
        return (f"{type(self).__name__}({self.implementation}, {self.engine.info.spec.name}, "
                f"sites=[{sites}], removed={self._removed})")


def install_step_hooks(handle: Handle) -> None:
    """One Step per forward of the base model (indices, decisions): begun and ended by an instance
    ``forward`` of the base model wrapping its class forward, not by hooks — pyvene removes every hook
    of a model before each of its calls, and a step lost that way would silently drop scoped, selected
    and CAST patches. Where the base model already has an instance forward (nnsight's), pre/post hooks."""
    engine = handle.engine
    base = engine.info.base
    names = param_names(type(base).forward, skip_first=0)
    if "forward" not in base.__dict__:
        cls_forward = type(base).forward

        @ours
        def forward(*args, **kwargs):
            if engine.removed:
                return cls_forward(base, *args, **kwargs)
            B, S, mask, cache, device = step_inputs(names, args, kwargs)
            engine.begin(B, S, mask, cache, device)
            out = None
            try:
                out = cls_forward(base, *args, **kwargs)
                return out
            finally:
                engine.end(out)

        base.forward = forward
        handle._targets.append(base)
        install_checkpointing(handle)  # gradient checkpointing recomputes layers in the forward's step
        _mark_generate(handle)
        return

    def pre(module, args, kwargs):
        B, S, mask, cache, device = step_inputs(names, args, kwargs)
        engine.begin(B, S, mask, cache, device)
        return None

    def post(module, args, kwargs, output):
        engine.end(output)
        return None

    handle._hooks.append(base.register_forward_pre_hook(pre, with_kwargs=True))
    handle._hooks.append(base.register_forward_hook(post, with_kwargs=True, always_call=True))
    install_checkpointing(handle)  # gradient checkpointing recomputes layers in the forward's step
    _mark_generate(handle)


class _GenerateMark:
    """Wraps ``model.generate`` (an instance attribute, removed with the handle) so that the engine
    knows, per thread, that the batch may be expanded (num_return_sequences, beams)."""

    def __init__(self, model, engine: Engine):
        self.model, self.engine = model, engine
        self.previous = model.__dict__.get("generate")  # an instance-level generate someone else set
        self.inner = getattr(model, "generate")

        def generate(*args, **kwargs):
            with engine.generating():
                return self.inner(*args, **kwargs)

        generate.__doc__ = getattr(self.inner, "__doc__", None)
        generate.__wrapped__ = self.inner
        self.wrapper = generate
        model.generate = generate

    def remove(self):
        d = self.model.__dict__
        if d.get("generate") is self.wrapper:
            if self.previous is None:
                del d["generate"]
            else:
                d["generate"] = self.previous


def _mark_generate(handle: Handle) -> None:
    if callable(getattr(handle.model, "generate", None)):
        handle._hooks.append(_GenerateMark(handle.model, handle.engine))


def check_not_patched(model):
    h = getattr(model, MARK, None)
    if h is not None and h.active:
        raise RuntimeError(f"model is already patched by {h!r}; call handle.remove() first (or handle.swap())")
