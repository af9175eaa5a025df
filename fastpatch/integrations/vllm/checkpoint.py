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

    def __init__(self, folder: Path, names: list, meta=None):
        self.folder, self.names, self.meta = folder, names, meta

    def _renamed(self, files: dict) -> dict:
        """{name in the model: (key in the file, file)} through transformers' load-time renamings (5.x loads
        GPT-NeoX's ``embed_out`` as ``lm_head``): the names in the model are not always the file's keys."""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key

            transforms = get_model_conversion_mapping(self.meta)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
            out = {}
            for key, path in files.items():
                out.setdefault(rename_source_key(key, renamings, converters)[0], (key, path))
            return out
        except Exception:  # noqa: BLE001 - no renaming API here: the missing name stays a KeyError below
            return {}

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
        renamed = None
        try:
            for name, d in dims:
                if name not in wanted:
                    yield name, torch.empty((0,) * d)
                    continue
                key, path = name, files.get(name)
                if path is None:
                    if renamed is None:
                        renamed = self._renamed(files)
                    key, path = renamed.get(name, (name, None))
                if path is None:
                    raise KeyError(name)
                f = handles.get(path)
                if f is None:
                    f = handles[path] = safe_open(str(path), "pt")
                yield name, f.get_tensor(key)
        finally:
            handles.clear()


def model_fingerprint(model_config) -> dict:
    """fastpatch's fingerprint dict of the engine's model (weights hash None if it cannot be read)."""
    hf = _checkpoint_config(model_config)
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


def _checkpoint_config(model_config):
    """The config as Hugging Face loads it from the checkpoint: vLLM normalises some fields of its
    ``hf_config`` (Qwen2-MoE's ``sliding_window`` 0 becomes None), which would change the config hash."""
    try:
        import transformers as tf

        folder = Path(model_config.model)
        if folder.is_dir():
            return tf.AutoConfig.from_pretrained(str(folder), trust_remote_code=bool(
                getattr(model_config, "trust_remote_code", False)))
    except Exception as exc:  # noqa: BLE001 - vLLM loaded it; its own copy is the next best
        logger.warning("fastpatch: cannot read the config of %s (%s); hashing vLLM's copy", model_config.model, exc)
    return model_config.hf_config


def _weights_hash(folder: Path, hf) -> Optional[str]:
    if not folder.is_dir():
        return None
    try:
        import transformers as tf

        with torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(hf)
        names = [(n, p.dim()) for n, p in meta.named_parameters()]
        return weights_sha256(_Checkpoint(folder, names, meta))
    except Exception as exc:  # a checkpoint layout we cannot map: the config hash still applies
        logger.warning("fastpatch: cannot hash the weights of %s (%s); patch files are checked by config only",
                       folder, exc)
        return None
