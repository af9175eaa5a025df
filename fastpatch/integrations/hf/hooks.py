"""The hook-based implementation of :func:`fastpatch.apply`: same API and semantics, plain PyTorch
forward hooks and :meth:`CanonicalPatch.apply`, no custom kernel. It is the baseline the fused path
is tested against and the fallback for architectures without a fused implementation.

Where the hooks act (pre-LN decoders):

- ``layers.0.resid_pre``: a forward pre-hook on layer 0 replaces its input.
- ``layers.{i}.resid_mid``: a pre-hook on layer i keeps its input ``r``; a forward hook on the
  attention branch (the attention module, or Gemma2/3's post-attention norm) turns its output ``a``
  into ``patch(r + a) − r`` so that the layer's own add yields ``patch(r + a)`` (up to one rounding).
- ``layers.{i}.resid_post``: a forward hook on layer i replaces its output (exact).

Post-LN (BERT): pre-hooks on the LayerNorms replace their input sums (exact).

:func:`record` captures activations at sites: ``with record(model, sites) as acts: model(**batch)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Optional

import torch

from .handle import MARK, Handle, check_not_patched, install_step_hooks
from .arch import ArchSpec, get_path
from .engine import Engine, build_plan
from .model_sites import (ModelInfo, UnsupportedModelError, config_mismatch, find_spec, model_info, site_key,
                          unwrap)

__all__ = ["apply", "patched", "record", "HooksHandle"]

_GENERIC_LAYER_PATHS = ("layers", "h", "decoder.layers", "encoder.layer", "blocks", "model.layers")


class HooksHandle(Handle):
    implementation = "hooks"


def _info(model) -> ModelInfo:
    """The model's info; for unsupported architectures a generic pre-LN guess (layers + attention)."""
    spec = find_spec(model)
    if spec is not None and config_mismatch(spec, model) is None:
        return model_info(model)
    base = getattr(model, "base_model", model)
    for path in _GENERIC_LAYER_PATHS:
        try:
            layers = get_path(base, path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            attn = next((a for a in ("self_attn", "attn", "attention") if hasattr(layers[0], a)), None)
            spec = ArchSpec(name="generic", model_types=(), style="pre", norm="rms", layers=path,
                            final_norm=None, attn=attn or "self_attn")
            param = next(model.parameters())
            cfg = getattr(model, "config", None)
            hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model")
            return ModelInfo(spec, base, list(layers), len(layers), int(hidden), param.device, param.dtype)
    raise UnsupportedModelError(f"cannot find the layers of {type(model).__name__}: looked for "
                                f"{_GENERIC_LAYER_PATHS} under its base model")


def patch_rows(step, slot: int, h: torch.Tensor) -> torch.Tensor:
    """h' = the slot's patches applied to ``h`` [..., D] by row index, in h's dtype (plain torch)."""
    s = step.slots[slot] if slot >= 0 else None
    if s is None:
        return h
    idx, fire = s.index, s.fire
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    cps = s.entry.canonical(h.dtype, h.device)
    if idx is None:
        out = cps[0].apply(flat)
        if fire is not None:
            fire[0] += cps[0].fires(flat).sum().to(fire.dtype)
        return out.view(shape)
    out = flat
    for k, cp in enumerate(cps):
        sel = idx == k
        out = torch.where(sel.unsqueeze(-1), cp.apply(flat), out)
        if fire is not None:
            fire[k] += (sel & cp.fires(flat)).sum().to(fire.dtype)
    return out.view(shape)


def branch_path(spec: ArchSpec) -> str:
    """The module whose output the layer adds to the residual for ``resid_mid``: Gemma2/3's post-attention
    norm, Phi-3's attention dropout, else the attention itself."""
    return spec.post_attn_norm or spec.attn_dropout or spec.attn


def branch_scale(block, spec: ArchSpec):
    """The factor the layer multiplies that branch by before its add (Granite), or None."""
    return getattr(block, spec.residual_multiplier) if spec.residual_multiplier else None


def _first_arg(args, kwargs, name="hidden_states"):
    return args[0] if args else kwargs[name]


def _replace_first(args, kwargs, value, name="hidden_states"):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


def _install(handle: Handle) -> None:
    engine = handle.engine
    info, spec = engine.info, engine.info.spec
    hooks = handle._hooks
    step_now = engine.current

    if spec.style == "post":
        def ln_hook(slot_of, key):
            def pre(module, args):
                step = step_now()
                h = patch_rows(step, slot_of(step.plan), args[0])
                if step.pending is not None:
                    engine.decide(step, key, h)
                return (h,) + tuple(args[1:])
            return pre

        hooks.append(get_path(info.base, spec.embed_norm).register_forward_pre_hook(
            ln_hook(lambda p: p.pre_slot, ("pre", 0))))
        for i, block in enumerate(info.layers):
            hooks.append(get_path(block, spec.mid_output + ".LayerNorm").register_forward_pre_hook(
                ln_hook(lambda p, i=i: p.mid_slot[i], ("mid", i))))
            hooks.append(get_path(block, spec.post_output + ".LayerNorm").register_forward_pre_hook(
                ln_hook(lambda p, i=i: p.post_slot[i], ("post", i))))
        return

    def pre0(module, args, kwargs):
        step = step_now()
        h = _first_arg(args, kwargs)
        h2 = patch_rows(step, step.plan.pre_slot, h)
        if step.pending is not None:
            engine.decide(step, ("pre", 0), h2)
        if h2 is h:
            return None
        return _replace_first(args, kwargs, h2)

    hooks.append(info.layers[0].register_forward_pre_hook(pre0, with_kwargs=True))
    for i, block in enumerate(info.layers):
        def keep(module, args, kwargs, i=i):
            step = step_now()
            if step.res is None:
                step.res = {}
            step.res[i] = _first_arg(args, kwargs)
            return None

        def branch(module, args, output, i=i, block=block):
            step = step_now()
            slot = step.plan.mid_slot[i]
            decide = step.pending is not None and ("mid", i) in step.plan.cond_keys
            if (slot < 0 or step.slots[slot] is None) and not decide:
                return None
            a = output[0] if isinstance(output, tuple) else output
            r = step.res[i]
            mult = branch_scale(block, spec)
            h = r + a if mult is None else r + a * mult
            h2 = patch_rows(step, slot, h)
            if decide:
                engine.decide(step, ("mid", i), h2)
            if h2 is h:
                return None
            # the layer adds ``a2 * mult`` (Granite): dividing back costs one more rounding
            a2 = h2 - r if mult is None else (h2 - r) / mult
            return (a2,) + tuple(output[1:]) if isinstance(output, tuple) else a2

        def post(module, args, output, i=i):
            step = step_now()
            h = output[0] if isinstance(output, tuple) else output
            h2 = patch_rows(step, step.plan.post_slot[i], h)
            if step.pending is not None:
                engine.decide(step, ("post", i), h2)
            if h2 is h:
                return None
            return (h2,) + tuple(output[1:]) if isinstance(output, tuple) else h2

        hooks.append(block.register_forward_hook(post))
        if spec.style == "parallel":  # no resid_mid: resid_pre / resid_post are the block's input / output
            continue
        hooks.append(block.register_forward_pre_hook(keep, with_kwargs=True))
        branch_mod = get_path(block, branch_path(spec))
        hooks.append(branch_mod.register_forward_hook(branch))


def apply(model, patches: dict, *, backend: Optional[str] = None, fallback: Optional[str] = None,
          count_fires: bool = False) -> HooksHandle:
    """Same API and semantics as :func:`fastpatch.apply`, with forward hooks (``backend`` ignored)."""
    model = unwrap(model)
    check_not_patched(model)
    info = _info(model)
    plan = build_plan(info, patches, count_fires)
    engine = Engine(info, plan, count_fires)
    handle = HooksHandle(model, engine, None)
    try:
        install_step_hooks(handle)
        _install(handle)
        setattr(model, MARK, handle)
    except BaseException:
        for h in handle._hooks:
            h.remove()
        raise
    return handle


def patched(model, patches: dict, **kwargs) -> HooksHandle:
    """``with fastpatch.hooks.patched(model, patches) as handle: ...``: apply, then remove on exit."""
    return apply(model, patches, **kwargs)


@contextmanager
def record(model, sites: Iterable[str], *, detach: bool = True):
    """Capture the residual stream at ``sites``: ``acts[site]`` is [batch, seq, D] from the last forward.

    Works on an unpatched model and on one patched with :func:`fastpatch.hooks.apply` (values after
    that site's patch); on a model patched with :func:`fastpatch.apply`, ``resid_mid`` values are
    read before the fused patch of that site.
    """
    if isinstance(sites, str):
        sites = [sites]
    info = _info(model)
    spec = info.spec
    keys = {name: site_key(info, name) for name in sites}
    acts: dict = {}
    handles = []
    res = {}

    def put(names, value):
        v = value.detach() if detach else value
        for n in names:
            acts[n] = v

    by_key: dict = {}
    for n, k in keys.items():
        by_key.setdefault(k, []).append(n)
    try:
        for key, names in by_key.items():
            kind, i = key
            if spec.style == "post":
                path = (spec.embed_norm if kind == "pre" else
                        (spec.mid_output if kind == "mid" else spec.post_output) + ".LayerNorm")
                mod = get_path(info.base, path) if kind == "pre" else get_path(info.layers[i], path)
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args, names=names: put(names, args[0])))
            elif kind == "pre":
                handles.append(info.layers[0].register_forward_pre_hook(
                    lambda m, args, kwargs, names=names: put(names, _first_arg(args, kwargs)), with_kwargs=True))
            elif kind == "post":
                handles.append(info.layers[i].register_forward_hook(
                    lambda m, args, out, names=names: put(names, out[0] if isinstance(out, tuple) else out)))
            else:
                def keep(m, args, kwargs, i=i):
                    res[i] = _first_arg(args, kwargs)

                block = info.layers[i]

                def branch(m, args, out, i=i, names=names, block=block):
                    a = out[0] if isinstance(out, tuple) else out
                    mult = branch_scale(block, spec)
                    put(names, res[i] + a if mult is None else res[i] + a * mult)

                handles.append(block.register_forward_pre_hook(keep, with_kwargs=True, prepend=False))
                handles.append(get_path(block, branch_path(spec)).register_forward_hook(branch))
        yield acts
    finally:
        for h in handles:
            h.remove()
