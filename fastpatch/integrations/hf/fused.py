"""The fused implementation: only decoder-block forwards and norm forwards are replaced (instance
attributes, so ``remove()`` deletes them and the class forward is back), tensor in / tensor out.

Pre-LN blocks (Llama-like, Gemma, Gemma2/3, GPT-2), layer ``i``::

    normed, h = stash or fused(h_in, None, ln1, bank=resid_pre.0 if i == 0)
    a = attn(normed, **kwargs) [post_attn_norm] [dropout] [* residual_multiplier]
    normed2, h = fused(a, h, ln2, bank=resid_mid.i)          # add + patch + norm, one kernel
    m = mlp(normed2) [post_mlp_norm] [dropout] [* residual_multiplier]
    next_normed, h = fused(m, h, next norm, bank=resid_post.i) # next layer's ln1 or the final norm
    stash (h, next_normed); return h

The next layer (or the final norm) takes ``next_normed`` from the stash only if nothing can have run
in between and it receives the very tensor ``h`` this layer returned; else it runs its norm itself
(exact, just unfused). "Nothing in between" is decided without touching the data: a stash is kept only
when no hook can run between the two points — no forward hook on this layer, no pre-hook on the next
layer or the final norm, no hook on the next norm module (its call is skipped on a hit), no global
module hook (``torch.nn.modules.module.register_module_forward_hook`` and friends). Hooks are the only
way PyTorch runs foreign code between two modules of a transformers decoder loop, and a hook may edit
``h`` in place (steering-vectors, pyvene, nnsight's ``output[:] = ...``), which the identity check
cannot see. Checking dicts for emptiness is O(1) and works the same under no_grad, inference_mode,
autograd and torch.compile (dynamo guards on them); a checksum of ``h`` would cost a pass over the
data and still not be exact. Where tensors have a version counter (not inference tensors, not while
compiling) it is compared too, which also catches in-place edits made by code that is not a hook.
Hits and misses are counted on the engine (``handle.fusion_stats()``).

Norm modules whose computation is fused keep their hooks meaningful: if a norm module (or any module,
through a global hook) has a hook, the fused site still does add + patch, then the norm module itself
is called on the result so the hook runs and its output is used.

Post-LN (BERT): ``attention.output`` / ``output`` forwards become dense → dropout → fused(add + patch +
LayerNorm), and the embedding LayerNorm becomes fused(patch + LayerNorm) for ``layers.0.resid_pre``.
"""
from __future__ import annotations

import torch
from torch.nn.modules import module as _torch_module

from ...kernels import autograd as _autograd
from .checkpointing import checkpoint_call, checkpointed, mechanism, recomputing
from ...core.reference import NORM_KINDS
from .arch import get_path, norm_eps
from .model_sites import UnsupportedModelError
from .engine import Engine, kwargs_of, param_names


class _Norm:
    """A norm module's parameters as the kernel takes them (read at call time: robust to reloads)."""

    __slots__ = ("module", "eps", "kind", "offset", "has_weight", "has_bias")

    def __init__(self, module, kind: str, offset: float, eps=None):
        self.module = module
        self.eps = norm_eps(module, eps)
        self.kind = NORM_KINDS[kind]
        self.offset = float(offset)
        # OLMo's LayerNorm has no parameters at all: the kernels take weight=None as "no affine"
        self.has_weight = getattr(module, "weight", None) is not None
        self.has_bias = kind == "layer" and getattr(module, "bias", None) is not None


def run_norm(run, x2, r2, norm: _Norm, slot):
    """add + patch + norm of 2-D rows through the backend's ``run``, or through the differentiable op
    (:mod:`fastpatch.kernels.autograd`: the kernel forward, a hand-written backward) when autograd
    records and the stream, the norm's parameters or the bank require grad. ``slot`` is a step slot or
    None. Fire counts are not counted again while a checkpointed layer is recomputed."""
    mod = norm.module
    w = mod.weight if norm.has_weight else None
    b = mod.bias if norm.has_bias else None
    bank, index, fire = (None, None, None) if slot is None else slot[:3]
    if _autograd.needs_grad(x2, r2, w, b, bank):
        if fire is not None and recomputing():
            fire = None
        return _autograd.run(run, x2, r2, w, b, norm.eps, norm.kind, norm.offset, bank, index, fire)
    return run(x2, r2, w, b, norm.eps, norm.kind, norm.offset, bank, index, fire, None, None)


_GLOBAL_HOOKS = (_torch_module._global_forward_hooks, _torch_module._global_forward_pre_hooks)
_is_compiling = torch.compiler.is_compiling


def global_hooks() -> bool:
    """True while any global module forward (pre-)hook is registered: it may run between any two modules."""
    return bool(_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1])


def ours(fn):
    """Mark a forward as installed by fastpatch (see :func:`foreign`, :func:`uninstall`)."""
    fn._fastpatch = True
    return fn


def foreign(module) -> bool:
    """True if ``module`` has an instance-level forward that fastpatch did not install: another library
    (nnsight wraps every module's forward) runs its own code around the module's call."""
    f = module.__dict__.get("forward")
    return f is not None and not getattr(f, "_fastpatch", False)


def hooked(module) -> bool:
    """True if calling ``module`` would run foreign code: its own forward/pre hooks, a global hook or
    another library's instance forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or global_hooks() or foreign(module)


def version_of(t):
    """``t``'s in-place version counter, or None where there is none (inference tensors, compiling)."""
    if _is_compiling() or t.is_inference():
        return None
    return t._version


def stash_valid(st, x) -> bool:
    """The stash ``(h, normed, version)`` applies to ``x``: same object, not edited in place since."""
    if st is None or st[0] is not x:
        return False
    return st[2] is None or _is_compiling() or x._version == st[2]


def check_installable(modules) -> None:
    for m in modules:
        f = m.__dict__.get("forward")
        if f is not None and type(f).__module__.startswith("nnsight"):
            raise UnsupportedModelError(
                f"{type(m).__name__} is instrumented by nnsight (it replaces every module's forward): apply "
                "fastpatch first and wrap the model with nnsight afterwards (fastpatch.apply(model, ...); "
                "nnsight.NNsight(model)), or use fallback='hooks'")
        if f is not None:
            raise UnsupportedModelError(
                f"{type(m).__name__} already has an instance-level forward (accelerate hooks, another patcher "
                "or a previous fastpatch.apply not removed); fastpatch cannot fuse it. Use fallback='hooks'")


def install(engine: Engine, impl) -> list:
    """Replace the forwards; returns the modules whose instance ``forward`` was set (for remove)."""
    info = engine.info
    if info.spec.style == "post":
        return _install_post(engine, impl)
    return _install_pre(engine, impl)


def _install_pre(engine: Engine, impl) -> list:
    info, spec = engine.info, engine.info.spec
    layers = info.layers
    L = len(layers)
    kind, offset, eps = spec.norm, spec.weight_offset, spec.norm_eps
    # None where the block has no such norm (OLMo 2: none before either branch; parallel: one for both)
    ln1 = [_Norm(get_path(b, spec.ln1), kind, offset, eps) if spec.ln1 else None for b in layers]
    ln2 = [_Norm(get_path(b, spec.ln2), kind, offset, eps) if spec.ln2 else None for b in layers]
    final_mod = info.final_norm()
    final = _Norm(final_mod, kind, offset, eps) if final_mod is not None else None
    targets = list(layers) + ([final_mod] if final_mod is not None else [])
    check_installable(targets)
    run = impl.run
    drop = spec.drop_attn_kwargs
    allow = None if spec.attn_kwargs is None else frozenset(spec.attn_kwargs)
    mult_attr = spec.residual_multiplier
    par, sum_p, tuple_out = spec.parallel, spec.sum_dropout, spec.tuple_out
    tls = engine._tls
    current = engine.current

    def site(step, slot, x, res, norm: _Norm, use_norm: bool = True):
        """add + patch + norm; ``use_norm=False``: the normed output will be discarded (and the norm
        module's hooks must not run for it)."""
        if not use_norm and (slot < 0 or step.slots[slot] is None):
            # nothing to patch and no norm wanted (OLMo 2's adds, a stash that cannot be kept): the add in
            # torch rounds exactly as the kernel's (and as transformers' own ``residual + x``), no launch
            return None, (x if res is None else res + x)
        D = x.shape[-1]
        x2 = x.reshape(-1, D)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        r2 = None
        if res is not None:
            r2 = res.reshape(-1, D)
            if not r2.is_contiguous():
                r2 = r2.contiguous()
        o, r = run_norm(run, x2, r2, norm, step.slots[slot] if slot >= 0 else None)
        h = r.view(x.shape)
        if use_norm and hooked(norm.module):  # the norm's hooks must run on (and may change) its output
            return norm.module(h), h
        return o.view(x.shape), h

    def make_layer(i: int, block):
        attn = get_path(block, spec.attn)
        mlp = get_path(block, spec.mlp)
        pan = get_path(block, spec.post_attn_norm) if spec.post_attn_norm else None
        pmn = get_path(block, spec.post_mlp_norm) if spec.post_mlp_norm else None
        adrop = get_path(block, spec.attn_dropout) if spec.attn_dropout else None
        mdrop = get_path(block, spec.mlp_dropout) if spec.mlp_dropout else None
        n1, n2 = ln1[i], ln2[i]
        nxt = ln1[i + 1] if i + 1 < L else final
        # a norm for sites with no norm after them: the kernel computes one anyway and it is discarded
        # (OLMo 2, see arch/olmo2.py; a last layer without final norm)
        scratch = n1 or n2 or final or (_Norm(pan, kind, offset, eps) if pan is not None else None)
        # What runs between this layer's return and the next consumer of the stash: this block's
        # forward hooks, then the next block's pre-hooks and (skipped on a hit) its ln1 with its hooks;
        # or the final norm's pre-hooks (its forward hooks see the stashed output, that is fine).
        # Another library may also replace a module's forward after apply (nnsight) or put a wrapper
        # module in the layer list (repeng's ControlModule): foreign code then runs around the call.
        next_block = layers[i + 1] if i + 1 < L else None
        next_norm = nxt.module if nxt is not None else None
        names = param_names(type(block).forward)
        mid_key, post_key, pre_key = ("mid", i), ("post", i), ("pre", 0)
        key, next_key = str(i), str(i + 1)
        cls_forward = type(block).forward

        def can_stash() -> bool:
            if block._forward_hooks or global_hooks() or foreign(block) or live.get(key) is not block:
                return False
            # A checkpointed layer is one autograd unit, run again in backward: no tensor may cross
            # into or out of it except its arguments and its return value.
            if checkpointed(block) or (next_block is not None and checkpointed(next_block)):
                return False
            if next_block is not None:
                return not (next_block._forward_pre_hooks or foreign(next_block) or hooked(next_norm)
                            or live.get(next_key) is not next_block)
            return not (next_norm._forward_pre_hooks or foreign(next_norm))

        def fused_forward(hidden_states, *args, **kwargs):
            probe = engine.probe
            if probe is not None:  # drift.check_recompute counts the runs of this very function
                probe.append(i)
            if args:
                kwargs = kwargs_of(names, args, kwargs)
            step = getattr(tls, "step", None) or current()
            plan = step.plan
            st = step.stash
            hit = False
            if n1 is None:  # OLMo 2: the attention reads the raw stream, no normed input to take over
                step.stash = None
            elif i > 0 or st is not None:
                step.stash = None
                hit = stash_valid(st, hidden_states)
                if not _is_compiling():
                    if hit:
                        engine.fusion_hits += 1
                    else:
                        engine.fusion_misses += 1
            if hit:
                normed, h = st[1], hidden_states
            elif i == 0:
                normed, h = site(step, plan.pre_slot, hidden_states, None, n1 or scratch, use_norm=n1 is not None)
                if n1 is None:
                    normed = h
                if step.pending is not None:
                    engine.decide(step, pre_key, h)
            else:
                normed, h = (hidden_states if n1 is None else n1.module(hidden_states)), hidden_states
            if drop:
                for k in drop:
                    kwargs.pop(k, None)
            if allow is not None:
                kwargs = {k: v for k, v in kwargs.items() if k in allow}
            a = attn(normed, **kwargs)
            rest = ()
            if type(a) is tuple:
                a, rest = a[0], a[1:]
            if pan is not None:
                a = pan(a)
            if adrop is not None:
                a = adrop(a)
            # Granite: HF computes ``residual + a * m`` (the product rounded in the model's dtype, then
            # the add); pre-scaling here and adding in the kernel is the same arithmetic.
            mult = getattr(block, mult_attr) if mult_attr is not None else None
            if mult is not None:
                a = a * mult
            if par is None:
                if n2 is None:  # OLMo 2: add + patch, no norm after it; the MLP reads the stream
                    _, h = site(step, plan.mid_slot[i], a, h, scratch, use_norm=False)
                    normed = h
                else:
                    normed, h = site(step, plan.mid_slot[i], a, h, n2)
                if step.pending is not None:
                    engine.decide(step, mid_key, h)
            # parallel: the MLP reads the shared normed input, or its own norm of the same h (GPT-NeoX)
            m = mlp(normed if (par is None or n2 is None) else n2.module(h))
            if pmn is not None:
                m = pmn(m)
            if mdrop is not None:
                m = mdrop(m)
            if mult is not None:
                m = m * mult
            if par is not None:
                # the branch sum in transformers' order (arch/parallel.py); the last add goes to the kernel
                if par == "mlp+attn":
                    m = m + a
                elif par == "attn+mlp":
                    m = a + m
                else:  # "res+attn+mlp": (h + attn) + mlp
                    h = h + a
                if sum_p is not None:  # Falcon: dropout_add(mlp + attn, residual, hidden_dropout)
                    m = torch.nn.functional.dropout(m, getattr(block.config, sum_p), training=block.training)
            if nxt is None:  # no norm after this add: plain add + patch, discard the norm output
                _, h = site(step, plan.post_slot[i], m, h, scratch, use_norm=False)
                normed = None
            elif can_stash():
                normed, h = site(step, plan.post_slot[i], m, h, nxt)
            else:  # the next consumer will run its norm itself (hooks included): no norm wanted here
                _, h = site(step, plan.post_slot[i], m, h, nxt, use_norm=False)
                normed = None
            if step.pending is not None:
                engine.decide(step, post_key, h)
            step.stash = None if normed is None else (h, normed, version_of(h))
            if tuple_out:  # Falcon, GPT-J before 5.20: (hidden_states, attention weights) like the class
                return h, (rest[0] if rest else None)
            return h

        if mechanism(type(block)) == "forward":
            # transformers checkpoints this class in a wrapper around the class ``forward``, which the
            # instance forward below shadows: apply the wrapper's logic to the fused forward ourselves
            # (without it the layer is silently not recomputed; see checkpointing.py).
            @ours
            def forward(hidden_states, *args, **kwargs):
                if engine.removed:  # still called by a wrapper that captured it (nnsight): the plain block
                    return cls_forward(block, hidden_states, *args, **kwargs)
                return checkpoint_call(block, fused_forward, hidden_states, args, kwargs)
        else:  # "call": GradientCheckpointingLayer.__call__ checkpoints around us; "unknown": checked by running
            @ours
            def forward(hidden_states, *args, **kwargs):
                if engine.removed:  # still called by a wrapper that captured it (nnsight): the plain block
                    return cls_forward(block, hidden_states, *args, **kwargs)
                return fused_forward(hidden_states, *args, **kwargs)

        return forward

    live = get_path(info.base, spec.layers)._modules  # the model's layer list as it is now
    for i, block in enumerate(layers):
        block.forward = make_layer(i, block)
    if final_mod is not None:
        cls_forward = type(final_mod).forward

        @ours
        def final_forward(x, *args, **kwargs):
            step = None if engine.removed else getattr(tls, "step", None)
            if step is not None:
                st = step.stash
                step.stash = None
                if st is not None and not args and not kwargs and stash_valid(st, x):
                    if not _is_compiling():
                        engine.fusion_hits += 1
                    return st[1]
                if not _is_compiling():
                    engine.fusion_misses += 1
            return cls_forward(final_mod, x, *args, **kwargs)

        final_mod.forward = final_forward
    return targets


def _install_post(engine: Engine, impl) -> list:
    info, spec = engine.info, engine.info.spec
    run = impl.run
    tls = engine._tls
    current = engine.current
    targets = []

    def make_out(module, key, slot_of):
        norm = _Norm(module.LayerNorm, "layer", 0.0)
        dense, dropout = module.dense, module.dropout
        cls_forward = type(module).forward

        @ours
        def forward(hidden_states, input_tensor):
            if engine.removed:
                return cls_forward(module, hidden_states, input_tensor)
            step = getattr(tls, "step", None) or current()
            x = dropout(dense(hidden_states))
            D = x.shape[-1]
            x2 = x.reshape(-1, D).contiguous()
            r2 = input_tensor.reshape(-1, D).contiguous()
            slot = slot_of(step.plan)
            o, r = run_norm(run, x2, r2, norm, step.slots[slot] if slot >= 0 else None)
            if step.pending is not None:
                engine.decide(step, key, r.view(x.shape))
            return o.view(x.shape)

        return forward

    outs = []
    for i, block in enumerate(info.layers):
        mid = get_path(block, spec.mid_output)
        post = get_path(block, spec.post_output)
        outs.append((mid, make_out(mid, ("mid", i), lambda p, i=i: p.mid_slot[i])))
        outs.append((post, make_out(post, ("post", i), lambda p, i=i: p.post_slot[i])))
    emb_ln = get_path(info.base, spec.embed_norm)
    check_installable([m for m, _ in outs] + [emb_ln])
    norm0 = _Norm(emb_ln, "layer", 0.0)

    emb_cls_forward = type(emb_ln).forward

    @ours
    def emb_forward(x):
        if engine.removed:
            return emb_cls_forward(emb_ln, x)
        step = getattr(tls, "step", None) or current()
        D = x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        slot = step.plan.pre_slot
        o, r = run_norm(run, x2, None, norm0, step.slots[slot] if slot >= 0 else None)
        if step.pending is not None:
            engine.decide(step, ("pre", 0), r.view(x.shape))
        return o.view(x.shape)

    for m, fwd in outs:
        m.forward = fwd
        targets.append(m)
    emb_ln.forward = emb_forward
    targets.append(emb_ln)
    return targets


def uninstall(targets: list) -> None:
    """Delete fastpatch's instance forwards (the class forward is back); a forward another library put
    there since (nnsight) stays, and the fused function it may still call passes through once the
    engine is marked removed."""
    for m in targets:
        if getattr(m.__dict__.get("forward"), "_fastpatch", False):
            del m.__dict__["forward"]
