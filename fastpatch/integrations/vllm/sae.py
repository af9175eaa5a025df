"""SAE feature edits per request: ``SamplingParams(extra_args={"fastpatch": {"sae": "gemma-l12", "clamp":
{"1234": 5.0}}})`` against SAEs declared in ``additional_config={"fastpatch": {"saes": {...}}}``.

The three processes' parts:

- front end (:func:`normalize`): the request's config is checked (SAE declared, edits known, feature indices
  in ``[0, d_sae)``, at most ``max_sae_features`` features, finite values; else a ``VLLMValidationError``)
  and rewritten into one canonical form whose content hash (with the SAE files' digest) goes into the
  request and its prefix-cache salt.
- scheduler (:class:`RowMap`, hooked into vLLM's ``Scheduler``): each distinct config running takes one of
  ``sae_slots`` bank rows; requests with the same config share it (refcounted per request, released when
  the last one finishes). A waiting request whose config has no row and finds none free is skipped this
  step and tried again the next (admission, as vLLM does for ``max_loras``), never failed. The row number
  travels to the workers in the request's ``extra_args`` (:data:`ROW_KEY`; the canonical config under
  :data:`CONFIG_KEY`).
- worker (:func:`build`): the first step a row serves a new config, the config's patch
  (``SAE.edit``: one ``Encoded`` with ReLU/JumpReLU components) is written into that row of the site's bank.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from pathlib import Path
from typing import Optional

from . import config as cfg
from ...core.sites import parse_site
from ...files import sae_file
from .slots import file_digest

logger = logging.getLogger("fastpatch.vllm")

EDITS = ("clamp", "ablate", "scale", "steer")
HASH = "hash"  # the canonical config's content hash (set by the front end; a request cannot set it)
CONFIG_KEY = "fastpatch_sae"  # extra_args key of the canonical config the front end writes
ROW_KEY = "fastpatch_sae_row"  # extra_args key the scheduler writes: the request's SAE row

_cache: dict = {}
_cache_lock = threading.Lock()


class SAERequestError(ValueError):
    """A request's SAE config is malformed or does not fit the SAE (the message says which field)."""


def load(path: str, site: Optional[str]) -> tuple:
    """(SAE, digest of its files), read once per process per (path, site, file sizes and times)."""
    p = Path(path)
    files = sorted(f for f in (p.iterdir() if p.is_dir() else [p]) if f.is_file()) if p.exists() else []
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    key = (str(path), site, stamp)
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    sae = sae_file.load(path, site=site)
    h = hashlib.sha256()
    for f in files:
        if f.name in ("cfg.json", "sae_weights.safetensors") or f.suffix == ".npz":
            h.update(f.name.encode() + b"\0" + file_digest(f).encode())
    out = (sae, h.hexdigest()[:16])
    with _cache_lock:
        _cache[key] = out
    return out


def load_all(conf: cfg.PluginConfig) -> dict:
    """{name: (SAE, digest)} of the engine's declared SAEs (errors name the SAE)."""
    out = {}
    for name, (path, site) in conf.saes.items():
        try:
            out[name] = load(path, site)
        except (sae_file.SAEError, OSError, ValueError) as exc:
            raise sae_file.SAEError(f"fastpatch sae {name!r}: {exc}") from None
    return out


def check_model(saes: dict, num_layers: int, hidden_size: int, site_check=None) -> None:
    """Every SAE's site exists in the model and its d_in is the hidden size (SAEError naming the SAE)."""
    for name, (sae, _) in saes.items():
        try:
            sae.check_dims(num_layers, hidden_size)
            if site_check is not None:
                site_check(parse_site(sae.site, num_layers))
        except Exception as exc:  # noqa: BLE001 - one message naming the SAE, whatever failed
            raise sae_file.SAEError(f"fastpatch sae {name!r} does not fit this model: {exc}") from None


def is_sae_request(value) -> bool:
    """Whether a request's fastpatch section is an SAE feature config (a dict naming 'sae' or an edit)."""
    return isinstance(value, dict) and any(k in value for k in ("sae", *EDITS))


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise SAERequestError(f"fastpatch: {where}: the value must be a finite number, got {v!r}")
    return float(v)


def _feature(i, sae, where: str) -> int:
    if isinstance(i, str) and i.strip().lstrip("-").isdigit():
        i = int(i.strip())
    if isinstance(i, bool) or not isinstance(i, int):
        raise SAERequestError(f"fastpatch: {where}: feature indices are integers, got {i!r}")
    if not 0 <= i < sae.d_sae:
        raise SAERequestError(f"fastpatch: {where}: feature {i} is out of range; this SAE has {sae.d_sae} features "
                              f"(0..{sae.d_sae - 1})")
    return i


def normalize(value: dict, saes: dict, max_features: int) -> dict:
    """The canonical form of a request's SAE config: ``{"sae": name, "clamp": [[i, v], ...], "ablate": [i, ...],
    "scale": [[i, k], ...], "steer": [[i, a], ...], "hash": h}`` (edits sorted by feature, empty ones left
    out); SAERequestError naming the field when it is not valid for the SAE."""
    unknown = sorted(set(value) - {"sae", *EDITS}, key=str)
    if unknown:
        raise SAERequestError(f"fastpatch: unknown key(s) {unknown} in the SAE config; it takes 'sae' and "
                              f"{list(EDITS)}")
    name = value.get("sae")
    if name not in saes:
        raise SAERequestError(f"fastpatch: unknown sae {name!r}; this server has {sorted(saes)}")
    sae, digest = saes[name]
    out: dict = {"sae": name}
    seen: dict = {}
    for kind in EDITS:
        if kind not in value:
            continue
        v = value[kind]
        where = f"sae {name!r} {kind}"
        if kind == "ablate":
            if not isinstance(v, (list, tuple)):
                raise SAERequestError(f"fastpatch: {where} takes a list of feature indices, got {v!r}")
            items = sorted(_feature(i, sae, where) for i in v)
            feats = items
        else:
            if not isinstance(v, dict):
                raise SAERequestError(f"fastpatch: {where} takes an object {{feature: value}}, got {v!r}")
            items = sorted([_feature(i, sae, where), _number(x, f"{where} feature {i}")] for i, x in v.items())
            feats = [i for i, _ in items]
        if not items:
            raise SAERequestError(f"fastpatch: {where}: no features given")
        for i in feats:
            if i in seen:
                raise SAERequestError(f"fastpatch: sae {name!r}: feature {i} is edited twice ({seen[i]} and {kind})")
            seen[i] = kind
        if kind != "steer" and sae.architecture == "topk":
            raise SAERequestError(f"fastpatch: sae {name!r} is a TopK SAE: {kind} is not exact for it (a feature's "
                                  "activation depends on all others); only steer is served")
        out[kind] = items
    if len(out) == 1:
        raise SAERequestError(f"fastpatch: the SAE config edits nothing; give one of {list(EDITS)}")
    if len(seen) > max_features:
        raise SAERequestError(f"fastpatch: the SAE config edits {len(seen)} features; this server allows at most "
                              f"{max_features} per request (max_sae_features)")
    body = json.dumps({"cfg": out, "sae": digest}, sort_keys=True, separators=(",", ":"))
    out[HASH] = hashlib.sha256(body.encode()).hexdigest()[:20]
    return out


def build(normalized: dict, saes: dict, num_layers: int) -> dict:
    """{site key: CanonicalPatch} of a canonical config (what its bank row holds)."""
    sae, _ = saes[normalized["sae"]]
    kw = {}
    for kind in EDITS:
        if kind in normalized:
            items = normalized[kind]
            kw[kind] = list(items) if kind == "ablate" else {int(i): float(v) for i, v in items}
    patch = sae.edit(**kw)
    return {parse_site(sae.site, num_layers): patch.canonical()}


def build_keys(sae, num_layers: int) -> list:
    """The site keys an SAE's rows write (its one site)."""
    return [parse_site(sae.site, num_layers)]


def salt(normalized: dict) -> str:
    return f"fastpatch-sae:{normalized[HASH]}"


class RowMap:
    """The scheduler's rows: config hash -> row, and the requests holding each row.

    ``tentative``: rows taken this step by waiting requests the scheduler may still not admit;
    :meth:`settle` keeps those whose request got scheduled and releases the others.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.row_of: dict = {}  # hash -> row
        self.holders: dict = {}  # row -> set of request ids
        self.req_row: dict = {}  # request id -> row
        self.tentative: dict = {}  # request id -> request (taken this step)

    def free_rows(self) -> list:
        used = set(self.row_of.values())
        return [r for r in range(self.rows) if r not in used]

    def admit(self, request_id: str, h: str) -> Optional[int]:
        """The row for config ``h`` (shared, or a free one), now held by the request; None: no row free."""
        row = self.req_row.get(request_id)
        if row is not None:
            return row
        row = self.row_of.get(h)
        if row is None:
            free = self.free_rows()
            if not free:
                return None
            row = free[0]
            self.row_of[h] = row
            self.holders[row] = set()
        self.holders[row].add(request_id)
        self.req_row[request_id] = row
        return row

    def release(self, request_id: str) -> None:
        row = self.req_row.pop(request_id, None)
        self.tentative.pop(request_id, None)
        if row is None:
            return
        holders = self.holders.get(row)
        holders.discard(request_id)
        if not holders:
            del self.holders[row]
            self.row_of = {h: r for h, r in self.row_of.items() if r != row}


def config_of(request) -> Optional[dict]:
    """The canonical SAE config a scheduler / worker request carries, or None."""
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(CONFIG_KEY)
    return value if isinstance(value, dict) else None


def rows_of(scheduler) -> Optional[RowMap]:
    rows = scheduler.__dict__.get("_fastpatch_rows", False)
    if rows is False:
        raw = cfg.section(getattr(scheduler.vllm_config, "additional_config", None))
        conf = None if raw is None else cfg.parse(raw)
        rows = RowMap(conf.sae_slots) if conf is not None and conf.saes else None
        scheduler.__dict__["_fastpatch_rows"] = rows
    return rows


def wrap_handle_blocked(vanilla):
    """Scheduler._handle_blocked_waiting_request: a waiting request whose SAE config gets no row is skipped
    this step (it stays in the queue: the next step tries again)."""

    def _handle_blocked_waiting_request(self, request):
        ready = vanilla(self, request)
        rows = rows_of(self)
        if not ready or rows is None:
            return ready
        conf = config_of(request)
        if conf is None:
            return ready
        h = conf.get(HASH)
        if not isinstance(h, str):  # the front end sets it; a request without it was never checked
            raise RuntimeError(f"fastpatch: request {request.request_id} carries an SAE config the front end did "
                               "not check (no hash); refusing to schedule it unpatched")
        fresh = request.request_id not in rows.req_row
        row = rows.admit(request.request_id, h)
        if row is None:
            return False
        if fresh:
            rows.tentative[request.request_id] = request
        request.sampling_params.extra_args[ROW_KEY] = row
        return True

    return _handle_blocked_waiting_request


def wrap_schedule(vanilla):
    """Scheduler.schedule: rows taken by requests the step did not admit are given back."""

    def schedule(self, *args, **kwargs):
        out = vanilla(self, *args, **kwargs)
        rows = rows_of(self)
        if rows is not None and rows.tentative:
            for rid, request in list(rows.tentative.items()):
                if rid in out.num_scheduled_tokens:
                    continue  # admitted: it holds the row until it finishes
                if getattr(getattr(request, "status", None), "name", "") == "WAITING_FOR_REMOTE_KVS":
                    continue  # admitted to an async KV load: it holds the row
                rows.release(rid)
            rows.tentative.clear()
        return out

    return schedule


def wrap_free_request(vanilla):
    """Scheduler._free_request (every finished or aborted request): its row reference is dropped."""

    def _free_request(self, request, *args, **kwargs):
        try:
            return vanilla(self, request, *args, **kwargs)
        finally:
            rows = rows_of(self)
            if rows is not None:
                rows.release(request.request_id)

    return _free_request
