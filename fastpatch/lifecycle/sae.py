"""Sparse autoencoders as patches (``fastpatch.sae``): load an SAELens folder or a Gemma Scope ``params.npz``
and turn feature edits (clamp / ablate / scale / steer) into ordinary fastpatch patches.

The maths, the file formats and the patch building live in fastpatch/files/sae_file.py (files-layer work,
which the vLLM plugin also uses; its docstring has the formulas). This module adds what reads a Hugging Face
model: ``check(model)`` and ``top()`` (``fastpatch.hooks.record``), so it sits in lifecycle, the first layer
that may use both.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..files import sae_file
from ..files.sae_file import ARCHITECTURES, SAEError, site_of_hook  # noqa: F401 (fastpatch.sae.ARCHITECTURES)
from ..integrations.hf import UnsupportedModelError, model_info
from ..integrations.hf import hooks as hf_hooks

__all__ = ["SAE", "SAEError", "load", "site_of_hook"]


class SAE(sae_file.SAE):
    """One SAE at one residual site: its weights (float32, CPU) and the patches it makes.

    ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in],
    ``threshold`` [d_sae] (jumprelu only), ``k`` (topk only).
    """

    def check(self, model) -> None:
        """Raise SAEError unless the model has this SAE's site and its hidden size is the SAE's d_in."""
        if self.site is None:
            raise SAEError(f"{self.source}: the SAE has no site; load it with site='layers.N.resid_post'")
        try:
            info = model_info(model)
            layers, hidden = info.num_layers, info.hidden_size
        except UnsupportedModelError:
            cfg = getattr(model, "config", None)
            layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
            hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
            if layers is None or hidden is None:
                raise
        self.check_dims(int(layers), int(hidden))

    @torch.no_grad()
    def top(self, model, tokenizer, prompt: str, k: int = 10) -> list:
        """The ``k`` most active features per token of ``prompt`` at the SAE's site.

        Returns one ``(token, [(feature, activation), ...])`` per token, most active first (features
        with activation 0 left out).
        """
        self.check(model)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"top: k must be a positive int, got {k!r}")
        dev = next(model.parameters()).device
        enc = tokenizer(prompt, return_tensors="pt")
        ids = enc["input_ids"].to(dev)
        kwargs = {"attention_mask": enc["attention_mask"].to(dev)} if "attention_mask" in enc else {}
        with hf_hooks.record(model, [self.site]) as acts:
            model(input_ids=ids, **kwargs)
        f = self.encode(acts[self.site][0]).cpu()  # [T, d_sae]
        vals, idx = f.topk(min(k, self.d_sae), dim=-1)
        out = []
        for t, tok in enumerate(ids[0].tolist()):
            feats = [(int(i), float(v)) for i, v in zip(idx[t].tolist(), vals[t].tolist()) if v > 0]
            out.append((tokenizer.decode([tok]), feats))
        return out


def load(path, *, site: Optional[str] = None) -> SAE:
    """An SAE from an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or a Gemma Scope
    ``params.npz`` (a file, or a folder holding one; ``site=`` required). ``site=`` overrides the site
    read from the SAELens config's hook name."""
    return sae_file.load(path, site=site, cls=SAE)
