"""Containment: who may receive a patch set, what it may touch, how big its edit may be, until when.

A policy is a JSON-able dict kept with the patch set:

    {"tenants": ["acme"], "products": None, "regions": ["eu"],     # request labels allowed (None = any)
     "sites": ["layers.8.*"],                                       # fnmatch patterns of allowed sites
     "max_edit_norm": 40.0,   # bound on ||bias·up + shift||, the constant part of the edit (a Steer's ||v||)
     "max_edit_gain": 1.0}    # bound on the spectral norm of downᵀ·up, how much the edit scales h

A request carries labels ``{"tenant": ..., "product": ..., "region": ...}``; a label key outside
:data:`LABEL_KEYS` is an error (a typo must not silently widen or narrow a scope). A request whose
labels are outside the policy never gets the patch. A publish whose patches touch a site outside
``sites`` or exceed an edit bound is refused.

Expiry: a version with ``expires_at`` (UNIX seconds) is served strictly before that instant and never
at or after it.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Optional

import torch

from ..core.patches import to_canonical
from ..core.sites import split_site

LABEL_KEYS = ("tenant", "product", "region")
_LABEL_LIST = {"tenants": "tenant", "products": "product", "regions": "region"}
_BOUNDS = ("max_edit_norm", "max_edit_gain")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


class PolicyViolation(ValueError):
    """A publish that its patch set's policy refuses (the message lists every violation)."""


def check_labels(labels: Optional[dict]) -> dict:
    """Request labels → a clean dict; unknown keys and malformed values raise ValueError."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValueError(f"labels must be a dict like {{'tenant': 'acme'}}, got {type(labels).__name__}")
    out = {}
    for k, v in labels.items():
        if k not in LABEL_KEYS:
            raise ValueError(f"unknown label {k!r}; labels are {list(LABEL_KEYS)}")
        if not isinstance(v, str) or not _LABEL_VALUE.match(v):
            raise ValueError(f"label {k}={v!r}: values are 1-128 characters of letters, digits and _.:@-")
        out[k] = v
    return out


def check_policy(policy: Optional[dict]) -> dict:
    """Validate and normalise a policy dict (missing fields = unrestricted)."""
    policy = dict(policy or {})
    unknown = sorted(set(policy) - set(_LABEL_LIST) - set(_BOUNDS) - {"sites"})
    if unknown:
        raise ValueError(f"unknown policy field(s) {unknown}; fields are "
                         f"{sorted(list(_LABEL_LIST) + list(_BOUNDS) + ['sites'])}")
    out: dict = {}
    for field, label in _LABEL_LIST.items():
        vals = policy.get(field)
        if vals is None:
            out[field] = None
            continue
        if isinstance(vals, str) or not isinstance(vals, (list, tuple)):
            raise ValueError(f"policy {field}: a list of {label} labels, got {vals!r}")
        out[field] = sorted(check_labels({label: v})[label] for v in vals)
    sites = policy.get("sites")
    if sites is not None:
        if isinstance(sites, str) or not isinstance(sites, (list, tuple)) or not all(
                isinstance(s, str) and s for s in sites):
            raise ValueError(f"policy sites: a list of site patterns like 'layers.8.*', got {sites!r}")
        sites = sorted(sites)
    out["sites"] = sites
    for b in _BOUNDS:
        v = policy.get(b)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v < 0):
            raise ValueError(f"policy {b}: a finite number >= 0, got {v!r}")
        out[b] = None if v is None else float(v)
    return out


def allows(policy: dict, labels: dict) -> tuple:
    """(True, "") if a request with ``labels`` is in scope, else (False, why)."""
    for field, label in _LABEL_LIST.items():
        allowed = policy.get(field)
        if allowed is not None and labels.get(label) not in allowed:
            return False, f"{label}={labels.get(label)!r} is not in the policy's {field}"
    return True, ""


def edit_size(patch) -> tuple:
    """(norm, gain) of a patch's edit Δh = g·((h·downᵀ + bias)·up + shift): ||bias·up + shift|| and the
    spectral norm of downᵀ·up (g ≤ 1, so these bound the edit of any row)."""
    c = to_canonical(patch)
    const = c.bias @ c.up + c.shift
    gain = float(torch.linalg.matrix_norm(c.down.T @ c.up, ord=2)) if c.rank else 0.0
    return float(const.norm()), gain


def violations(policy: dict, patches: dict) -> list:
    """Every way ``patches`` ({patch name: {site: patch}}) breaks ``policy`` (empty: it complies)."""
    out = []
    for pname in sorted(patches):
        for site in sorted(patches[pname]):
            if split_site(site) is None:
                out.append(f"{pname} at {site!r}: not a site name (layers.N.resid_pre|resid_mid|resid_post)")
                continue
            pats = policy.get("sites")
            if pats is not None and not any(fnmatch.fnmatchcase(site, p) for p in pats):
                out.append(f"{pname} at {site}: site not allowed by the policy ({pats})")
            norm, gain = edit_size(patches[pname][site])
            if not (math.isfinite(norm) and math.isfinite(gain)):
                out.append(f"{pname} at {site}: non-finite parameters")
                continue
            if policy.get("max_edit_norm") is not None and norm > policy["max_edit_norm"]:
                out.append(f"{pname} at {site}: edit norm {norm:.4g} > max_edit_norm {policy['max_edit_norm']:g}")
            if policy.get("max_edit_gain") is not None and gain > policy["max_edit_gain"] * (1 + 1e-9):
                out.append(f"{pname} at {site}: edit gain {gain:.4g} > max_edit_gain {policy['max_edit_gain']:g}")
    return out


def is_expired(record: dict, now: float) -> bool:
    exp = record.get("expires_at")
    return exp is not None and now >= exp
