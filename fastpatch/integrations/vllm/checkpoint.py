"""The fingerprint of the model a vLLM engine serves, computed from its checkpoint folder.

vLLM renames and fuses parameters (qkv_proj, gate_up_proj), so the hash of :func:`fastpatch.fingerprint`
is taken from the checkpoint itself: the Hugging Face model's parameter names and order come from a
weightless (meta-device) instance, their values from the safetensors files. It matches what
``fastpatch.fingerprint(hf_model)`` records in a patch file fitted on the same checkpoint.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ...files.fingerprint import config_sha256, weights_sha256

logger = logging.getLogger("fastpatch.vllm")


class _Checkpoint:
    """named_parameters() of the HF model, read lazily from safetensors (duck-types a module for hashing)."""

    def __init__(self, folder: Path, names: list):
        self.folder, self.names = folder, names

    def _files(self) -> dict:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: self.folder / v for k, v in weight_map.items()}
        single = self.folder / "model.safetensors"
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}

    def named_parameters(self):
        from safetensors import safe_open

        files = self._files()
        # Only what weights_sha256 reads: every 1-D tensor and the first and last 2-D ones.
        dims = [(n, d) for n, d in self.names]
        mats = [n for n, d in dims if d == 2]
        wanted = {n for n, d in dims if d == 1} | ({mats[0], mats[-1]} if mats else set())
        handles = {}
        try:
            for name, d in dims:
                if name not in wanted:
                    yield name, torch.empty((0,) * d)
                    continue
                path = files.get(name)
                if path is None:
                    raise KeyError(name)
                f = handles.get(path)
                if f is None:
                    f = handles[path] = safe_open(str(path), "pt")
                yield name, f.get_tensor(name)
        finally:
            handles.clear()


def model_fingerprint(model_config) -> dict:
    """fastpatch's fingerprint dict of the engine's model (weights hash None if it cannot be read)."""
    hf = model_config.hf_config
    archs = getattr(hf, "architectures", None) or []
    fp = {
        "architecture": archs[0] if archs else None,
        "model_type": getattr(hf, "model_type", None),
        "hidden_size": getattr(hf, "hidden_size", None),
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "dtype": str(model_config.dtype).replace("torch.", ""),
        "config_sha256": config_sha256(hf),
        "weights_sha256": _weights_hash(Path(model_config.model), hf),
    }
    return fp


def _weights_hash(folder: Path, hf) -> Optional[str]:
    if not folder.is_dir():
        return None
    try:
        import transformers as tf

        with torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(hf)
        names = [(n, p.dim()) for n, p in meta.named_parameters()]
        return weights_sha256(_Checkpoint(folder, names))
    except Exception as exc:  # a checkpoint layout we cannot map: the config hash still applies
        logger.warning("fastpatch: cannot hash the weights of %s (%s); patch files are checked by config only",
                       folder, exc)
        return None
