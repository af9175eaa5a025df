"""llama.cpp / repeng control vectors (GGUF) ↔ fastpatch steering patches.

A control-vector file is a GGUF with ``general.architecture = "controlvector"``, metadata
``controlvector.model_hint`` (a string) and ``controlvector.layer_count`` (an integer), and one
float32 tensor ``direction.{N}`` of shape [D] per steered layer.

Layer convention (llama.cpp, ``common/common.cpp`` ``common_control_vector_load_one`` and
``src/llama-adapter.cpp`` ``llama_control_vector_apply``, checked against the sources):

- the loader rejects ``direction.0`` ("invalid (zero) direction tensor layer index") and stores
  ``direction.N`` at ``data[(N - 1) * n_embd]``;
- ``llama_control_vector_apply`` copies ``data[(il - 1) * n_embd]`` into ``tensors[il]`` for
  ``il = 1 .. n_layer - 1`` (there is never a tensor for layer 0);
- every model graph ends layer ``il`` (0-based) with ``cur = build_cvec(cur, il)`` right after
  the FFN residual add, i.e. it adds ``tensors[il]`` to that layer's output at every position.

So ``direction.N`` is added to the output of 0-based layer N, which is fastpatch's
``layers.N.resid_post`` (the same point as ``layers.{N+1}.resid_pre``), with N ≥ 1: the output of
layer 0 cannot be steered by a llama.cpp control vector. The vector is stored already scaled
(llama.cpp multiplies it by the user's strength at load time).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch

from .patch_file import PatchFileError
from ..core.patches import CanonicalPatch, Gated, Patch, Steer
from ..core.scope import Scoped
from ..core.sites import split_site

ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
_DIRECTION = re.compile(r"^direction\.(\d+)$")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a test dependency
        raise ImportError("GGUF control vectors need the gguf package: pip install 'fastpatch[gguf]'") from None
    return gguf


def direction_index(site: str) -> int:
    """The ``direction.{N}`` index of a fastpatch site (ValueError if llama.cpp cannot steer it)."""
    parts = split_site(site)
    if parts is None or site.startswith("model."):
        raise ValueError(f"unknown site {site!r}; sites are 'layers.{{i}}.resid_pre|resid_mid|resid_post'")
    i, where = parts
    if where == "resid_mid":
        raise ValueError(f"site {site!r}: llama.cpp control vectors act only on layer outputs "
                         "(resid_post), not between attention and MLP")
    n = i if where == "resid_post" else i - 1  # layers.{i}.resid_pre is layer i-1's output
    if n < 1:
        raise ValueError(f"site {site!r}: llama.cpp cannot steer the embeddings or layer 0's output "
                         "(its loader rejects direction.0); use layers.N.resid_post with N >= 1")
    return n


def site_for_direction(n: int) -> str:
    return f"layers.{n}.resid_post"


def _steering_vector(site: str, value) -> Optional[torch.Tensor]:
    """float64 δ of a steering-only site value, or None for an empty site."""
    if isinstance(value, Scoped):
        if str(value.scope) != "all":
            raise ValueError(f"site {site!r}: scope {str(value.scope)!r} cannot be exported; llama.cpp "
                             "applies control vectors at every position (scope 'all')")
        value = value.patch
    if value is None:
        return None
    if isinstance(value, Gated) or (isinstance(value, CanonicalPatch) and value.gate is not None):
        raise ValueError(f"site {site!r}: gated patches cannot be exported; control vectors have no gate")
    if isinstance(value, Steer):
        return value.v.to(torch.float64) * value.scale
    if isinstance(value, (Patch, CanonicalPatch)):
        c = value.canonical()
        if c.rank == 0 and c.gate is None:  # e.g. a composition of steering patches
            return c.shift.to(torch.float64)
        if not c.is_identity:
            raise ValueError(f"site {site!r}: a {c.kind} patch with a {c.activation!r} activation (rank {c.rank}) "
                             "cannot be exported: a control vector adds one constant vector per layer, with no "
                             "encoder and no activation; keep it in a fastpatch file (fastpatch.save)")
        raise ValueError(f"site {site!r}: a {c.kind} patch (rank {c.rank}) is not a steering vector; only "
                         "steering-only patch sets can be exported to GGUF")
    raise ValueError(f"site {site!r}: a {type(value).__name__} cannot be exported; control vectors hold one "
                     "steering vector per layer (no lists or banks)")


def export_gguf(patches: dict, path, *, model_hint: str = "", scale: float = 1.0) -> Path:
    """Write a steering-only {site: Steer} mapping as a llama.cpp control vector (see the module doc).

    The file holds ``scale * v * patch.scale`` in float32 for each site as ``direction.{N}``.
    """
    if not isinstance(patches, dict):
        raise TypeError(f"export_gguf: patches must be a dict of site -> patch, got {type(patches).__name__}")
    if not isinstance(model_hint, str):
        raise TypeError(f"export_gguf: model_hint must be a string, got {type(model_hint).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"export_gguf: scale must be a finite number, got {scale!r}")
    directions: dict = {}
    for site, value in patches.items():
        vec = _steering_vector(site, value)
        if vec is None:
            continue
        n = direction_index(site)
        if n in directions:
            raise ValueError(f"site {site!r}: layer {n}'s output is steered twice (resid_post of layer {n} "
                             f"and resid_pre of layer {n + 1} are the same point)")
        directions[n] = (vec * float(scale)).to(torch.float32)
    if not directions:
        raise ValueError("export_gguf: no steering vectors to export")
    sizes = {int(v.shape[0]) for v in directions.values()}
    if len(sizes) != 1:
        raise ValueError(f"export_gguf: steering vectors have different sizes {sorted(sizes)}")
    for n, v in directions.items():
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"export_gguf: direction.{n} overflows float32 (scale too large?)")
    gguf = _gguf()
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(KEY_MODEL_HINT, model_hint)
    writer.add_uint32(KEY_LAYER_COUNT, len(directions))  # repeng's convention: number of directions
    for n in sorted(directions):
        writer.add_tensor(f"direction.{n}", directions[n].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_gguf(path) -> dict:
    """{"model_hint", "layer_count", "directions": {N: float32 tensor}} with llama.cpp's checks."""
    gguf = _gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/IndexError/... on broken files
        raise PatchFileError(f"{path}: not a readable GGUF file: {exc}") from None

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception as exc:
            raise PatchFileError(f"{path}: unreadable metadata {name!r}: {exc}") from None

    arch = field("general.architecture")
    if arch != ARCH:
        raise PatchFileError(f"{path}: general.architecture is {arch!r}, expected {ARCH!r} (not a control vector)")
    hint = field(KEY_MODEL_HINT)
    count = field(KEY_LAYER_COUNT)
    if hint is not None and not isinstance(hint, str):
        raise PatchFileError(f"{path}: {KEY_MODEL_HINT} must be a string, got {hint!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise PatchFileError(f"{path}: {KEY_LAYER_COUNT} must be an integer, got {count!r}")
    directions: dict = {}
    size = None
    for t in reader.tensors:
        m = _DIRECTION.match(t.name)
        if not m:
            raise PatchFileError(f"{path}: tensor {t.name!r} is not named direction.{{N}}")
        n = int(m.group(1))
        if n == 0:
            raise PatchFileError(f"{path}: direction.0 is invalid (llama.cpp rejects it: layer indices start at 1)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise PatchFileError(f"{path}: {t.name} has type {t.tensor_type.name}, expected F32")
        if len(t.shape) != 1:
            raise PatchFileError(f"{path}: {t.name} has shape {list(t.shape)}, expected 1-D")
        vec = torch.from_numpy(t.data.copy()).to(torch.float32).reshape(-1)
        if size is None:
            size = vec.shape[0]
        elif vec.shape[0] != size:
            raise PatchFileError(f"{path}: {t.name} has {vec.shape[0]} elements, earlier directions {size}")
        if not bool(torch.isfinite(vec).all()):
            raise PatchFileError(f"{path}: {t.name} contains NaN or infinite values")
        if n in directions:
            raise PatchFileError(f"{path}: direction.{n} appears twice")
        directions[n] = vec
    if not directions:
        raise PatchFileError(f"{path}: no direction tensors")
    return {"model_hint": hint, "layer_count": count, "directions": dict(sorted(directions.items()))}


def import_gguf(path, *, scale: float = 1.0, model=None) -> dict:
    """{``layers.N.resid_post``: Steer(direction.N, scale)} from a control-vector GGUF.

    With ``model``, the vectors' size and layer indices are checked against it.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"import_gguf: scale must be a finite number, got {scale!r}")
    info = read_gguf(path)
    if model is not None:
        from .fingerprint import as_fingerprint

        fp = as_fingerprint(model)
        d = next(iter(info["directions"].values())).shape[0]
        if fp.get("hidden_size") not in (None, d):
            raise PatchFileError(f"{path}: directions have {d} elements, "
                                 f"the model's hidden size is {fp['hidden_size']}")
        last = max(info["directions"])
        if isinstance(fp.get("num_layers"), int) and last >= fp["num_layers"]:
            raise PatchFileError(f"{path}: direction.{last} is past the model's {fp['num_layers']} layers")
    return {site_for_direction(n): Steer(v, float(scale)) for n, v in info["directions"].items()}
