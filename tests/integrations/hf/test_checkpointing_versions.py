"""Gradient checkpointing under fastpatch, whatever mechanism transformers uses (issue 16, items 2-3).

transformers <= 5.19 checkpoints a decoder layer in ``GradientCheckpointingLayer.__call__``; 5.24 wraps
the layer class's ``forward`` instead, which fastpatch's instance forward used to shadow (no layer was
recomputed, nothing failed). These tests do not rely on module hooks or on one transformers version:

- recomputation is counted at the dispatcher (``TorchDispatchMode``): matrix products during
  ``.backward()`` that read a decoder layer's weights, per layer, with checkpointing on minus off. The
  oracle is the plain (unpatched) model with checkpointing plus a forward hook written here applying
  the same low-rank edit: fastpatch must recompute the same layers, the same number of products;
- gradients of every parameter and of the patch against that oracle (fp32, 1e-5 relative);
- both ``use_reentrant`` settings, checkpointing enabled before and after ``apply``;
- a mechanism that does not recompute (simulated) is refused with an error naming the class and the
  transformers version, at ``apply`` and at the first training forward; ``fallback="hooks"`` warns.

Run them under each transformers you support (5.19 in the main env, 5.24 in a venv; see
docs/surgery.md's training section).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import set_checkpoint_early_stop

import fastpatch as fp
from fastpatch.integrations.hf import fused
from fastpatch.integrations.hf.checkpointing import mechanism
from fastpatch.integrations.hf.drift import CheckpointingMismatchError
from fastpatch.kernels import autograd as ag

from models import tiny_model

B, S, L, R = 2, 8, 3, 4
_MM = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(enable|disable)` is deprecated")


def _layers(model):
    base = model.base_model  # model / transformer / gpt_neox
    return base.layers if hasattr(base, "layers") else base.h


def _model(arch):
    m = tiny_model(arch, num_layers=L)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m.train()


class LayerProducts(TorchDispatchMode):
    """Counts matrix products reading each decoder layer's weights (by storage), per layer index."""

    def __init__(self, model):
        super().__init__()
        self.owner = {p.untyped_storage().data_ptr(): i
                      for i, layer in enumerate(_layers(model)) for p in layer.parameters()}
        self.counts = [0] * len(_layers(model))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MM:
            for a in args:
                if isinstance(a, torch.Tensor):
                    i = self.owner.get(a.untyped_storage().data_ptr())
                    if i is not None:
                        self.counts[i] += 1
                        break
        return func(*args, **(kwargs or {}))


def _enable(model, gc):
    if gc is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable({"use_reentrant": gc})


def _step(model, ids, proj):
    """Forward, then backward under the counter; returns per-layer products during backward. Early stop
    is off so a non-reentrant recompute runs each layer to its end for both models alike (with it on, a
    recompute stops after the last tensor the layer saved, which differs with the patch's own op)."""
    with set_checkpoint_early_stop(False):
        out = model(ids, use_cache=False).logits
        loss = (out * proj).sum() / out.numel()
        with LayerProducts(model) as count:
            loss.backward()
    return count.counts


class Oracle:
    """The same rank-R edit at layer 1's output, as a plain forward hook on the unpatched model."""

    def __init__(self, D, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.patch = fp.LowRank(torch.randn(D, R, generator=g) / D**0.5, torch.randn(R, D, generator=g) / R**0.5,
                                torch.randn(R, generator=g))
        self.A = self.patch.A.clone().requires_grad_()
        self.B = self.patch.B.clone().requires_grad_()
        self.bias = self.patch.bias.clone().requires_grad_()

    def hook(self, module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + (h @ self.A + self.bias) @ self.B
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def grads(self):  # in the bank's canonical layout: down = Aᵀ, up = B
        return {"down": self.A.grad.T, "bias": self.bias.grad, "up": self.B.grad}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol, what):
    scale = b.abs().max().clamp_min(1e-6)
    err = (a.double() - b.double()).abs().max()
    assert err <= tol * scale, f"{what}: max |diff| {err.item():.3g} > {tol} x max |ref| {scale.item():.3g}"


def _run_plain(model, oracle, gc, ids, proj):
    _enable(model, gc)
    model.zero_grad(set_to_none=True)
    h = _layers(model)[1].register_forward_hook(oracle.hook)
    try:
        counts = _step(model, ids, proj)
    finally:
        h.remove()
    return counts, _grads(model)


def _run_fastpatch(model, oracle, gc, ids, proj, enable_after):
    D = oracle.A.shape[0]
    bank = ag.TrainableBank([oracle.patch], D)
    model.zero_grad(set_to_none=True)
    if not enable_after:
        _enable(model, gc)
    with fp.patched(model, {"layers.1.resid_post": bank}):
        if enable_after:
            _enable(model, gc)
        counts = _step(model, ids, proj)
    grads = _grads(model)
    model.gradient_checkpointing_disable()
    return counts, grads, {n: getattr(bank, n).grad[0] for n in ("down", "bias", "up")}


# the families of issue #18 (MoE, Granite, LayerNorm pre-LN, OLMo 2, parallel blocks): slow
NEW_ARCHS = ("phi3", "qwen2_moe", "qwen3_moe", "mixtral", "granite", "stablelm", "starcoder2", "olmo", "olmo2",
             "gpt_neox", "cohere", "gptj", "falcon", "phi")


@pytest.mark.parametrize("arch", ["llama", "gpt2", *(pytest.param(a, marks=pytest.mark.slow) for a in NEW_ARCHS)])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("enable_after", [False, True], ids=["enable-then-apply", "apply-then-enable"])
def test_same_layers_recomputed_and_same_grads_as_plain_model(arch, reentrant, enable_after):
    model = _model(arch)
    D = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    oracle = Oracle(D)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, S), generator=g)
    proj = torch.randn(B, S, model.config.vocab_size, generator=g)

    plain_off, _ = _run_plain(model, oracle, None, ids, proj)
    oracle.A.grad = oracle.B.grad = oracle.bias.grad = None
    plain_on, ref = _run_plain(model, oracle, reentrant, ids, proj)
    ref_patch = oracle.grads()
    ours_off, _, _ = _run_fastpatch(model, oracle, None, ids, proj, enable_after)
    ours_on, ours, ours_patch = _run_fastpatch(model, oracle, reentrant, ids, proj, enable_after)

    plain_recomputed = [on - off for on, off in zip(plain_on, plain_off)]
    ours_recomputed = [on - off for on, off in zip(ours_on, ours_off)]
    # the oracle itself: every layer's products run again in backward (transformers checkpoints them)
    assert all(n > 0 for n in plain_recomputed), (transformers.__version__, plain_on, plain_off)
    assert ours_recomputed == plain_recomputed, (
        f"transformers {transformers.__version__}, mechanism {mechanism(type(_layers(model)[0]))!r}: "
        f"products recomputed per layer, fastpatch {ours_recomputed} vs plain model {plain_recomputed}")
    assert ours.keys() == ref.keys(), ours.keys() ^ ref.keys()
    what = f"{arch} use_reentrant={reentrant} transformers {transformers.__version__}"
    for n in ref:
        _close(ours[n], ref[n], 1e-5, f"{what}: {n}")
    for n in ref_patch:
        _close(ours_patch[n], ref_patch[n], 1e-5, f"{what}: patch {n}")


def test_recompute_check_leaves_no_trace():
    """The check run at apply (checkpointing on) touches no .grad, requires_grad, mode or counter."""
    model = _model("llama")
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.eval()
    _layers(model)[2].train()  # a mix of modes, restored exactly
    before_modes = [m.training for m in model.modules()]
    model.lm_head.weight.requires_grad_(False)
    before_req = [p.requires_grad for p in model.parameters()]
    D = model.config.hidden_size
    bank = ag.TrainableBank([Oracle(D).patch], D)
    with fp.patched(model, {"layers.1.resid_post": bank}) as handle:
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is None for p in bank.parameters())
        assert [m.training for m in model.modules()] == before_modes
        assert [p.requires_grad for p in model.parameters()] == before_req
        assert handle.fusion_stats()["hits"] == 0 and handle.fusion_stats()["misses"] == 0
    model.gradient_checkpointing_disable()


def _no_recompute(function, *args, **kwargs):
    """A checkpoint function that runs the layer once and keeps its activations: what fastpatch under a
    checkpointing mechanism it does not handle amounts to (5.24's class wrapper, shadowed)."""
    return function(*args, **kwargs)


def _break_checkpointing(model):
    for layer in _layers(model):
        layer._gradient_checkpointing_func = _no_recompute


def test_not_recomputed_refused_at_apply_naming_class_and_version():
    model = _model("llama")
    model.gradient_checkpointing_enable({"use_reentrant": False})
    _break_checkpointing(model)
    D = model.config.hidden_size
    with pytest.raises(CheckpointingMismatchError) as err:
        fp.apply(model, {"layers.1.resid_post": fp.Steer(torch.ones(D))})
    msg = str(err.value)
    assert "LlamaDecoderLayer" in msg and transformers.__version__ in msg and "fallback='hooks'" in msg
    assert "ran 1 time(s) in forward and 0 in backward" in msg
    assert "forward" not in model.model.layers[0].__dict__  # atomic: nothing left installed
    with pytest.warns(RuntimeWarning, match="falling back to hooks.*LlamaDecoderLayer"):
        handle = fp.apply(model, {"layers.1.resid_post": fp.Steer(torch.ones(D))}, fallback="hooks")
    assert handle.implementation == "hooks"
    handle.remove()


def test_not_recomputed_refused_at_first_training_forward():
    model = _model("llama")
    D = model.config.hidden_size
    ids = torch.randint(0, 128, (B, S))
    with fp.patched(model, {"layers.1.resid_post": fp.Steer(torch.ones(D))}):
        model(ids, use_cache=False).logits.sum().backward()  # checkpointing off: nothing to check
        model.gradient_checkpointing_enable({"use_reentrant": True})
        _break_checkpointing(model)
        with torch.no_grad():  # no backward, nothing to recompute: not checked yet
            model(ids, use_cache=False)
        with pytest.raises(CheckpointingMismatchError, match="LlamaDecoderLayer.*" + transformers.__version__):
            model(ids, use_cache=False)
        with pytest.raises(CheckpointingMismatchError):  # and again: never trains silently
            model(ids, use_cache=False)
        model.gradient_checkpointing_enable({"use_reentrant": True})  # transformers' function again
        loss = model(ids, use_cache=False).logits.sum()
        with LayerProducts(model) as count:
            loss.backward()
        assert all(n > 0 for n in count.counts[:L]), count.counts
    model.gradient_checkpointing_disable()


def test_unknown_mechanism_is_checked_by_running(monkeypatch):
    """A layer class whose mechanism fastpatch does not recognise gets no checkpointing of fastpatch's
    own: under 5.19's ``__call__`` it is still recomputed (accepted); under 5.24's class-forward wrapper
    it is not (refused, naming the mechanism)."""
    model = _model("llama")
    real = mechanism(type(model.model.layers[0]))
    assert real in ("call", "forward"), f"transformers {transformers.__version__}: {real}"
    monkeypatch.setattr(fused, "mechanism", lambda cls: "unknown")
    model.gradient_checkpointing_enable({"use_reentrant": False})
    D = model.config.hidden_size
    patches = {"layers.1.resid_post": fp.Steer(torch.ones(D))}
    if real == "forward":
        with pytest.raises(CheckpointingMismatchError, match="0 in backward"):
            fp.apply(model, patches)
    else:
        with fp.patched(model, patches):
            loss = model(torch.randint(0, 128, (B, S)), use_cache=False).logits.sum()
            with LayerProducts(model) as count:
                loss.backward()
        assert all(n > 0 for n in count.counts), count.counts
    model.gradient_checkpointing_disable()


def test_verify_false_warns_for_unknown_mechanism(monkeypatch):
    from fastpatch.integrations.hf import checkpointing

    model = _model("llama")
    monkeypatch.setattr(checkpointing, "mechanism", lambda cls: "unknown")
    with pytest.warns(RuntimeWarning, match="LlamaDecoderLayer.*verify=False"):
        fp.apply(model, {}, verify=False).remove()
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fp.apply(model, {}, verify=False).remove()
