"""Model fingerprints: enough to tell whether a patch file was fitted on this model.

A fingerprint is a small JSON-able dict:

- ``architecture`` (``config.architectures[0]``, else the model's class name), ``model_type``
- ``hidden_size``, ``num_layers``, ``dtype``
- ``config_sha256``: sha256 of the config as sorted JSON, without volatile keys (transformers
  version, dtype, name/path, attention implementation, output flags, private ``_`` keys)
- ``weights_sha256``: sha256 of a few small named tensors (every 1-D parameter, i.e. the norms
  and biases, plus the first row of the first and last 2-D parameters). Values are hashed after
  rounding to bfloat16, so a float32 model and the same model cast to bfloat16 hash alike.

``dtype`` is recorded but does not make two fingerprints differ (patches apply at any dtype);
see :func:`differences`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch

# Config keys that change with the runtime, not with the model.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "dtype", "torch_dtype", "name_or_path", "_name_or_path", "architectures",
    "attn_implementation", "_attn_implementation", "_attn_implementation_internal", "use_cache",
    "return_dict", "output_attentions", "output_hidden_states", "_commit_hash", "quantization_config",
})

# Fields compared by :func:`differences`, in the order a message lists them.
COMPARED_FIELDS = ("architecture", "model_type", "hidden_size", "num_layers", "config_sha256",
                   "weights_sha256")
FIELDS = COMPARED_FIELDS + ("dtype",)


def _first_attr(obj: Any, names: tuple) -> Optional[int]:
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _config_dict(config: Any) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: v for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}


def config_sha256(config: Any) -> str:
    text = json.dumps(_config_dict(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of a few small named tensors' bytes (cheap even for large models)."""
    params = list(model.named_parameters())
    picked = [(n, p) for n, p in params if p.dim() == 1]
    matrices = [(n, p) for n, p in params if p.dim() == 2]
    if matrices:
        picked.append((matrices[0][0] + "[0]", matrices[0][1][0]))
        picked.append((matrices[-1][0] + "[0]", matrices[-1][1][0]))
    h = hashlib.sha256()
    for name, t in picked:
        data = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        h.update(name.encode() + b"\0" + str(tuple(t.shape)).encode() + b"\0")
        h.update(data.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: torch.nn.Module) -> dict:
    """The fingerprint dict of a transformers model (see the module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fingerprint: model must be a torch.nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"fingerprint: {type(model).__name__} has no .config (expected a transformers model)")
    archs = getattr(config, "architectures", None) or []
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = None
    return {
        "architecture": archs[0] if archs else type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": _first_attr(config, ("hidden_size", "n_embd", "d_model")),
        "num_layers": _first_attr(config, ("num_hidden_layers", "n_layer", "num_layers")),
        "dtype": dtype,
        "config_sha256": config_sha256(config),
        "weights_sha256": weights_sha256(model),
    }


def as_fingerprint(model_or_fingerprint: Any) -> Optional[dict]:
    """A fingerprint from a model, a fingerprint dict, or None."""
    if model_or_fingerprint is None:
        return None
    if isinstance(model_or_fingerprint, dict):
        missing = [f for f in COMPARED_FIELDS if f not in model_or_fingerprint]
        if missing:
            raise ValueError(f"model fingerprint dict lacks the field(s) {missing}")
        return dict(model_or_fingerprint)
    return fingerprint(model_or_fingerprint)


def differences(expected: dict, actual: dict) -> list:
    """Human-readable lines for each compared field that differs (empty: same model)."""
    out = []
    for f in COMPARED_FIELDS:
        a, b = expected.get(f), actual.get(f)
        if a != b:
            if f.endswith("sha256"):
                a, b = (str(a)[:12] + "…") if a else a, (str(b)[:12] + "…") if b else b
            out.append(f"{f}: file has {a!r}, model has {b!r}")
    return out
