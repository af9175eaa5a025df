"""Site names → points of the residual stream, per architecture.

Site names (``L`` layers, ``0 <= i < L``):

- ``layers.{i}.resid_pre``: the stream entering layer ``i``. For ``i > 0`` it is the same point as
  ``layers.{i-1}.resid_post`` (both names map to one key; naming both is an error).
- ``layers.{i}.resid_mid``: the sum after the attention block's residual add.
- ``layers.{i}.resid_post``: the sum after the MLP's residual add (the last layer's is fused into the
  final norm).

Post-LN models (BERT): ``resid_mid`` / ``resid_post`` are the sums inside the attention-output and
output LayerNorms, ``layers.0.resid_pre`` the embeddings' sum inside the embedding LayerNorm.

A key is ``("pre", 0)``, ``("mid", i)`` or ``("post", i)``; ``order(key)`` sorts keys in the order a
forward pass reaches them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .arch import ArchSpec, get_path
from .arch import bert as _bert
from .arch import gemma as _gemma
from .arch import gpt2 as _gpt2
from .arch import llama as _llama

SPECS: tuple = (_llama.SPEC, _gemma.GEMMA, _gemma.GEMMA2, _gpt2.SPEC, _bert.SPEC)
SUPPORTED_MODEL_TYPES = tuple(t for s in SPECS for t in s.model_types)

_SITE = re.compile(r"^(?:model\.)?layers\.(-?\d+)\.(resid_pre|resid_mid|resid_post)$")
SITE_KINDS = ("resid_pre", "resid_mid", "resid_post")


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelInfo:
    spec: ArchSpec
    base: torch.nn.Module
    layers: list
    num_layers: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype

    def final_norm(self):
        return None if self.spec.final_norm is None else get_path(self.base, self.spec.final_norm)


def find_spec(model) -> Optional[ArchSpec]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    return None


def model_info(model, spec: Optional[ArchSpec] = None) -> ModelInfo:
    """The architecture spec and the parts of ``model`` surgery needs; raises UnsupportedModelError."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    spec = spec or find_spec(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec is None:
        raise UnsupportedModelError(
            f"fastpatch surgery does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}. Use fallback='hooks' (or fastpatch.hooks.apply) "
            "for other architectures")
    base = getattr(model, "base_model", model)
    try:
        layers = list(get_path(base, spec.layers))
    except AttributeError as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) lacks the expected module "
            f"'{spec.layers}' of the {spec.name} family: {exc}") from exc
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no layers")
    missing = []
    for part in _required_parts(spec):
        try:
            get_path(layers[0], part)
        except AttributeError:
            missing.append(part)
    if spec.final_norm is not None:
        try:
            get_path(base, spec.final_norm)
        except AttributeError:
            missing.append(spec.final_norm)
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) lacks {missing}, which the {spec.name} "
            "family has; use fallback='hooks'")
    param = next(model.parameters())
    hidden = int(getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd"))
    return ModelInfo(spec, base, layers, len(layers), hidden, param.device, param.dtype)


def _required_parts(spec: ArchSpec) -> list:
    if spec.style == "post":
        return [spec.mid_output + ".LayerNorm", spec.post_output + ".LayerNorm"]
    parts = [spec.ln1, spec.attn, spec.ln2, spec.mlp]
    parts += [p for p in (spec.post_attn_norm, spec.post_mlp_norm) if p]
    return parts


def parse_site(name, num_layers: int) -> tuple:
    """Site name → key; clear errors for unknown names and out-of-range layers."""
    if not isinstance(name, str):
        raise TypeError(f"site names are strings like 'layers.3.resid_post', got {name!r}")
    m = _SITE.match(name.strip())
    if not m:
        raise ValueError(f"unknown site {name!r}: sites are 'layers.{{i}}.resid_pre', 'layers.{{i}}.resid_mid' "
                         f"or 'layers.{{i}}.resid_post' with 0 <= i < {num_layers}")
    i, kind = int(m.group(1)), m.group(2)
    if not 0 <= i < num_layers:
        raise ValueError(f"site {name!r}: layer {i} is out of range; the model has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    if kind == "resid_pre":
        return ("pre", 0) if i == 0 else ("post", i - 1)
    return ("mid", i) if kind == "resid_mid" else ("post", i)


def order(key: tuple) -> int:
    kind, i = key
    return 0 if kind == "pre" else (2 * i + 1 if kind == "mid" else 2 * i + 2)


def site_name(key: tuple) -> str:
    kind, i = key
    return "layers.0.resid_pre" if kind == "pre" else f"layers.{i}.resid_{kind}"


def all_sites(num_layers: int) -> list:
    """Every distinct site name of a model with ``num_layers`` layers, in forward order."""
    return ["layers.0.resid_pre"] + [f"layers.{i}.resid_{k}" for i in range(num_layers) for k in ("mid", "post")]
