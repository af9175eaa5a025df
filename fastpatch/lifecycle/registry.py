"""Governance of patches in production: named, versioned patch sets, tenants, hot swap, rollback,
an append-only audit log and fire-count telemetry.

A *patch set* version is an immutable mapping ``{patch name: {site: patch}}`` published under a
name and a semantic version (``"1.4.0"``, ``"2.0.0-rc.1"``). A model serves one version at a time
through one :func:`fastpatch.apply` handle; every patch name has a permanent slot (its select id)
for the life of the registry, so a tenant's id never changes when versions change and a swap never
invalidates the ids of a request in flight. Sites a patch does not touch, and names a version lacks,
hold an identity patch in their slot.

Consistency: :meth:`Registry.request` pins the handle's active mapping for the calling thread
(``handle.pinned()``) under the same lock :meth:`Registry.activate` swaps under, so the version it
reports is exactly the one every forward of the request uses, however many swaps land meanwhile.
``handle.select`` is per handle, not per thread, so requests on one handle are serialised; swaps,
publishing and tenant changes are not blocked by them.

Every change (publish, attach, activate, rollback, enable, disable, detach) is appended to a JSONL
audit log (who, what, when, content hash) and fsynced before the call returns.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional

import torch

from ..core.bank import PatchBank
from ..core.patches import CanonicalPatch, Patch, Steer, to_canonical

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def parse_version(text: str) -> tuple:
    """A sortable key for a semantic version; pre-releases sort before their release (semver 2.0)."""
    m = _SEMVER.match(str(text).strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"version {text!r} is not a semantic version like '1.2.0' or '2.0.0-rc.1'")
    major, minor, patch, pre = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)
    if pre is None:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


def content_hash(patches: dict) -> str:
    """sha256 of a patch set's structure and exact float64 parameters (order-independent)."""
    h = hashlib.sha256()
    for pname in sorted(patches):
        for site in sorted(patches[pname]):
            c = to_canonical(patches[pname][site])
            h.update(f"{pname}\0{site}\0{c.kind}\0{tuple(c.down.shape)}\0".encode())
            for t in (c.down, c.bias, c.up, c.shift):
                h.update(t.detach().to(torch.float64).contiguous().numpy().tobytes())
            if c.gate is not None:
                g = c.gate
                h.update(f"gate\0{g.metric}\0{g.fire}\0{g.threshold!r}\0".encode())
                h.update(g.condition.to(torch.float64).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class PatchSetVersion:
    name: str
    version: str
    patches: dict = field(repr=False)  # {patch name: {site: patch}}
    content_hash: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sites(self) -> list:
        return sorted({s for m in self.patches.values() for s in m})


@dataclass(frozen=True)
class Served:
    """What a request runs with: the version (pinned) and the select ids of its batch."""

    version: PatchSetVersion
    ids: Optional[torch.Tensor]


def _check_patch_set(patches) -> dict:
    if not isinstance(patches, dict) or not patches:
        raise ValueError("a patch set is a non-empty {patch name: {site: patch}} dict")
    out = {}
    for pname, sites in patches.items():
        if not isinstance(pname, str) or not pname:
            raise ValueError(f"patch names must be non-empty strings, got {pname!r}")
        if isinstance(sites, (Patch, CanonicalPatch)) or not isinstance(sites, dict) or not sites:
            raise ValueError(f"patch {pname!r}: give a non-empty {{site: patch}} dict, got {type(sites).__name__}")
        for site, p in sites.items():
            if not isinstance(p, (Patch, CanonicalPatch)):
                raise TypeError(f"patch {pname!r} at {site!r}: expected a fastpatch patch, got {type(p).__name__}")
        out[pname] = dict(sites)
    hidden = {to_canonical(p).hidden_size for m in out.values() for p in m.values()}
    if len(hidden) != 1:
        raise ValueError(f"the patches of one set must share a hidden size, got {sorted(hidden)}")
    return out


class Registry:
    """Named, versioned patch sets served to tenants through one patched model.

    >>> reg = Registry("audit.jsonl", actor="alice")
    >>> reg.publish("tone", "1.0.0", {"positive": {"layers.3.resid_post": Steer(v)}})
    >>> reg.attach(model, "tone")                      # serve the latest version
    >>> reg.enable("tenant-a", "positive")
    >>> with reg.request(["tenant-a", "tenant-b"]) as served:
    ...     model.generate(**batch)                    # one consistent version: served.version
    >>> reg.publish("tone", "1.1.0", {...}); reg.activate("tone", "1.1.0"); reg.rollback()
    """

    def __init__(self, audit_log: Optional[str] = None, *, actor: Optional[str] = None):
        self.audit_log = audit_log
        self.actor = actor or _default_actor()
        self._sets: dict = {}  # name -> {version: PatchSetVersion}
        self._slots: dict = {}  # patch name -> select id, permanent
        self._tenants: dict = {}  # tenant -> patch name
        self._handle = None
        self._model = None
        self._active: Optional[PatchSetVersion] = None
        self._history: list = []  # activated versions, newest last (for rollback)
        self._counters: list = []  # (label, slot names, {site: fire tensor}) per activation
        self._lock = threading.RLock()  # registry state + swaps
        self._serve_lock = threading.RLock()  # handle.select is per handle: one request at a time
        self._log_lock = threading.Lock()
        self.audit: list = []

    # -- audit ----------------------------------------------------------------------------------
    def _record(self, action: str, actor: Optional[str], **fields) -> dict:
        entry = {"ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                 "actor": actor or self.actor, "action": action}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, sort_keys=True)
        with self._log_lock:
            if self.audit_log is not None:
                # Append-only: opened in "a" mode per entry, flushed and fsynced before returning.
                with open(self.audit_log, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            self.audit.append(entry)
        return entry

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, name: str, version: str, patches: dict, *, actor: Optional[str] = None,
                note: Optional[str] = None) -> PatchSetVersion:
        """Add an immutable version; it must be newer than every published version of ``name``."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"patch set name must be a non-empty string, got {name!r}")
        key = parse_version(version)
        patches = _check_patch_set(patches)
        psv = PatchSetVersion(name, version, patches, content_hash(patches))
        with self._lock:
            existing = self._sets.setdefault(name, {})
            if version in existing:
                raise ValueError(f"{name}@{version} is already published; versions are immutable, "
                                 "publish a new version")
            newest = max(existing, key=parse_version, default=None)
            if newest is not None and parse_version(newest) >= key:
                raise ValueError(f"{name}@{version} is not newer than the latest published version {newest}")
            existing[version] = psv
            for pname in patches:
                self._slots.setdefault(pname, len(self._slots))
            self._record("publish", actor, name=name, version=version, content_hash=psv.content_hash,
                         patches=sorted(patches), sites=psv.sites, note=note)
        return psv

    def versions(self, name: str) -> list:
        with self._lock:
            return sorted(self._sets.get(name, {}), key=parse_version)

    def get(self, name: str, version: Optional[str] = None) -> PatchSetVersion:
        """A published version (the latest when ``version`` is None)."""
        with self._lock:
            vs = self._sets.get(name)
            if not vs:
                raise KeyError(f"no patch set named {name!r}; published: {sorted(self._sets)}")
            if version is None:
                version = max(vs, key=parse_version)
            if version not in vs:
                raise KeyError(f"{name!r} has no version {version!r}; published: {self.versions(name)}")
            return vs[version]

    @property
    def slots(self) -> dict:
        """Patch name → select id (permanent)."""
        with self._lock:
            return dict(self._slots)

    # -- serving --------------------------------------------------------------------------------
    def _mapping(self, psv: PatchSetVersion, hidden: int) -> tuple:
        """{site: PatchBank} with one slot per known patch name (identity where absent)."""
        names = sorted(self._slots, key=self._slots.get)
        identity = Steer(torch.zeros(hidden, dtype=torch.float64))
        mapping = {}
        for site in psv.sites:
            plist = [psv.patches.get(n, {}).get(site, identity) for n in names]
            mapping[site] = PatchBank(plist, hidden, device=self._device)
        return mapping, names

    def attach(self, model, name: str, version: Optional[str] = None, *, backend: Optional[str] = None,
               fallback: Optional[str] = "hooks", count_fires: bool = True,
               actor: Optional[str] = None):
        """Patch ``model`` with a version of ``name`` (default the latest); returns the handle."""
        from ..integrations.hf import apply

        with self._lock:
            if self._handle is not None:
                raise RuntimeError("this registry already serves a model; detach() it first")
            psv = self.get(name, version)
            p = next(model.parameters())
            self._device, self._hidden = p.device, _hidden_size(model)
            mapping, names = self._mapping(psv, self._hidden)
            handle = apply(model, mapping, backend=backend, fallback=fallback, count_fires=count_fires)
            self._handle, self._model, self._active = handle, model, psv
            self._history = [psv]
            self._track(psv, names)
            self._record("attach", actor, name=psv.name, version=psv.version, content_hash=psv.content_hash)
            return handle

    def _track(self, psv: PatchSetVersion, names: list) -> None:
        self._active_names = names
        if self._handle.engine.count_fires:
            # References to the plan's device counters: no host sync now, read in telemetry().
            self._counters.append((psv.label, names, self._handle.fire_counts()))

    def activate(self, name: str, version: Optional[str] = None, *, actor: Optional[str] = None,
                 _action: str = "activate") -> PatchSetVersion:
        """Hot-swap the served bank to ``name@version``: validated first, then one atomic swap."""
        with self._lock:
            self._check_attached()
            psv = self.get(name, version)
            mapping, names = self._mapping(psv, self._hidden)
            # Sites the old version patched and the new one does not must be cleared explicitly.
            for site in self._active.sites:
                mapping.setdefault(site, None)
            previous = self._active
            self._handle.swap(mapping)
            self._active = psv
            if _action == "rollback":
                self._history.pop()
            else:
                self._history.append(psv)
            self._track(psv, names)
            self._record(_action, actor, name=psv.name, version=psv.version, content_hash=psv.content_hash,
                         previous=previous.label)
            return psv

    def rollback(self, *, actor: Optional[str] = None) -> PatchSetVersion:
        """Serve the version that was active before the current one."""
        with self._lock:
            self._check_attached()
            if len(self._history) < 2:
                raise RuntimeError(f"nothing to roll back to: {self._active.label} is the first version served")
            prev = self._history[-2]
            return self.activate(prev.name, prev.version, actor=actor, _action="rollback")

    @property
    def active(self) -> Optional[PatchSetVersion]:
        return self._active

    @property
    def handle(self):
        return self._handle

    def detach(self, *, actor: Optional[str] = None) -> None:
        with self._lock:
            if self._handle is None:
                return
            with self._serve_lock:
                self._handle.remove()
            self._record("detach", actor, name=self._active.name, version=self._active.version)
            self._handle = self._model = self._active = None
            self._history = []

    def _check_attached(self):
        if self._handle is None:
            raise RuntimeError("no model attached: call registry.attach(model, name) first")

    # -- tenants --------------------------------------------------------------------------------
    def enable(self, tenant: str, patch: str, *, actor: Optional[str] = None) -> None:
        """Tenant ``tenant`` gets patch ``patch`` (a name published in some set)."""
        with self._lock:
            if patch not in self._slots:
                raise KeyError(f"no published patch named {patch!r}; known: {sorted(self._slots)}")
            self._tenants[tenant] = patch
            self._record("enable", actor, tenant=tenant, patch=patch)

    def disable(self, tenant: str, *, actor: Optional[str] = None) -> None:
        with self._lock:
            removed = self._tenants.pop(tenant, None)
            self._record("disable", actor, tenant=tenant, patch=removed)

    def tenants(self) -> dict:
        with self._lock:
            return dict(self._tenants)

    def ids(self, tenants) -> torch.Tensor:
        """Select ids [batch] for a batch of tenants: a tenant's patch slot, −1 if none is enabled."""
        with self._lock:
            return torch.tensor([self._slots[self._tenants[t]] if t in self._tenants else -1 for t in tenants],
                                dtype=torch.int32)

    @contextmanager
    def request(self, tenants=None):
        """Run one request: ``with reg.request(tenants) as served: model.generate(...)``.

        Every forward inside uses the version in ``served.version``. ``tenants`` (one per sequence)
        picks each row's patch; None applies slot 0 to every row (only for one-patch sets).
        """
        with self._serve_lock:
            with self._lock:
                self._check_attached()
                handle = self._handle
                pin = handle.pinned()
                pin.__enter__()  # pinned under the swap lock: the plan and self._active agree
                psv = self._active
                ids = None if tenants is None else self.ids(list(tenants))
            try:
                handle.select(ids)
                yield Served(psv, ids)
            finally:
                pin.__exit__(None, None, None)

    # -- telemetry ------------------------------------------------------------------------------
    def telemetry(self) -> dict:
        """Rows each patch fired on, counted in the kernel: {"name@version": {patch: {site: rows}}}.

        Reads the device counters now (the only host sync); identity slots are left out.
        """
        with self._lock:
            counters = list(self._counters)
            sets = {v.label: v for vs in self._sets.values() for v in vs.values()}
        out: dict = {}
        for label, names, fires in counters:
            psv = sets[label]
            per = out.setdefault(label, {})
            for site, t in fires.items():
                counts = t.tolist()
                for k, n in enumerate(names):
                    if site in psv.patches.get(n, {}):
                        per.setdefault(n, {}).setdefault(site, 0)
                        per[n][site] += int(counts[k])
        return out

    def reset_telemetry(self, *, actor: Optional[str] = None) -> None:
        with self._lock:
            self._counters = []
            if self._handle is not None:
                self._handle.reset_fire_counts()
                self._track(self._active, self._active_names)
            self._record("reset_telemetry", actor)


def _hidden_size(model) -> int:
    cfg = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, name, None)
        if v:
            return int(v)
    raise ValueError(f"cannot find the hidden size of {type(model).__name__}")


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


def read_audit(path: str) -> list:
    """The audit log's entries, oldest first."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
