"""Which modules of a transformers model hold each site, per architecture (the site names themselves
are defined in :mod:`fastpatch.core.sites`).

Post-LN models (BERT): ``resid_mid`` / ``resid_post`` are the sums inside the attention-output and
output LayerNorms, ``layers.0.resid_pre`` the embeddings' sum inside the embedding LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...core.errors import UnsupportedModelError  # re-exported: importable from here as before
from ...core.sites import parse_site
from .arch import ArchSpec, get_path
from .arch import bert as _bert
from .arch import gemma as _gemma
from .arch import gpt2 as _gpt2
from .arch import granite as _granite
from .arch import layernorm as _layernorm
from .arch import llama as _llama
from .arch import moe as _moe
from .arch import olmo2 as _olmo2
from .arch import parallel as _parallel
from .arch import phi3 as _phi3

SPECS: tuple = (_llama.SPEC, _gemma.GEMMA, _gemma.GEMMA2, _gpt2.SPEC, _bert.SPEC,
                _phi3.SPEC, _moe.SPEC, _granite.SPEC, _layernorm.STABLELM, _layernorm.STARCODER2, _layernorm.OLMO)
SPECS += (_olmo2.SPEC,) + _parallel.SPECS  # new block styles (#18): post-branch norms, parallel blocks
SUPPORTED_MODEL_TYPES = tuple(t for s in SPECS for t in s.model_types)



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


_WRAPPERS = {"pyvene": "model", "pyreft": "model", "nnsight": "_module"}


def unwrap(model):
    """The transformers model inside an interpretability wrapper: pyvene's IntervenableModel and
    pyreft's ReftModel (``.model``; they hook the inner model per call), nnsight's NNsight /
    LanguageModel (``._module``). Anything else is returned as is."""
    attr = _WRAPPERS.get(type(model).__module__.split(".")[0])
    if attr is not None:
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def find_spec(model) -> Optional[ArchSpec]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    return None


def config_mismatch(spec: ArchSpec, model) -> Optional[str]:
    """``"attr=value: why"`` for the first ``spec.config_requires`` entry the model's config breaks, else None
    (the hooks path then treats the model as an unknown architecture instead of refusing it)."""
    config = getattr(model, "config", None)
    for attr, want, why in spec.config_requires:
        got = getattr(config, attr, want)
        if got != want:
            return f"{attr}={got!r}: {why}"
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
    mismatch = config_mismatch(spec, model)
    if mismatch is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) has {mismatch}. Use fallback='hooks' (or "
            "fastpatch.hooks.apply) for resid_pre / resid_post sites")
    if spec.resolve is not None:  # the variant this config builds (or a refusal naming the covered ones)
        spec = spec.resolve(spec, model)
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
    firsts = {}
    for block in layers:  # every distinct layer class (a wrapper such as repeng's ControlModule differs)
        firsts.setdefault(type(block), block)
    for block in firsts.values():
        for part in _required_parts(spec):
            try:
                get_path(block, part)
            except AttributeError:
                missing.append(f"{type(block).__name__}.{part}")
    if spec.final_norm is not None:
        try:
            get_path(base, spec.final_norm)
        except AttributeError:
            missing.append(spec.final_norm)
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) lacks {missing}, which the {spec.name} "
            "family has (a layer wrapped by another library, e.g. repeng's ControlModel, looks like this: "
            "apply fastpatch before wrapping); use fallback='hooks'")
    param = next(model.parameters())
    hidden = int(getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd"))
    return ModelInfo(spec, base, layers, len(layers), hidden, param.device, param.dtype)


def _required_parts(spec: ArchSpec) -> list:
    if spec.style == "post":
        return [spec.mid_output + ".LayerNorm", spec.post_output + ".LayerNorm"]
    parts = [p for p in (spec.ln1, spec.attn, spec.ln2, spec.mlp) if p]  # OLMo 2 / parallel: no ln1 or ln2
    parts += [p for p in (spec.post_attn_norm, spec.post_mlp_norm, spec.attn_dropout, spec.mlp_dropout) if p]
    return parts


def site_key(info: ModelInfo, name) -> tuple:
    """:func:`parse_site` for this model: a parallel block (attention and MLP added to the stream in one
    sum) has no ``resid_mid``, so naming one raises, listing the sites the model has."""
    key = parse_site(name, info.num_layers)
    if key[0] == "mid" and info.spec.style == "parallel":
        raise ValueError(
            f"site {name!r}: {info.spec.name} has parallel blocks (attention and MLP read the same input and are "
            f"added to the stream in one sum), so there is no resid_mid; its sites are 'layers.{{i}}.resid_pre' "
            f"and 'layers.{{i}}.resid_post' with 0 <= i < {info.num_layers}")
    return key
