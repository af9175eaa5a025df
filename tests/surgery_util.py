"""Helpers shared by the surgery tests."""
from __future__ import annotations

import torch

import fastpatch as fp
from casegen import make_patch

KINDS = ("steer", "ablate", "clamp", "lowrank", "loreft", "gated")
SITE_KINDS = ("resid_pre", "resid_mid", "resid_post")


def hidden(model) -> int:
    c = model.config
    return int(getattr(c, "hidden_size", None) or c.n_embd)


def layers(model) -> int:
    c = model.config
    return int(getattr(c, "num_hidden_layers", None) or c.n_layer)


def patch_of(kind: str, D: int, seed: int = 0, gate_condition=None):
    g = torch.Generator().manual_seed(seed)
    if kind == "gated":
        inner = make_patch("steer", D, g)
        c = torch.randn(D, generator=g, dtype=torch.float64) if gate_condition is None else gate_condition
        return fp.Gated(inner, c, threshold=0.0)
    p = make_patch(kind, D, g)
    if kind == "steer":  # large enough to change greedy tokens
        return fp.Steer(p.v, scale=3.0)
    return p


def site(kind: str, model) -> str:
    L = layers(model)
    return {"resid_pre": "layers.0.resid_pre", "resid_mid": f"layers.{L - 1}.resid_mid",
            "resid_post": f"layers.{L - 1}.resid_post"}[kind]


def out_of(model, out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def forward(model, **batch):
    return out_of(model, model(**batch)).float()


def assert_close(a, b, rtol, what=""):
    scale = b.abs().max().clamp_min(1e-6)
    err = (a.float() - b.float()).abs().max()
    assert err <= rtol * scale, f"{what}: max |diff| {err.item():.3g} > {rtol} x max |ref| {scale.item():.3g}"


def run_with(model, impl, patches, fn, select=None, **kw):
    apply = fp.apply if impl == "fused" else fp.hooks.apply
    h = apply(model, patches, **kw)
    try:
        if select is not None:
            h.select(select)
        return fn()
    finally:
        h.remove()


@torch.no_grad()
def greedy(model, input_ids, attention_mask=None, n=32):
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[:, input_ids.shape[1]:]
