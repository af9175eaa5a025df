"""Shared pieces of the governance tests (no tests here): a tiny model's sites, seeded patches, a test clock,
and the plain-hook oracle of a served generation."""
from __future__ import annotations

import torch

import fastpatch

D = 64
SITE0, SITE1 = "layers.0.resid_post", "layers.1.resid_post"
PROMPT = torch.tensor([[5, 17, 33, 2, 90, 41]])
NEW = 4


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def vec(seed, norm=6.0):
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


def patches_of(seed):
    return {"p": {SITE0: fastpatch.Steer(vec(seed)), SITE1: fastpatch.Steer(vec(seed + 500))}}


def hook_oracle(model, patches):
    """Greedy decode logits with plain forward hooks adding each site's vector (no fastpatch engine)."""
    layers = model.model.layers
    hooks = []
    for site, p in patches.items():
        layer = int(site.split(".")[1])
        assert site.endswith("resid_post")
        v = p.v.to(torch.float32) * p.scale
        hooks.append(layers[layer].register_forward_hook(lambda m, a, o, v=v: o + v))
    try:
        return greedy_logits(model)
    finally:
        for h in hooks:
            h.remove()


def greedy_logits(model):
    with torch.no_grad():
        out = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return torch.stack(out.logits)


def steer_file(tmp_path, seed, name="p", site=SITE0):
    """A one-site steering patch file (a random 64-vector, seeded)."""
    v = torch.randn(D, generator=torch.Generator().manual_seed(seed))
    return fastpatch.save({site: fastpatch.Steer(v)}, tmp_path / f"{name}-{seed}.safetensors", name=name)
