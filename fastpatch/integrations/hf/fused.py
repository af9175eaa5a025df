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

One class per block style; an instance holds one module's parts and its bound ``forward`` is that
module's instance forward (:func:`install`, chosen by :func:`layer_class`):

- :class:`FusedDecoderLayer` (the steps every decoder block shares: take the stash or norm the input,
  the attention branch, the last add + patch + next norm, the stash) and its block styles:
  :class:`PreNormLayer` (a norm before each branch: Llama-like, Gemma, Gemma2/3, GPT-2, Granite, Phi-3,
  ...), :class:`PostBranchNormLayer` (OLMo 2: norms after the branches, none before), :class:`ParallelLayer`
  (GPT-NeoX, Cohere, GPT-J, Falcon, Phi: both branches read one input, one add);
- :class:`FinalNorm`: the final norm, which takes the last layer's stash;
- post-LN: :class:`PostNormOutput` and :class:`EmbeddingNorm`.

Per-step state is the engine's: ``step.slots`` (:class:`~.engine.Slot` or None per patched site) and
``step.stash`` (a :class:`Stash` or None), read through :meth:`~.engine.Engine.current`.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import torch
from torch.nn.modules import module as _torch_module

from ...kernels import autograd as _autograd
from ...kernels.backends import NormSpec
from .checkpointing import checkpoint_call, checkpointed, mechanism, recomputing
from ...core.reference import NORM_KINDS
from .arch import ArchSpec, get_path, norm_eps
from .model_sites import UnsupportedModelError
from .engine import Engine, Slot, Step, kwargs_of, param_names

PRE = ("pre", 0)  # the site key of layers.0.resid_pre


class Norm:
    """A norm module's parameters as the kernel takes them (read at call time: robust to reloads)."""

    __slots__ = ("module", "eps", "kind", "offset", "spec", "has_weight", "has_bias")

    def __init__(self, module, kind: str, offset: float, eps=None):
        self.module = module
        self.eps = norm_eps(module, eps)
        self.kind = NORM_KINDS[kind]
        self.offset = float(offset)
        self.spec = NormSpec(self.kind, float(self.eps), self.offset)  # what the kernels take
        # OLMo's LayerNorm has no parameters at all: the kernels take weight=None as "no affine"
        self.has_weight = getattr(module, "weight", None) is not None
        self.has_bias = kind == "layer" and getattr(module, "bias", None) is not None


class Stash(NamedTuple):
    """A fused layer's last add, handed to the next consumer of its output (the next layer, or the final
    norm), which takes ``normed`` instead of running its norm if it receives the very tensor ``h``."""

    h: torch.Tensor  # the stream the layer returned
    normed: torch.Tensor  # the next norm of ``h``, computed in the layer's last kernel
    version: Optional[int]  # ``h``'s in-place version counter then (None: inference tensor, or compiling)


# Stash((h, normed, version)) without namedtuple's Python-level ``__new__`` (once per layer call)
_new_stash = partial(tuple.__new__, Stash)


def run_norm(run, x2, r2, norm: Norm, slot: Optional[Slot]):
    """add + patch + norm of 2-D rows through the backend's ``run``, or through the differentiable op
    (:mod:`fastpatch.kernels.autograd`: the kernel forward, a hand-written backward) when autograd
    records and the stream, the norm's parameters or the bank require grad. ``slot`` is the site's
    :class:`~.engine.Slot` this step, or None. Fire counts are not counted again while a checkpointed
    layer is recomputed."""
    mod = norm.module
    w = mod.weight if norm.has_weight else None
    b = mod.bias if norm.has_bias else None
    if slot is None:
        bank = args = index = fire = None
    else:
        bank, index, fire = slot.bank, slot.index, slot.fire
        args = bank.kernel_args()
    if _autograd.needs_grad(x2, r2, w, b, bank):
        if fire is not None and recomputing():
            fire = None
        return _autograd.run(run, x2, r2, w, b, norm.spec, args, index, fire)
    return run(x2, r2, w, b, norm.spec, args, index, fire, None, None)


# Global module forward (pre-)hooks (``register_module_forward_hook`` and friends): while any is registered
# it may run between any two modules. Read inline (``_GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]``) on the hot path.
_GLOBAL_HOOKS = (_torch_module._global_forward_hooks, _torch_module._global_forward_pre_hooks)
_is_compiling = torch.compiler.is_compiling


def ours(fn):
    """Mark a forward as installed by fastpatch (see :func:`foreign`, :func:`uninstall`); on a method, its
    bound methods carry the mark too."""
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
    return bool(module._forward_hooks or module._forward_pre_hooks or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]
                or foreign(module))


def stash_valid(st: Optional[Stash], x, compiling: bool) -> bool:
    """The stash applies to ``x``: same object, not edited in place since (``compiling``: the caller's
    ``torch.compiler.is_compiling()``; version counters are not compared while compiling)."""
    if st is None or st.h is not x:
        return False
    return st.version is None or compiling or x._version == st.version


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


def _part(block, path: Optional[str]):
    return get_path(block, path) if path else None


class FusedDecoderLayer:
    """The fused forward of one decoder block, tensor in / tensor out, as the block's instance forward
    (:meth:`forward`, or :meth:`checkpointed_forward` where fastpatch checkpoints the layer itself).

    :meth:`fused` is the block: :meth:`take_input` (the attention's input and the stream), :meth:`attention`
    (the attention branch up to its add), :meth:`middle` (what a block style does between the attention
    and the last add; it returns the last add's branch and residual), :meth:`last_add` (add + patch + the
    next norm in one kernel, and the stash). The base class implements the steps every style shares;
    a subclass per style implements :meth:`middle` and, where the attention reads the raw stream,
    :meth:`take_input`."""

    def __init__(self, engine: Engine, run, i: int, ln1: list, ln2: list, final: Optional[Norm], live: dict):
        """``ln1`` / ``ln2``: every layer's :class:`Norm` before the attention / the MLP (None where the
        style has none); ``final``: the final norm's; ``live``: the model's layer list as it is now
        (``_modules`` of the ModuleList), to see a wrapper put in a block's place after apply."""
        spec: ArchSpec = engine.info.spec
        layers = engine.info.layers
        block = layers[i]
        last = i + 1 == len(layers)
        self.engine, self.run, self.i, self.block = engine, run, i, block
        self.first = i == 0
        self.mid_key, self.post_key = ("mid", i), ("post", i)
        self.names = param_names(type(block).forward)
        self.cls_forward = type(block).forward
        self.attn, self.mlp = get_path(block, spec.attn), get_path(block, spec.mlp)
        self.post_attn_norm = _part(block, spec.post_attn_norm)
        self.post_mlp_norm = _part(block, spec.post_mlp_norm)
        self.attn_dropout = _part(block, spec.attn_dropout)
        self.mlp_dropout = _part(block, spec.mlp_dropout)
        self.drop = spec.drop_attn_kwargs
        self.allow = None if spec.attn_kwargs is None else frozenset(spec.attn_kwargs)
        self.mult_attr = spec.residual_multiplier
        self.tuple_out = spec.tuple_out
        self.ln1, self.ln2 = ln1[i], ln2[i]
        self.next_norm: Optional[Norm] = final if last else ln1[i + 1]
        # a norm for sites with no norm after them: the kernel computes one anyway and it is discarded
        # (OLMo 2, see arch/olmo2.py; a last layer without final norm)
        pan = self.post_attn_norm
        self.scratch = (self.ln1 or self.ln2 or final
                        or (Norm(pan, spec.norm, spec.weight_offset, spec.norm_eps) if pan is not None else None))
        # What runs between this layer's return and the next consumer of the stash: this block's
        # forward hooks, then the next block's pre-hooks and (skipped on a hit) its ln1 with its hooks;
        # or the final norm's pre-hooks (its forward hooks see the stashed output, that is fine).
        # Another library may also replace a module's forward after apply (nnsight) or put a wrapper
        # module in the layer list (repeng's ControlModule): foreign code then runs around the call.
        self.next_block = None if last else layers[i + 1]
        self.next_module = self.next_norm.module if self.next_norm is not None else None
        self.live, self.key, self.next_key = live, str(i), str(i + 1)

    # -- the instance forwards ------------------------------------------------------------------
    @ours
    def forward(self, hidden_states, *args, **kwargs):
        """The block's forward where transformers checkpoints around the module call (``"call"``), does
        not checkpoint it (``"none"``), or in a way fastpatch does not know (``"unknown"``: checked by
        running, ``drift.check_recompute``)."""
        if self.engine.removed:  # still called by a wrapper that captured it (nnsight): the plain block
            return self.cls_forward(self.block, hidden_states, *args, **kwargs)
        return self.fused(hidden_states, *args, **kwargs)

    @ours
    def checkpointed_forward(self, hidden_states, *args, **kwargs):
        """The block's forward where transformers checkpoints in a wrapper around the class ``forward``
        (``"forward"``), which the instance forward shadows: the wrapper's logic applied to the fused
        forward (without it the layer is silently not recomputed; see checkpointing.py)."""
        if self.engine.removed:
            return self.cls_forward(self.block, hidden_states, *args, **kwargs)
        return checkpoint_call(self.block, self.fused, hidden_states, args, kwargs)

    # -- the block ------------------------------------------------------------------------------
    def fused(self, hidden_states, *args, **kwargs):
        engine = self.engine
        probe = engine.probe
        if probe is not None:  # drift.check_recompute counts the runs of this very function
            probe.append(self.i)
        if args:
            kwargs = kwargs_of(self.names, args, kwargs)
        step = engine.current()
        # asked once per call (it is a Python function, and constant within one call: the same under
        # torch.compile's trace, where it is True)
        compiling = _is_compiling()
        normed, h = self.take_input(step, hidden_states, compiling)
        a, rest, mult = self.attention(normed, kwargs)
        m, h = self.middle(step, normed, h, a, mult)
        h = self.last_add(step, m, h, compiling)
        if self.tuple_out:  # Falcon, GPT-J before 5.20: (hidden_states, attention weights) like the class
            return h, (rest[0] if rest else None)
        return h

    def take_input(self, step: Step, x, compiling: bool):
        """(the attention's normed input, the stream) for the layer input ``x``: the previous layer's stash
        if it applies to ``x`` (a fusion hit), else ``ln1`` run here; layer 0 patches ``resid_pre``
        (patch + ln1 in one kernel). Hits and misses are not counted while compiling."""
        st = step.stash
        hit = False
        if not self.first or st is not None:
            step.stash = None
            hit = stash_valid(st, x, compiling)
            if not compiling:
                if hit:
                    self.engine.fusion_hits += 1
                else:
                    self.engine.fusion_misses += 1
        if hit:
            return st.normed, x
        if self.first:
            normed, h = self.site(step, step.plan.pre_slot, x, None, self.ln1)
            if step.pending is not None:
                self.engine.decide(step, PRE, h)
            return normed, h
        return self.ln1.module(x), x

    def attention(self, normed, kwargs: dict):
        """The attention branch up to its add: (its output, the attention's other outputs, the branch
        multiplier or None). ``kwargs`` is the forward's own dict (edited in place)."""
        if self.drop:
            for k in self.drop:
                kwargs.pop(k, None)
        if self.allow is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.allow}
        a = self.attn(normed, **kwargs)
        rest = ()
        if type(a) is tuple:
            a, rest = a[0], a[1:]
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        if self.attn_dropout is not None:
            a = self.attn_dropout(a)
        # Granite: HF computes ``residual + a * m`` (the product rounded in the model's dtype, then
        # the add); pre-scaling here and adding in the kernel is the same arithmetic.
        mult = getattr(self.block, self.mult_attr) if self.mult_attr is not None else None
        if mult is not None:
            a = a * mult
        return a, rest, mult

    def middle(self, step: Step, normed, h, a, mult):
        """From the attention output ``a`` to the last add: returns (the branch the last add adds, the
        residual it is added to)."""
        raise NotImplementedError

    def feed_forward(self, x, mult):
        """The MLP branch up to its add."""
        m = self.mlp(x)
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        if self.mlp_dropout is not None:
            m = self.mlp_dropout(m)
        if mult is not None:
            m = m * mult
        return m

    def last_add(self, step: Step, m, h, compiling: bool):
        """``resid_post``: add + patch and, where the stash can be kept, the next norm in the same kernel."""
        slot = step.plan.post_slot[self.i]
        nxt = self.next_norm
        if nxt is None:  # no norm after this add: plain add + patch, discard the norm output
            _, h = self.site(step, slot, m, h, self.scratch, use_norm=False)
            normed = None
        elif self.can_stash():
            normed, h = self.site(step, slot, m, h, nxt)
        else:  # the next consumer will run its norm itself (hooks included): no norm wanted here
            _, h = self.site(step, slot, m, h, nxt, use_norm=False)
            normed = None
        if step.pending is not None:
            self.engine.decide(step, self.post_key, h)
        if normed is None:
            step.stash = None
        else:  # the version counter, where there is one (not on inference tensors, not while compiling)
            step.stash = _new_stash((h, normed, None if compiling or h.is_inference() else h._version))
        return h

    # -- pieces -----------------------------------------------------------------------------------
    def site(self, step: Step, slot: int, x, res, norm: Norm, use_norm: bool = True):
        """add + patch + norm: (normed, stream); ``use_norm=False``: the normed output will be discarded
        (and the norm module's hooks must not run for it)."""
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
        o, r = run_norm(self.run, x2, r2, norm, step.slots[slot] if slot >= 0 else None)
        h = r.view(x.shape)
        if use_norm and hooked(norm.module):  # the norm's hooks must run on (and may change) its output
            return norm.module(h), h
        return o.view(x.shape), h

    def can_stash(self) -> bool:
        """No foreign code can run between this layer's return and the next consumer of its output (see the
        module docstring), so the next norm may be computed here."""
        block, nb = self.block, self.next_block
        if (block._forward_hooks or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or foreign(block)
                or self.live.get(self.key) is not block):
            return False
        # A checkpointed layer is one autograd unit, run again in backward: no tensor may cross
        # into or out of it except its arguments and its return value.
        if checkpointed(block) or (nb is not None and checkpointed(nb)):
            return False
        if nb is not None:
            return not (nb._forward_pre_hooks or foreign(nb) or hooked(self.next_module)
                        or self.live.get(self.next_key) is not nb)
        return not (self.next_module._forward_pre_hooks or foreign(self.next_module))


class PreNormLayer(FusedDecoderLayer):
    """Pre-LN: a norm before each branch (``ln1``, ``ln2``); ``resid_mid`` is one kernel (add + patch +
    ``ln2``) whose normed output feeds the MLP."""

    def middle(self, step: Step, normed, h, a, mult):
        normed, h = self.site(step, step.plan.mid_slot[self.i], a, h, self.ln2)
        if step.pending is not None:
            self.engine.decide(step, self.mid_key, h)
        return self.feed_forward(normed, mult), h


class PostBranchNormLayer(FusedDecoderLayer):
    """OLMo 2 (arch/olmo2.py): the norms sit after each branch, before its add; both branches read the raw
    stream, and ``resid_pre`` / ``resid_mid`` are an add + patch with no norm after it."""

    def take_input(self, step: Step, x, compiling: bool):
        step.stash = None  # the attention reads the raw stream: no normed input to take over
        if self.first:
            _, h = self.site(step, step.plan.pre_slot, x, None, self.scratch, use_norm=False)
            if step.pending is not None:
                self.engine.decide(step, PRE, h)
            return h, h
        return x, x

    def middle(self, step: Step, normed, h, a, mult):
        _, h = self.site(step, step.plan.mid_slot[self.i], a, h, self.scratch, use_norm=False)
        if step.pending is not None:
            self.engine.decide(step, self.mid_key, h)
        return self.feed_forward(h, mult), h


_PARALLEL_ORDERS = ("mlp+attn", "attn+mlp", "res+attn+mlp")


class ParallelLayer(FusedDecoderLayer):
    """Parallel blocks (arch/parallel.py): the attention and the MLP read norms of the same input, their
    outputs are summed in transformers' order and added to the stream once (no ``resid_mid``); the MLP
    reads the shared normed input, or its own norm ``ln2`` of the same stream (GPT-NeoX, Falcon-40B)."""

    def __init__(self, engine: Engine, run, i: int, ln1: list, ln2: list, final: Optional[Norm], live: dict):
        super().__init__(engine, run, i, ln1, ln2, final, live)
        spec = engine.info.spec
        self.order = spec.parallel
        self.sum_dropout = spec.sum_dropout

    def middle(self, step: Step, normed, h, a, mult):
        m = self.feed_forward(normed if self.ln2 is None else self.ln2.module(h), mult)
        # the branch sum in transformers' order (arch/parallel.py); the last add goes to the kernel
        if self.order == "mlp+attn":
            m = m + a
        elif self.order == "attn+mlp":
            m = a + m
        else:  # "res+attn+mlp": (h + attn) + mlp
            h = h + a
        if self.sum_dropout is not None:  # Falcon: dropout_add(mlp + attn, residual, hidden_dropout)
            block = self.block
            m = torch.nn.functional.dropout(m, getattr(block.config, self.sum_dropout), training=block.training)
        return m, h


def layer_class(spec: ArchSpec) -> type:
    """The :class:`FusedDecoderLayer` subclass for a decoder spec's block style."""
    if spec.parallel is not None:
        if spec.parallel not in _PARALLEL_ORDERS or spec.ln1 is None:
            raise UnsupportedModelError(
                f"arch spec {spec.name!r}: a parallel block needs ln1 and parallel in {_PARALLEL_ORDERS}, got "
                f"ln1={spec.ln1!r}, parallel={spec.parallel!r}; fix the spec (arch/parallel.py) or use "
                "fallback='hooks'")
        return ParallelLayer
    if spec.ln1 is not None and spec.ln2 is not None:
        return PreNormLayer
    if spec.ln1 is None and spec.ln2 is None:
        return PostBranchNormLayer
    raise UnsupportedModelError(
        f"arch spec {spec.name!r}: a sequential block has a norm before both branches (ln1 and ln2, pre-LN) or "
        f"before neither (OLMo 2), got ln1={spec.ln1!r}, ln2={spec.ln2!r}; fastpatch has no fused block for "
        "this style: add one to fused.py, or use fallback='hooks'")


class FinalNorm:
    """The final norm's forward: the last layer's stash if it applies to the input, else the norm."""

    def __init__(self, engine: Engine, module):
        self.engine, self.module, self.cls_forward = engine, module, type(module).forward

    @ours
    def forward(self, x, *args, **kwargs):
        engine = self.engine
        step = None if engine.removed else engine.active()
        if step is not None:
            st = step.stash
            step.stash = None
            compiling = _is_compiling()
            if st is not None and not args and not kwargs and stash_valid(st, x, compiling):
                if not compiling:
                    engine.fusion_hits += 1
                return st.normed
            if not compiling:
                engine.fusion_misses += 1
        return self.cls_forward(self.module, x, *args, **kwargs)


class PostNormSite:
    """A post-LN (BERT) site: its module's LayerNorm, fused with the patch of site ``key`` (and the add)."""

    def __init__(self, engine: Engine, run, module, norm_module, key):
        self.engine, self.run, self.module, self.key = engine, run, module, key
        self.norm = Norm(norm_module, "layer", 0.0)
        self.cls_forward = type(module).forward

    def site(self, step: Step, x, res):
        """(add +) patch + LayerNorm of ``x`` [..., D]; returns the normed output."""
        D = x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        r2 = None if res is None else res.reshape(-1, D).contiguous()
        slot = step.plan.slot(self.key)
        o, r = run_norm(self.run, x2, r2, self.norm, step.slots[slot] if slot >= 0 else None)
        if step.pending is not None:
            self.engine.decide(step, self.key, r.view(x.shape))
        return o.view(x.shape)


class PostNormOutput(PostNormSite):
    """BERT's ``attention.output`` (``resid_mid``) / ``output`` (``resid_post``): dense → dropout → add +
    patch + LayerNorm in one kernel."""

    def __init__(self, engine: Engine, run, module, key):
        super().__init__(engine, run, module, module.LayerNorm, key)
        self.dense, self.dropout = module.dense, module.dropout

    @ours
    def forward(self, hidden_states, input_tensor):
        if self.engine.removed:
            return self.cls_forward(self.module, hidden_states, input_tensor)
        step = self.engine.current()
        return self.site(step, self.dropout(self.dense(hidden_states)), input_tensor)


class EmbeddingNorm(PostNormSite):
    """BERT's embedding LayerNorm: patch (``layers.0.resid_pre``) + LayerNorm in one kernel."""

    def __init__(self, engine: Engine, run, module):
        super().__init__(engine, run, module, module, PRE)

    @ours
    def forward(self, x):
        if self.engine.removed:
            return self.cls_forward(self.module, x)
        return self.site(self.engine.current(), x, None)


def install(engine: Engine, impl) -> list:
    """Replace the forwards; returns the modules whose instance ``forward`` was set (for remove). Every
    fused forward is built before the first is set: an error leaves the model as it was."""
    if engine.info.spec.style == "post":
        forwards = _post_forwards(engine, impl.run)
    else:
        forwards = _decoder_forwards(engine, impl.run)
    for module, forward in forwards:
        module.forward = forward
    return [module for module, _ in forwards]


def _decoder_forwards(engine: Engine, run) -> list:
    info, spec = engine.info, engine.info.spec
    cls = layer_class(spec)
    layers = info.layers
    kind, offset, eps = spec.norm, spec.weight_offset, spec.norm_eps
    # None where the block has no such norm (OLMo 2: none before either branch; parallel: one for both)
    ln1 = [Norm(get_path(b, spec.ln1), kind, offset, eps) if spec.ln1 else None for b in layers]
    ln2 = [Norm(get_path(b, spec.ln2), kind, offset, eps) if spec.ln2 else None for b in layers]
    final_mod = info.final_norm()
    final = Norm(final_mod, kind, offset, eps) if final_mod is not None else None
    check_installable(list(layers) + ([final_mod] if final_mod is not None else []))
    live = get_path(info.base, spec.layers)._modules  # the model's layer list as it is now
    forwards = []
    for i, block in enumerate(layers):
        layer = cls(engine, run, i, ln1, ln2, final, live)
        # "forward": transformers checkpoints this class in a wrapper around the class ``forward``, which
        # the instance forward shadows; "call" (GradientCheckpointingLayer.__call__ checkpoints around
        # us), "none", "unknown" (checked by running): the fused forward as it is
        by_forward = mechanism(type(block)) == "forward"
        forwards.append((block, layer.checkpointed_forward if by_forward else layer.forward))
    if final_mod is not None:
        forwards.append((final_mod, FinalNorm(engine, final_mod).forward))
    return forwards


def _post_forwards(engine: Engine, run) -> list:
    info, spec = engine.info, engine.info.spec
    forwards = []
    for i, block in enumerate(info.layers):
        for path, key in ((spec.mid_output, ("mid", i)), (spec.post_output, ("post", i))):
            module = get_path(block, path)
            forwards.append((module, PostNormOutput(engine, run, module, key).forward))
    emb_ln = get_path(info.base, spec.embed_norm)
    forwards.append((emb_ln, EmbeddingNorm(engine, run, emb_ln).forward))
    check_installable([m for m, _ in forwards])
    return forwards


def uninstall(targets: list) -> None:
    """Delete fastpatch's instance forwards (the class forward is back); a forward another library put
    there since (nnsight) stays, and the fused function it may still call passes through once the
    engine is marked removed."""
    for m in targets:
        if getattr(m.__dict__.get("forward"), "_fastpatch", False):
            del m.__dict__["forward"]
