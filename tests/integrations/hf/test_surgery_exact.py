"""fastpatch.apply (fused) equals fastpatch.hooks.apply (plain hooks) for every architecture, patch
kind and site kind; unpatched fused == original; remove() restores the model bit for bit."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import ARCHS, FAST_ARCHS, PARALLEL_ARCHS, tiny_model
from surgery_util import (KINDS, SITE_KINDS, assert_close, forward, greedy, hidden, patch_of, run_with, site)

_MODELS: dict = {}


def model_for(arch, dtype=torch.float32):
    key = (arch, dtype)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, dtype)
    return _MODELS[key]


def arch_params(archs=ARCHS + ("bert",)):
    fast = set(FAST_ARCHS) | {"bert"}
    return [a if a in fast else pytest.param(a, marks=pytest.mark.slow) for a in archs]


def batch_for(arch, B=2, S=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 128, (B, S), generator=g)}


@pytest.mark.parametrize("arch", arch_params())
def test_unpatched_fused_equals_original_and_remove_restores(arch):
    model = model_for(arch)
    batch = batch_for(arch)
    modules = {n: m for n, m in model.named_modules()}
    ref = forward(model, **batch)
    handle = fp.apply(model, {})
    fused = forward(model, **batch)
    assert_close(fused, ref, 1e-5, "unpatched fused vs original")
    handle.remove()
    after = forward(model, **batch)
    assert torch.equal(after, ref)
    assert {n: m for n, m in model.named_modules()} == modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def arch_site_params():
    """(arch, site kind) pairs; parallel blocks have no resid_mid (its refusal: test_arch_parallel.py)."""
    fast = set(FAST_ARCHS) | {"bert"}
    return [pytest.param(a, sk, marks=() if a in fast else pytest.mark.slow) for a in ARCHS + ("bert",)
            for sk in SITE_KINDS if not (sk == "resid_mid" and a in PARALLEL_ARCHS)]


@pytest.mark.parametrize("arch,site_kind", arch_site_params())
def test_fused_equals_hooks_every_kind(arch, site_kind):
    model = model_for(arch)
    batch = batch_for(arch)
    D = hidden(model)
    ref = forward(model, **batch)
    for i, kind in enumerate(KINDS):
        patches = {site(site_kind, model): patch_of(kind, D, seed=i)}
        a = run_with(model, "hooks", patches, lambda: forward(model, **batch))
        b = run_with(model, "fused", patches, lambda: forward(model, **batch))
        assert_close(b, a, 1e-4, f"{arch} {site_kind} {kind}")
        if kind in ("steer", "lowrank", "loreft"):
            assert (a - ref).abs().max() > 1e-3, "the patch should change the output"
    assert torch.equal(forward(model, **batch), ref)


@pytest.mark.parametrize("arch", arch_params(ARCHS))
def test_generate_token_identical_fp32(arch):
    model = model_for(arch)
    D = hidden(model)
    L = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layer
    ids = batch_for(arch, B=2, S=6, seed=3)["input_ids"]
    patches = {f"layers.{L - 1}.resid_mid": patch_of("steer", D, 1), "layers.0.resid_post": patch_of("lowrank", D, 2),
               "layers.0.resid_pre": patch_of("ablate", D, 3)}
    if arch in PARALLEL_ARCHS:  # no resid_mid: the steer goes to the last layer's output instead
        patches[f"layers.{L - 1}.resid_post"] = patches.pop(f"layers.{L - 1}.resid_mid")
    plain = greedy(model, ids)
    a = run_with(model, "hooks", patches, lambda: greedy(model, ids))
    b = run_with(model, "fused", patches, lambda: greedy(model, ids))
    assert torch.equal(a, b)
    assert not torch.equal(a, plain), "patches should change the greedy generation"
    assert torch.equal(greedy(model, ids), plain)


BF16_RTOL = 3e-2  # documented in docs/surgery.md: bf16 rounds the residual stream at different points


@pytest.mark.parametrize("arch", arch_params(("llama", "gemma2", "gpt2", "bert", "gemma", "qwen3")))
def test_bf16_within_tolerance(arch):
    model = model_for(arch, torch.bfloat16)
    batch = batch_for(arch)
    D = hidden(model)
    for i, kind in enumerate(("steer", "lowrank", "gated")):
        for sk in SITE_KINDS:
            patches = {site(sk, model): patch_of(kind, D, seed=i)}
            a = run_with(model, "hooks", patches, lambda: forward(model, **batch))
            b = run_with(model, "fused", patches, lambda: forward(model, **batch))
            assert_close(b, a, BF16_RTOL, f"bf16 {arch} {sk} {kind}")


def test_every_layer_every_site_llama():
    model = model_for("llama")
    D = hidden(model)
    batch = batch_for("llama")
    patches = {}
    for i in range(2):
        patches[f"layers.{i}.resid_mid"] = patch_of("clamp", D, 10 + i)
        patches[f"layers.{i}.resid_post"] = patch_of("loreft", D, 20 + i)
    patches["layers.0.resid_pre"] = patch_of("gated", D, 30)
    a = run_with(model, "hooks", patches, lambda: forward(model, **batch))
    b = run_with(model, "fused", patches, lambda: forward(model, **batch))
    assert_close(b, a, 1e-4, "all sites")
