"""Patch files: one ``.safetensors`` file per patch set, tensors plus a JSON manifest.

``save(patches, path)`` writes the {site: patch | [patches] | PatchBank | Scoped | None} mapping
that :func:`fastpatch.apply` takes; ``load(path)`` gives the same mapping back (kinds, parameters,
gates, scopes and bank membership preserved, tensors bit-exact in their own dtypes).

The manifest lives in the safetensors header metadata (string values only):

- ``fastpatch.format``          "fastpatch-patch-set"
- ``fastpatch.format_version``  "1"
- ``fastpatch.manifest``        JSON: name, version, created, author, description, model
                                fingerprint, hidden size, payload hash and the sites

Nothing is ever unpickled. Any defect of a file (truncation, bad JSON, missing/extra tensor, wrong
shape, non-finite values, hash mismatch, unknown format version, bad field) raises
:class:`PatchFileError` before anything is returned. The layout is documented in
docs/patch-files.md.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.bank import PatchBank
from ..core.patches import Ablate, CanonicalPatch, Clamp, Encoded, Gate, Gated, LoReFT, LowRank, Patch, Steer
from ..core.scope import Scope, Scoped
from ..core.sites import split_site

FORMAT = "fastpatch-patch-set"
FORMAT_VERSION = 1
KEY_FORMAT = "fastpatch.format"
KEY_FORMAT_VERSION = "fastpatch.format_version"
KEY_MANIFEST = "fastpatch.manifest"

# semver.org's regular expression (MAJOR.MINOR.PATCH[-prerelease][+build]).
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
_CONTAINERS = ("patch", "list", "bank", "none")
_BANK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class PatchFileError(ValueError):
    """A patch file that cannot be read as written (the message names the file and the field)."""


class ModelMismatchError(PatchFileError):
    """The file was fitted on a different model (``load(..., force=True)`` loads it anyway)."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def payload_sha256(tensors: dict) -> str:
    """sha256 over the tensors in name order: name, dtype, shape and raw bytes of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + b"\0" + str(t.dtype).encode() + b"\0" + str(tuple(t.shape)).encode() + b"\0")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_semver(version: Any, what: str = "version") -> str:
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise ValueError(f"{what} must be a semantic version like '1.2.0' (MAJOR.MINOR.PATCH), got {version!r}")
    return version


def _site_layer(site: Any, num_layers: Optional[int], what: str) -> None:
    parts = split_site(site)
    if parts is None or site.strip() != site or site.startswith("model."):
        raise ValueError(f"{what}: unknown site {site!r}; sites are 'layers.{{i}}.resid_pre', "
                         "'layers.{i}.resid_mid' or 'layers.{i}.resid_post'")
    i = parts[0]
    if num_layers is not None and i >= num_layers:
        raise ValueError(f"{what}: site {site!r} is past the model's {num_layers} layers (0..{num_layers - 1})")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _tensor(t: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous, unshared CPU storage; clone keeps the dtype and the bits
    return t.detach().to("cpu").contiguous().clone()


# ---------------------------------------------------------------------------------------------
# save


def _gate_spec(gate_tensor_name: str, threshold: float, metric: str, fire: str) -> dict:
    return {"metric": metric, "fire": fire, "threshold": threshold, "condition": gate_tensor_name}


def _activation_spec(activation: Any):
    """The manifest's "activation": one name, or a list with one name per component."""
    return activation if isinstance(activation, str) else list(activation)


def _encode_patch(p: Any, prefix: str, tensors: dict) -> dict:
    """Manifest entry for one patch; its tensors go into ``tensors`` under ``prefix.*``."""
    def put(field: str, t: torch.Tensor) -> str:
        tensors[f"{prefix}.{field}"] = _tensor(t)
        return f"{prefix}.{field}"

    if isinstance(p, Gated):
        return {"kind": "gated", "params": {},
                "gate": _gate_spec(put("condition", p.condition), p.threshold, p.metric, p.fire),
                "patch": _encode_patch(p.patch, prefix + ".patch", tensors)}
    if isinstance(p, Steer):
        return {"kind": "steer", "params": {"scale": p.scale}, "tensors": {"v": put("v", p.v)}}
    if isinstance(p, Ablate):
        return {"kind": "ablate", "params": {}, "tensors": {"u": put("u", p.u)}}
    if isinstance(p, Clamp):
        return {"kind": "clamp", "params": {"value": p.value}, "tensors": {"u": put("u", p.u)}}
    if isinstance(p, LowRank):
        names = {"A": put("A", p.A), "B": put("B", p.B)}
        if p.bias is not None:
            names["bias"] = put("bias", p.bias)
        return {"kind": "lowrank", "params": {"scale": p.scale}, "tensors": names}
    if isinstance(p, LoReFT):
        return {"kind": "loreft", "params": {},
                "tensors": {"R": put("R", p.R), "W": put("W", p.W), "b": put("b", p.b)}}
    if isinstance(p, Encoded):
        names = {"down": put("down", p.down), "up": put("up", p.up)}
        for f in ("bias", "shift", "threshold"):
            if getattr(p, f) is not None:
                names[f] = put(f, getattr(p, f))
        return {"kind": "encoded", "params": {}, "activation": _activation_spec(p.activation), "tensors": names}
    if isinstance(p, CanonicalPatch):
        try:
            params = json.loads(json.dumps(p.params, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{prefix}: canonical patch params must be JSON numbers/strings/lists: {exc}") from None
        spec = {"kind": "canonical", "canonical_kind": p.kind, "params": params,
                "tensors": {f: put(f, getattr(p, f)) for f in ("down", "bias", "up", "shift")},
                "gate": None}
        if isinstance(params.get("parts"), list):
            spec["parts"] = list(params["parts"])  # composition order, p1 first
        if p.gate is not None:
            g = p.gate
            spec["gate"] = _gate_spec(put("condition", g.condition), g.threshold, g.metric, g.fire)
        if not p.is_identity:
            # Written as kind "encoded" (canonical: true), not "canonical" + a field: a reader from before
            # activations existed refuses the unknown kind instead of applying the patch as if φ were
            # the identity.
            spec.update(kind="encoded", canonical=True, activation=_activation_spec(p.activation))
            if p.threshold is not None:
                spec["tensors"]["threshold"] = put("threshold", p.threshold)
        return spec
    if isinstance(p, Patch):
        raise TypeError(f"{prefix}: cannot save a {type(p).__name__}; patch files hold Steer, Ablate, Clamp, "
                        "LowRank, LoReFT, Encoded, Gated and canonical (e.g. composed) patches")
    raise TypeError(f"{prefix}: expected a fastpatch patch, got {type(p).__name__}")


def _encode_site(site: str, value: Any, tensors: dict) -> dict:
    entry: dict = {"scoped": False, "scope": "all"}
    if type(value).__name__ == "Conditional":
        raise TypeError(f"site {site!r}: cast.Conditional patches cannot be saved (save the behaviour patch "
                        "and rebuild the Condition when loading)")
    if isinstance(value, Scoped):
        entry["scoped"], entry["scope"] = True, str(value.scope)
        value = value.patch
    if value is None:
        entry.update(container="none", patches=[])
    elif isinstance(value, PatchBank):
        entry.update(container="bank", bank_dtype=str(value.dtype).replace("torch.", ""),
                     patches=[_encode_patch(p, f"{site}.{j}", tensors) for j, p in enumerate(value.patches)])
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"site {site!r}: empty patch list")
        entry.update(container="list",
                     patches=[_encode_patch(p, f"{site}.{j}", tensors) for j, p in enumerate(value)])
    else:
        entry.update(container="patch", patches=[_encode_patch(value, f"{site}.0", tensors)])
    return entry


def save(patches: dict, path, *, model=None, name: Optional[str] = None, version: str = "0.1.0",
         author: Optional[str] = None, description: Optional[str] = None) -> Path:
    """Write ``patches`` ({site: patch | [patches] | PatchBank | Scoped | None}) to a .safetensors file.

    ``model``: the model the patches were fitted on (or its :func:`fastpatch.fingerprint` dict);
    recorded so that :func:`load` can refuse a different model. ``name`` defaults to the file
    name's stem; ``version`` must be a semantic version. The file is written atomically.
    """
    from .fingerprint import as_fingerprint

    path = Path(path)
    if not isinstance(patches, dict):
        raise TypeError(f"save: patches must be a dict of site -> patch, got {type(patches).__name__}")
    name = path.stem if name is None else name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"save: name must be a non-empty string, got {name!r}")
    check_semver(version, "save: version")
    for field, v in (("author", author), ("description", description)):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"save: {field} must be a string or None, got {type(v).__name__}")
    fp = as_fingerprint(model)
    num_layers = fp.get("num_layers") if fp else None
    tensors: dict = {}
    sites = {}
    for site, value in patches.items():
        _site_layer(site, num_layers, "save")
        sites[site] = _encode_site(site, value, tensors)
    sizes = sorted({int(_hidden_of(v)) for v in patches.values() if _hidden_of(v) is not None})
    if len(sizes) > 1:
        raise ValueError(f"save: patches have different hidden sizes {sizes}")
    hidden = sizes[0] if sizes else None
    if fp and fp.get("hidden_size") is not None and hidden is not None and hidden != fp["hidden_size"]:
        raise ValueError(f"save: patches have hidden size {hidden}, the model {fp['hidden_size']}")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": name, "version": version, "created": _utc_now(), "author": author,
        "description": description, "fastpatch_version": _fastpatch_version(),
        "hidden_size": hidden, "model": fp, "payload_sha256": payload_sha256(tensors), "sites": sites,
    }
    from safetensors.torch import save as st_save

    blob = st_save(tensors, metadata={KEY_FORMAT: FORMAT, KEY_FORMAT_VERSION: str(FORMAT_VERSION),
                                      KEY_MANIFEST: json.dumps(manifest, allow_nan=False)})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _hidden_of(value: Any) -> Optional[int]:
    if isinstance(value, Scoped):
        value = value.patch
    if value is None:
        return None
    if isinstance(value, PatchBank):
        return value.hidden_size
    if isinstance(value, (list, tuple)):
        return value[0].hidden_size if value else None
    return getattr(value, "hidden_size", None)


def _fastpatch_version() -> str:
    from ..core.version import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# load: container


def read_container(path) -> tuple:
    """(metadata dict, tensors dict) of a safetensors file, with clear errors for broken files."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PatchFileError(f"{path}: cannot read the file: {exc}") from None
    if data[:4] == b"GGUF":
        raise PatchFileError(f"{path}: this is a GGUF file, not a fastpatch .safetensors patch file; "
                             "read control vectors with fastpatch.import_gguf")
    if len(data) < 8:
        raise PatchFileError(f"{path}: truncated file ({len(data)} bytes; not even a safetensors header)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise PatchFileError(f"{path}: truncated file: the header says {n} bytes, the file has {len(data) - 8} "
                             "after the length")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PatchFileError(f"{path}: corrupted safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise PatchFileError(f"{path}: corrupted safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    end = 0
    for tname, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise PatchFileError(f"{path}: corrupted safetensors header entry for tensor {tname!r}") from None
    if 8 + n + end > len(data):
        raise PatchFileError(f"{path}: truncated file: tensor data needs {end} bytes, the file has "
                             f"{len(data) - 8 - n}")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise PatchFileError(f"{path}: corrupted safetensors file: {exc}") from None
    return metadata, tensors


# ---------------------------------------------------------------------------------------------
# load: manifest and patches


class _Reader:
    """Decodes one file's manifest against its tensors; every error names the file and the field."""

    def __init__(self, path: Path, tensors: dict, hidden: Optional[int]):
        self.path = path
        self.tensors = tensors
        self.hidden = hidden
        self.used: set = set()

    def fail(self, where: str, msg: str):
        raise PatchFileError(f"{self.path}: {where}: {msg}")

    def number(self, where: str, obj: dict, key: str) -> float:
        v = obj.get(key) if isinstance(obj, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(where, f"{key!r} must be a finite number, got {v!r}")
        return float(v)

    def choice(self, where: str, obj: dict, key: str, options: tuple) -> str:
        v = obj.get(key)
        if v not in options:
            self.fail(where, f"{key!r} must be one of {options}, got {v!r}")
        return v

    def tensor(self, where: str, name: Any, shape: tuple) -> torch.Tensor:
        """The tensor called ``name``; ``shape`` entries may be None (any) and must agree."""
        if not isinstance(name, str):
            self.fail(where, f"tensor reference must be a string, got {name!r}")
        if name not in self.tensors:
            self.fail(where, f"missing tensor {name!r}")
        t = self.tensors[name]
        if t.dtype not in _FLOAT_DTYPES:
            self.fail(where, f"tensor {name!r} has dtype {t.dtype}, expected a float dtype")
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = tuple("?" if s is None else s for s in shape)
            self.fail(where, f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
        if not bool(torch.isfinite(t).all()):
            self.fail(where, f"tensor {name!r} contains NaN or infinite values")
        self.used.add(name)
        return t

    def activation(self, where: str, spec: dict):
        act = spec.get("activation")
        if isinstance(act, list) and all(isinstance(a, str) for a in act):
            return tuple(act)
        if not isinstance(act, str):
            self.fail(where, f"'activation' must be a name or a list of names, got {act!r}")
        return act  # the constructor checks the names (its error then names this entry)

    def gate(self, where: str, spec: Any) -> tuple:
        if not isinstance(spec, dict):
            self.fail(where, f"gate must be an object, got {spec!r}")
        cond = self.tensor(where + ".gate", spec.get("condition"), (self.hidden,))
        return (cond, self.number(where + ".gate", spec, "threshold"),
                self.choice(where + ".gate", spec, "metric", ("cosine", "projection")),
                self.choice(where + ".gate", spec, "fire", ("above", "below")))

    def patch(self, where: str, spec: Any):
        if not isinstance(spec, dict):
            self.fail(where, f"patch entry must be an object, got {spec!r}")
        kind = spec.get("kind")
        params = spec.get("params", {})
        names = spec.get("tensors", {})
        if not isinstance(params, dict) or not isinstance(names, dict):
            self.fail(where, "'params' and 'tensors' must be objects")
        D = self.hidden
        try:
            if kind == "gated":
                cond, thr, metric, fire = self.gate(where, spec.get("gate"))
                return Gated(self.patch(where + ".patch", spec.get("patch")), cond, thr, metric=metric, fire=fire)
            if kind == "steer":
                return Steer(self.tensor(where, names.get("v"), (D,)), self.number(where, params, "scale"))
            if kind == "ablate":
                return Ablate(self.tensor(where, names.get("u"), (D,)))
            if kind == "clamp":
                return Clamp(self.tensor(where, names.get("u"), (D,)), self.number(where, params, "value"))
            if kind == "lowrank":
                A = self.tensor(where, names.get("A"), (D, None))
                r = A.shape[1]
                B = self.tensor(where, names.get("B"), (r, A.shape[0]))
                bias = self.tensor(where, names["bias"], (r,)) if "bias" in names else None
                return LowRank(A, B, bias=bias, scale=self.number(where, params, "scale"))
            if kind == "loreft":
                R = self.tensor(where, names.get("R"), (None, D))
                r = R.shape[0]
                return LoReFT(R, self.tensor(where, names.get("W"), (r, R.shape[1])),
                              self.tensor(where, names.get("b"), (r,)))
            if kind == "encoded" and not spec.get("canonical", False):
                down = self.tensor(where, names.get("down"), (None, D))
                r = down.shape[0]
                opt = {f: self.tensor(where, names[f], shape) for f, shape in
                       (("bias", (r,)), ("shift", (D,)), ("threshold", (r,))) if f in names}
                return Encoded(down, opt.get("bias"), self.tensor(where, names.get("up"), (r, D)),
                               shift=opt.get("shift"), activation=self.activation(where, spec),
                               threshold=opt.get("threshold"))
            if kind == "canonical" or kind == "encoded":
                down = self.tensor(where, names.get("down"), (None, D))
                r, d = down.shape
                gate = None
                if spec.get("gate") is not None:
                    cond, thr, metric, fire = self.gate(where, spec["gate"])
                    if abs(float(cond.double().norm()) - 1.0) > 1e-6:
                        self.fail(where + ".gate", "canonical gate condition must be a unit vector")
                    gate = Gate(cond, thr, metric, fire)
                ckind = spec.get("canonical_kind", "affine")
                if not isinstance(ckind, str):
                    self.fail(where, f"'canonical_kind' must be a string, got {ckind!r}")
                return CanonicalPatch(down, self.tensor(where, names.get("bias"), (r,)),
                                      self.tensor(where, names.get("up"), (r, d)),
                                      self.tensor(where, names.get("shift"), (d,)),
                                      gate=gate, kind=ckind, params=dict(params),
                                      # files from before activations: no "activation", the identity
                                      activation=self.activation(where, spec) if kind == "encoded" else "identity",
                                      threshold=(self.tensor(where, names["threshold"], (r,))
                                                 if kind == "encoded" and "threshold" in names else None))
        except PatchFileError:
            raise
        except (ValueError, TypeError) as exc:  # a constructor refused the values
            self.fail(where, str(exc))
        self.fail(where, f"unknown patch kind {kind!r}")

    def site(self, site: str, entry: Any):
        where = f"site {site!r}"
        if not isinstance(entry, dict):
            self.fail(where, f"entry must be an object, got {entry!r}")
        container = self.choice(where, entry, "container", _CONTAINERS)
        specs = entry.get("patches")
        if not isinstance(specs, list):
            self.fail(where, "'patches' must be a list")
        try:
            scope = Scope.parse(entry.get("scope", "all"))
        except (TypeError, ValueError) as exc:
            self.fail(where, f"bad scope: {exc}")
        patches = [self.patch(f"{where} patch {j}", s) for j, s in enumerate(specs)]
        if container == "none":
            value = None
        elif container == "patch":
            if len(patches) != 1:
                self.fail(where, f"container 'patch' holds exactly one patch, found {len(patches)}")
            value = patches[0]
        elif not patches:
            self.fail(where, f"container {container!r} holds no patches")
        elif container == "list":
            value = patches
        else:
            dtype = _BANK_DTYPES.get(entry.get("bank_dtype"))
            if dtype is None:
                self.fail(where, f"'bank_dtype' must be one of {tuple(_BANK_DTYPES)}, got {entry.get('bank_dtype')!r}")
            try:
                value = PatchBank(patches, self.hidden, dtype=dtype)
            except (ValueError, TypeError) as exc:
                self.fail(where, str(exc))
        if entry.get("scoped"):
            if value is None:
                self.fail(where, "a scoped site must hold a patch")
            value = Scoped(value, scope)
        return value


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name} in JSON")


def read_manifest(path) -> tuple:
    """(manifest dict, tensors dict) after checking the container, format, fields and payload hash."""
    path = Path(path)
    metadata, tensors = read_container(path)
    fmt = metadata.get(KEY_FORMAT)
    if fmt != FORMAT:
        raise PatchFileError(f"{path}: not a fastpatch patch file (metadata {KEY_FORMAT!r} is {fmt!r}, "
                             f"expected {FORMAT!r})")
    ver = metadata.get(KEY_FORMAT_VERSION)
    if ver != str(FORMAT_VERSION):
        raise PatchFileError(f"{path}: unknown format version {ver!r}; this fastpatch reads version "
                             f"{FORMAT_VERSION} (upgrade fastpatch to read newer files)")
    try:
        manifest = json.loads(metadata.get(KEY_MANIFEST, ""), parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise PatchFileError(f"{path}: manifest ({KEY_MANIFEST!r}) is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise PatchFileError(f"{path}: manifest must be a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PatchFileError(f"{path}: unknown format version {manifest.get('format_version')!r} in the manifest; "
                             f"this fastpatch reads version {FORMAT_VERSION}")
    for field in ("name", "version", "created", "payload_sha256"):
        if not isinstance(manifest.get(field), str) or not manifest[field]:
            raise PatchFileError(f"{path}: manifest field {field!r} must be a non-empty string, "
                                 f"got {manifest.get(field)!r}")
    for field in ("author", "description"):
        if manifest.get(field) is not None and not isinstance(manifest[field], str):
            raise PatchFileError(f"{path}: manifest field {field!r} must be a string or null")
    try:
        check_semver(manifest["version"], "manifest field 'version'")
        _dt.datetime.fromisoformat(manifest["created"].replace("Z", "+00:00"))
    except ValueError as exc:
        raise PatchFileError(f"{path}: {exc}" if "version" in str(exc) else
                             f"{path}: manifest field 'created' is not an ISO time: {manifest['created']!r}") from None
    if not isinstance(manifest.get("sites"), dict):
        raise PatchFileError(f"{path}: manifest field 'sites' must be an object")
    if manifest.get("model") is not None and not isinstance(manifest["model"], dict):
        raise PatchFileError(f"{path}: manifest field 'model' must be an object or null")
    hidden = manifest.get("hidden_size")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0):
        raise PatchFileError(f"{path}: manifest field 'hidden_size' must be a positive integer, got {hidden!r}")
    actual = payload_sha256(tensors)
    if actual != manifest["payload_sha256"]:
        raise PatchFileError(f"{path}: tensor payload hash mismatch (manifest {manifest['payload_sha256'][:12]}…, "
                             f"file {actual[:12]}…): the tensors were changed or corrupted")
    return manifest, tensors


def load(path, *, model=None, force: bool = False) -> dict:
    """The {site: patch | [patches] | PatchBank | Scoped | None} mapping saved in ``path``.

    With ``model`` (a model or a fingerprint dict), a file fitted on a different model is refused
    with :class:`ModelMismatchError` listing what differs; ``force=True`` loads it anyway (with a
    warning). Any defect of the file raises :class:`PatchFileError`; nothing is returned then.
    """
    from .fingerprint import as_fingerprint, differences

    path = Path(path)
    manifest, tensors = read_manifest(path)
    saved_fp = manifest.get("model")
    num_layers = saved_fp.get("num_layers") if saved_fp else None
    reader = _Reader(path, tensors, manifest.get("hidden_size"))
    mapping = {}
    for site, entry in manifest["sites"].items():
        try:
            _site_layer(site, num_layers if isinstance(num_layers, int) else None, "manifest")
        except ValueError as exc:
            raise PatchFileError(f"{path}: {exc}") from None
        mapping[site] = reader.site(site, entry)
    extra = sorted(set(tensors) - reader.used)
    if extra:
        raise PatchFileError(f"{path}: tensor(s) {extra[:5]} are not referenced by the manifest (hand-edited file?)")
    actual_fp = as_fingerprint(model)
    if actual_fp is not None:
        _check_model(path, saved_fp, actual_fp, mapping, force, differences)
    return mapping


def _check_model(path, saved_fp, actual_fp, mapping, force, differences) -> None:
    problems = []
    if saved_fp is None:
        warnings.warn(f"{path}: the file records no model fingerprint; cannot check it against the model",
                      stacklevel=3)
    else:
        problems = differences(saved_fp, actual_fp)
    n = actual_fp.get("num_layers")
    if isinstance(n, int):
        for site in mapping:
            if split_site(site)[0] >= n:
                problems.append(f"site {site!r} is past the model's {n} layers")
    if problems:
        msg = f"{path} was fitted on a different model: " + "; ".join(problems)
        if not force:
            raise ModelMismatchError(msg + ". Pass force=True to load it anyway")
        warnings.warn(msg + " (loaded anyway: force=True)", stacklevel=3)
    elif saved_fp and saved_fp.get("dtype") != actual_fp.get("dtype"):
        pass  # patches apply at any dtype; dtype is informative only
