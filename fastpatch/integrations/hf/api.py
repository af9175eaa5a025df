"""``fastpatch.apply`` / ``fastpatch.patched``: fuse patches into a Hugging Face model."""
from __future__ import annotations

import warnings
from typing import Optional

from ...kernels import backends
from .engine import Engine, build_plan
from .fused import install, uninstall
from .handle import MARK, Handle, check_not_patched, install_step_hooks
from .model_sites import UnsupportedModelError, model_info, unwrap
from . import drift, hooks


def apply(model, patches: dict, *, backend: Optional[str] = None, fallback: Optional[str] = None,
          count_fires: bool = False, verify: bool = True) -> Handle:
    """Fuse ``patches`` ({site: patch | PatchBank | Scoped | cast.Conditional | None}) into ``model``.

    Atomic: any error leaves the model untouched. ``fallback="hooks"`` uses
    :func:`fastpatch.hooks.apply` for architectures without a fused implementation (or whose fused
    implementation fails the check below). ``verify`` (default on): run each distinct fused module
    class once both ways on a tiny random input and refuse (:class:`~.drift.FusedMismatchError`,
    naming the class) if the fused forward does not reproduce the class's own forward — a guard
    against transformers releases that change a block (see :mod:`.drift`).
    """
    if fallback not in (None, "hooks"):
        raise ValueError(f"fallback must be None or 'hooks', got {fallback!r}")
    model = unwrap(model)  # pyvene / pyreft / nnsight wrappers: patch the model inside
    check_not_patched(model)
    try:
        info = model_info(model)
        impl = backends.resolve(backend, info.device)
    except UnsupportedModelError:
        if fallback == "hooks":
            return hooks.apply(model, patches, count_fires=count_fires)
        raise
    if info.spec.name == "gpt2" and getattr(model.config, "add_cross_attention", False):
        if fallback == "hooks":
            return hooks.apply(model, patches, count_fires=count_fires)
        raise UnsupportedModelError("GPT-2 with cross-attention is not supported by the fused path; "
                                    "use fallback='hooks'")
    plan = build_plan(info, patches, count_fires)
    engine = Engine(info, plan, count_fires)
    handle = Handle(model, engine, backend)
    captured = drift.capture_block_inputs(info) if verify and info.spec.style != "post" else None
    if captured is not None:
        # training: the fused layers must be recomputed under gradient checkpointing, however this
        # transformers version checkpoints a layer (checked now if checkpointing is on, else once it is)
        engine.recompute_check = lambda: drift.check_recompute(engine, captured)
    elif info.spec.style != "post":  # pre-LN and parallel decoder blocks
        _warn_unverified(info)
    try:
        handle._targets = install(engine, impl)
        if verify:
            if captured is not None:
                drift.check_pre(engine, captured)
            else:
                drift.check_post(engine)
            engine.fusion_hits = engine.fusion_misses = 0  # the check's own calls are not the user's
        install_step_hooks(handle)
        ck = getattr(handle, "_checkpointing", None)
        if ck is not None:
            ck.verify()
        setattr(model, MARK, handle)
    except BaseException as exc:
        for h in handle._hooks:
            h.remove()
        uninstall(handle._targets)
        if isinstance(exc, UnsupportedModelError) and fallback == "hooks":  # drift, or refused by install
            if isinstance(exc, drift.CheckpointingMismatchError):  # loudly: the user asked for fused
                warnings.warn(f"fastpatch: falling back to hooks: {exc}", RuntimeWarning, stacklevel=2)
            return hooks.apply(model, patches, count_fires=count_fires)
        raise
    return handle


def _warn_unverified(info) -> None:
    """``verify=False``: nothing checks that a layer class whose checkpointing fastpatch does not know is
    recomputed under gradient checkpointing; say so once at apply rather than train silently without."""
    from .checkpointing import mechanism

    unknown = sorted({type(b).__qualname__ for b in info.layers if mechanism(type(b)) == "unknown"})
    if unknown:
        warnings.warn(f"fastpatch.apply(verify=False): transformers {drift._tf_version()} checkpoints {unknown} "
                      "in a way fastpatch does not know, and verify=False skips the check that gradient "
                      "checkpointing still recomputes the fused layers. Use verify=True (the default) or "
                      "fallback='hooks' to train with checkpointing", RuntimeWarning, stacklevel=3)


def patched(model, patches: dict, **kwargs) -> Handle:
    """``with fastpatch.patched(model, patches) as handle: ...``: apply, then remove on exit (the handle
    is its own context manager)."""
    return apply(model, patches, **kwargs)
