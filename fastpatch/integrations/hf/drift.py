"""Guard against drift between transformers and ``fused.py``: before a fused model is handed out,
each distinct fused module class is run once both ways on a tiny random input and must agree.

``fused.py`` re-implements decoder-block forwards of transformers 5.x (the order of adds, where the
norms sit, Gemma's ``1 + w``, ...). A transformers release that changes a block would otherwise give
silently wrong outputs; with this check :func:`fastpatch.apply` refuses with an error naming the class.

Pre-LN decoders: the arguments a block really receives (rotary embeddings, masks, ...) are captured by
running the base model on 4 tokens up to the first block of each class (a pre-hook stops the forward
there; hooks on the embeddings see that call). The block's class ``forward`` and the fused forward
(with an empty plan: no patch) then run on the same random hidden states; their outputs and, where the
fused layer hands the next layer its normed input, that normed tensor against the next norm module's
own ``forward`` must agree to within float rounding. Post-LN (BERT): each fused output module class
and the embedding LayerNorm, called directly on random inputs.

Training (:func:`check_recompute`): with gradient checkpointing on, the first block of each class is
called (its ``__call__``, as the model's layer loop calls it) in training mode on the same 4-token
arguments with random hidden states that require grad, then backward: the fused forward must have run
exactly once in the forward and exactly once more in backward (a recompute), however this transformers
version checkpoints a layer. Otherwise :class:`CheckpointingMismatchError`, naming the class and the
version: training would keep every activation (no recompute), or recompute twice.
"""
from __future__ import annotations

import torch

from .arch import get_path
from .engine import Engine, Step, build_plan
from .model_sites import UnsupportedModelError

_TOKENS = 4


class FusedMismatchError(UnsupportedModelError):
    """The fused implementation of a module class does not reproduce the class's own forward."""


class CheckpointingMismatchError(FusedMismatchError):
    """Under gradient checkpointing the fused layer forward is not recomputed once in backward."""


class _Captured(Exception):
    pass


def _rtol(dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _compare(got, ref, what: str, dtype) -> None:
    if isinstance(got, tuple) != isinstance(ref, tuple):  # the model loop reads outputs[0] or the tensor
        raise FusedMismatchError(
            f"{what}: the fused forward returns {type(got).__name__}, the class's own forward {type(ref).__name__}; "
            f"this transformers version ({_tf_version()}) changed what the block returns. Use "
            "fastpatch.apply(..., fallback='hooks') or fastpatch.hooks.apply, and report the class")
    got, ref = _first(got), _first(ref)
    if got.shape != ref.shape:
        raise FusedMismatchError(f"{what}: the fused forward returns shape {tuple(got.shape)}, the class's own "
                                 f"forward {tuple(ref.shape)}")
    scale = float(ref.float().abs().max().clamp_min(1e-6))
    err = float((got.float() - ref.float()).abs().max())
    if not err <= _rtol(dtype) * scale:  # also catches NaN
        raise FusedMismatchError(
            f"{what}: the fused forward differs from the class's own forward (max |diff| {err:.3g}, max |ref| "
            f"{scale:.3g}); this transformers version ({_tf_version()}) changed the block, and fastpatch's fused "
            "implementation would give wrong results. Use fastpatch.apply(..., fallback='hooks') or "
            "fastpatch.hooks.apply, and report the class")


def _tf_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except Exception:  # pragma: no cover
        return "unknown"


class _Eval:
    """Modules in eval mode (no dropout) for the check, the previous modes restored after."""

    def __init__(self, modules):
        self.training = [m for top in modules for m in top.modules() if m.training]

    def __enter__(self):
        for m in self.training:
            m.training = False

    def __exit__(self, *exc):
        for m in self.training:
            m.training = True


def capture_block_inputs(info) -> dict:
    """{block class: (index, args, kwargs)} for the first block of each class, from a 4-token forward of
    the base model that stops at that block (before anything fused runs)."""
    firsts = {}
    for i, block in enumerate(info.layers):
        firsts.setdefault(type(block), i)
    captured = {}
    todo = set(firsts.values())

    def make(i):
        def pre(module, args, kwargs):
            captured[type(module)] = (i, args, kwargs)
            todo.discard(i)
            if not todo:
                raise _Captured
        return pre

    hooks = [info.layers[i].register_forward_pre_hook(make(i), with_kwargs=True) for i in firsts.values()]
    vocab = int(getattr(info.base.config, "vocab_size", 2) or 2)
    ids = (torch.arange(_TOKENS, device=info.device) % max(vocab - 1, 1) + 1).unsqueeze(0)
    try:
        with torch.no_grad(), _Eval([info.base]):
            info.base(input_ids=ids, use_cache=False)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    missing = [c.__name__ for c in firsts if c not in captured]
    if missing:
        raise FusedMismatchError(f"could not run the base model up to {missing} to check the fused blocks")
    return captured


def check_pre(engine: Engine, captured: dict) -> None:
    """Fused vs class forward for each captured block class (the fused forwards are installed)."""
    info, spec = engine.info, engine.info.spec
    empty = build_plan(info, {}, False)
    g = torch.Generator(device="cpu").manual_seed(0)
    for cls, (i, args, kwargs) in captured.items():
        block = info.layers[i]
        h0 = args[0] if args else kwargs.get("hidden_states")
        x = torch.randn(h0.shape, generator=g).to(device=h0.device, dtype=h0.dtype)
        rest_args = args[1:] if args else ()
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        step = Step(empty)
        with torch.no_grad(), _Eval([block]):
            ref = type(block).forward(block, x.clone(), *rest_args, **kw)
            with engine.running(step):
                got = block.forward(x.clone(), *rest_args, **kw)
            name = f"{cls.__module__}.{cls.__qualname__}"
            _compare(got, ref, name, h0.dtype)
            st = step.stash
            if st is not None:  # the next layer's (or the final) norm, fused into this layer's last add
                nxt = get_path(info.layers[i + 1], spec.ln1) if i + 1 < info.num_layers else info.final_norm()
                ncls = type(nxt)
                _compare(st.normed, ncls.forward(nxt, _first(ref)),
                         f"{ncls.__module__}.{ncls.__qualname__} (fused into {cls.__qualname__})", h0.dtype)


def check_post(engine: Engine) -> None:
    """BERT: each fused output module class and the embedding LayerNorm on random inputs."""
    info, spec = engine.info, engine.info.spec
    empty = build_plan(info, {}, False)
    g = torch.Generator(device="cpu").manual_seed(0)
    D = info.hidden_size

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=info.device, dtype=info.dtype)

    checks, seen = [], set()
    for part in (spec.mid_output, spec.post_output):
        m = get_path(info.layers[0], part)
        if type(m) not in seen:
            seen.add(type(m))
            checks.append((m, (rand(1, _TOKENS, m.dense.in_features), rand(1, _TOKENS, D))))
    emb_ln = get_path(info.base, spec.embed_norm)
    checks.append((emb_ln, (rand(1, _TOKENS, D),)))
    for m, inputs in checks:
        cls = type(m)
        with torch.no_grad(), _Eval([m]):
            ref = cls.forward(m, *inputs)
            with engine.running(Step(empty)):
                got = m.forward(*inputs)
        _compare(got, ref, f"{cls.__module__}.{cls.__qualname__}", info.dtype)


class _Probe:
    """The state :func:`check_recompute` changes, restored on exit: parameters frozen (no ``.grad`` of the
    user's is created or touched), the probed blocks in training mode with every submodule in eval (no
    dropout: the user's RNG stream is not consumed), the engine's probe list and fusion counters."""

    def __init__(self, engine, blocks):
        self.engine = engine
        self.frozen = [p for p in engine.info.base.parameters() if p.requires_grad]
        self.modes = [(m, m.training) for b in blocks for m in b.modules()]
        self.blocks = blocks

    def __enter__(self):
        e = self.engine
        self.saved = (e.fusion_hits, e.fusion_misses)
        for p in self.frozen:
            p.requires_grad_(False)
        for m, _ in self.modes:
            m.training = False
        for b in self.blocks:
            b.training = True
        e.probe = []
        return self

    def __exit__(self, *exc):
        e = self.engine
        e.probe = None
        e.fusion_hits, e.fusion_misses = self.saved
        for m, mode in self.modes:
            m.training = mode
        for p in self.frozen:
            p.requires_grad_(True)


def check_recompute(engine: Engine, captured: dict) -> None:
    """Under gradient checkpointing, each fused block class runs its fused forward once in forward and
    once more in backward (see the module docstring); blocks not set to checkpoint are skipped, and so
    are blocks transformers does not checkpoint by themselves (not ``GradientCheckpointingLayer``s: a
    caller that checkpoints them calls the fused forward like any forward)."""
    from .checkpointing import mechanism

    info = engine.info
    todo = []
    for cls, (i, args, kwargs) in captured.items():
        # the first block of the class that is set to checkpoint (``every_n_layers`` may skip the first);
        # the captured arguments (rotary embeddings, mask) are those of the class's first block
        block = next((b for b in info.layers[i:] if type(b) is cls and getattr(b, "gradient_checkpointing", False)),
                     None)
        if block is not None and mechanism(cls) != "none":
            todo.append((cls, block, args, kwargs))
    if not todo:
        return
    empty = build_plan(info, {}, False)
    g = torch.Generator(device="cpu").manual_seed(0)
    with _Probe(engine, [b for _, b, _, _ in todo]), torch.enable_grad():
        for cls, block, args, kwargs in todo:
            h0 = args[0] if args else kwargs.get("hidden_states")
            x = torch.randn(h0.shape, generator=g).to(device=h0.device, dtype=h0.dtype).requires_grad_()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            # engine.probe is shared by all threads (a CUDA backward recomputes on the device's thread):
            # the check assumes nothing else runs this model meanwhile, as apply / a training step does
            del engine.probe[:]
            with engine.running(Step(empty)):
                out = block(x, *args[1:], **kw)
                forward_runs = len(engine.probe)
                _first(out).float().sum().backward()
                backward_runs = len(engine.probe) - forward_runs
            if forward_runs != 1 or backward_runs != 1:
                raise CheckpointingMismatchError(_recompute_message(cls, forward_runs, backward_runs))


def _recompute_message(cls, forward_runs: int, backward_runs: int) -> str:
    from .checkpointing import mechanism

    name = f"{cls.__module__}.{cls.__qualname__}"
    what = ("is not recomputed in backward: training would keep every activation, as without checkpointing"
            if backward_runs == 0 else "is not run exactly once in forward and once in backward")
    return (f"{name}: under gradient checkpointing fastpatch's fused layer forward ran {forward_runs} time(s) in "
            f"forward and {backward_runs} in backward (expected 1 and 1); it {what}. This transformers version "
            f"({_tf_version()}) checkpoints {cls.__name__} in a way fastpatch does not know (mechanism: "
            f"{mechanism(cls)!r}). Fix: fastpatch.apply(model, patches, fallback='hooks') with checkpointing "
            "enabled before apply (or fastpatch.hooks.apply) recomputes correctly through plain hooks; or "
            "disable gradient checkpointing; and please report the class and the transformers version")
