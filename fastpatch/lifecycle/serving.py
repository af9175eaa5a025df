"""The data plane: one patched model serving every live version of every patch set, per request.

:class:`Serving` keeps one :func:`fastpatch.apply` handle on the model whose banks hold a *slot* for
each (patch set, version, patch) that some request can currently get: the stable version and every arm
of every set, minus expired versions. When the store's generation moves (a publish, rollout, promote,
abort, expiry, guard action, in this process or another one sharing the store) :meth:`Serving.refresh`
builds the new banks and swaps them in with one ``handle.swap``.

A request (:meth:`Serving.request`) asks the governance layer which version, arm and patch it gets
(rollout, policy scope, expiry), on the *same snapshot* the slot table was built from, then pins the
handle's mapping for its thread (``handle.pinned()``) and chooses its slot with ``handle.using(ids)``,
both under the lock the swap takes. So concurrent requests with different patches run together (the
choice travels with the thread, not the handle), and every forward of a request (prompt and each
decode step) runs the version it reports, whatever swaps land meanwhile.

A live version whose patch files cannot be read back (a blob missing or corrupted: its content hash
differs, or the file is no longer a valid patch file) does not stop the others: it gets no slot, an alert
(``kind="unavailable"``, stored and audited with actor ``serving``) names it and the reason once per
process, and every request that resolves to it raises :class:`Unavailable`: it is never served
unpatched. Each refresh tries such versions again, so restoring the blob brings them back.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.bank import PatchBank
from ..core.patches import Steer
from ..files.patch_file import PatchFileError
from . import rollout as ro
from .governance import Choice, Governance
from .policy import is_expired
from .registry import _hidden_size
from .store import StoreError
from .telemetry import FIRE_RATE, Monitor


class Unavailable(RuntimeError):
    """A request resolved to a version this process cannot serve (its patch files are unreadable)."""


@dataclass
class Served:
    """One request's patch: the choice (set, version, arm, patch, reason), its slot, and its row count."""

    choice: Choice
    slot: int
    generation: int
    rows: int = field(default=0)

    @property
    def version(self) -> Optional[str]:
        return self.choice.version

    def add_rows(self, n: int) -> None:
        """Token rows this request ran through the model (for fire-rate telemetry)."""
        self.rows += int(n)


class Serving:
    def __init__(self, gov: Governance, model, *, backend: Optional[str] = None, fallback: Optional[str] = "hooks",
                 poll_interval: float = 0.2):
        self.gov = gov
        self.model = model
        self.backend, self.fallback = backend, fallback
        self.poll_interval = float(poll_interval)
        self.monitor = Monitor()
        p = next(model.parameters())
        self._device, self._hidden = p.device, _hidden_size(model)
        self._handle = None
        self._snap: Optional[dict] = None
        self._slots: dict = {}  # (set, version, patch) -> slot id in the current plan
        self._live_keys: list = []  # every live (set, version, patch) of the current plan, served or broken
        self._broken: dict = {}  # (set, version) -> why its patch files cannot be loaded
        self._alerted: set = set()  # (set, version, reason) already alerted by this process
        self._sites: list = []
        self._lock = threading.Lock()  # swap + (pin, slot table) of a request
        self._refresh_lock = threading.Lock()
        self._last_poll = 0.0
        self._fires: list = []  # [slot labels, {site: device counter}, last read {site: list}] per plan
        self._version_rows: dict = {}  # (set, version) -> rows since the last flush
        self.refresh(force=True)

    # -- keeping up with the store --------------------------------------------------------------
    def _live(self, snap: dict) -> list:
        now = self.gov.clock()
        out = set()
        for name, s in snap["sets"].items():
            for v in ro.versions_in_use(s["rollout"]):
                rec = s["versions"].get(v)
                if rec is not None and not is_expired(rec, now):
                    out.update((name, v, p) for p in rec["patches"])
        return sorted(out)

    def refresh(self, *, force: bool = False) -> bool:
        """Reload from the store if it changed (or a live version expired); True if the banks were swapped."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.poll_interval:
            return False
        with self._refresh_lock:
            self._last_poll = now
            snap = self.gov.sync()
            live = self._live(snap)
            if not force and self._snap is not None and live == self._live_keys and not self._retry_broken(snap):
                # Versions are immutable: the same live set means the same banks. Only the snapshot (rollout
                # weights, policy, expiry) moves, and requests resolve on it from now on.
                with self._lock:
                    self._snap = snap
                return False
            broken = self._load_all(snap, live)
            servable = [k for k in live if (k[0], k[1]) not in broken]
            mapping = self._mapping(snap, servable)
            with self._lock:
                if mapping is None:
                    pass  # nothing to serve and nothing was ever patched: the model runs as it is
                elif self._handle is None:
                    from ..integrations.hf import apply

                    self._handle = apply(self.model, mapping, backend=self.backend, fallback=self.fallback,
                                         count_fires=True)
                else:
                    self._handle.swap(mapping)
                self._snap = snap
                self._slots = {k: i for i, k in enumerate(servable)}
                self._live_keys = live
                self._broken = broken
                if self._handle is not None:
                    self._fires.append([servable, self._handle.fire_counts(), {}])
            self._alert_broken(broken)
            return True

    def _load_all(self, snap: dict, live: list) -> dict:
        """Load every live version's patches; {(set, version): reason} for those that cannot be loaded."""
        broken = {}
        for name, version in sorted({(n, v) for n, v, _p in live}):
            rec = snap["sets"][name]["versions"][version]
            try:
                self.gov._load_record(rec)
            except (StoreError, PatchFileError, OSError) as exc:
                broken[(name, version)] = " ".join(str(exc).split())
        return broken

    def _retry_broken(self, snap: dict) -> bool:
        """True when a version that could not be loaded loads now (e.g. its blob was restored)."""
        for (name, version) in list(self._broken):
            rec = snap["sets"].get(name, {}).get("versions", {}).get(version)
            if rec is None:
                return True
            try:
                self.gov._load_record(rec)
            except (StoreError, PatchFileError, OSError):
                continue
            return True
        return False

    def _alert_broken(self, broken: dict) -> None:
        for (name, version), why in sorted(broken.items()):
            if (name, version, why) in self._alerted:
                continue
            self._alerted.add((name, version, why))
            self.gov.store.add_alert({
                "kind": "unavailable", "name": name, "version": version, "arm": "all", "metric": "patch_files",
                "actor": "serving", "ts": self.gov.clock(),
                "error": f"{name}@{version} is not served: {why}; requests for it are refused. Restore the "
                         "blob (this server retries on every refresh) or roll out a new version"})

    def unavailable(self) -> dict:
        """{(set, version): reason} of the live versions this process cannot serve."""
        return dict(self._broken)

    def _mapping(self, snap: dict, live: list) -> Optional[dict]:
        patches = {}
        for name, version, _p in live:
            if (name, version) not in patches:
                patches[(name, version)] = self.gov._load_record(snap["sets"][name]["versions"][version])
        sites = sorted({s for (n, v, p) in live for s in patches[(n, v)][p]})
        identity = Steer(torch.zeros(self._hidden, dtype=torch.float64))
        mapping = {site: PatchBank([patches[(n, v)][p].get(site, identity) for (n, v, p) in live], self._hidden,
                                   device=self._device) for site in sites}
        for site in self._sites:  # sites no live version patches any more are cleared explicitly
            mapping.setdefault(site, None)
        if not mapping:
            return None
        self._sites = sorted(mapping)
        return mapping

    # -- requests -------------------------------------------------------------------------------
    @contextmanager
    def request(self, name: str, *, key: Optional[str] = None, labels: Optional[dict] = None,
                patch: Optional[str] = None):
        """``with serving.request("tone", key=user, labels={...}) as served: model.generate(...)`` (batch 1)."""
        self.refresh()
        with self._lock:
            snap, handle = self._snap, self._handle
            choice = self.gov.resolve(name, key=key, labels=labels, patch=patch, snapshot=snap)
            if choice.version is not None and (name, choice.version) in self._broken:
                raise Unavailable(f"{name}@{choice.version} ({choice.arm}) cannot be served by this process: "
                                  f"{self._broken[(name, choice.version)]}. The request was refused rather than "
                                  "served unpatched; restore the blob or roll out another version")
            slot = self._slots[(name, choice.version, choice.patch)] if choice.version else -1
            pin = handle.pinned() if handle is not None else None
            use = handle.using(torch.tensor([slot])) if handle is not None and handle.engine.plan.entries \
                else None
            if pin is not None:
                pin.__enter__()  # pinned and chosen under the swap lock: slot ids match the pinned plan
            if use is not None:
                use.__enter__()
        served = Served(choice, slot, snap["generation"])
        try:
            yield served
        finally:
            if use is not None:
                use.__exit__(None, None, None)
            if pin is not None:
                pin.__exit__(None, None, None)
            self.monitor.count(name, choice.version, choice.arm, "requests", 1)
            if served.rows:
                self.monitor.count(name, choice.version, choice.arm, "rows", served.rows)
                if choice.version:
                    with self._lock:
                        k = (name, choice.version)
                        self._version_rows[k] = self._version_rows.get(k, 0) + served.rows

    def report(self, served: Served, metric: str, value: float) -> Optional[dict]:
        """An outcome metric of one request (counted, and checked against its band: may raise an alert)."""
        if metric in ("requests", "rows", "fires"):
            raise ValueError(f"{metric!r} is counted by the server; report outcome metrics under other names")
        self.monitor.add(served.choice.name, served.choice.version, served.choice.arm, metric, value)
        return self.gov.observe(served.choice, metric, value)

    # -- telemetry ------------------------------------------------------------------------------
    def flush(self) -> list:
        """Read the kernel fire counters (one host sync), write every counter to the store, check fire rates.

        Returns the alerts raised."""
        with self._lock:
            tracked = list(self._fires)
            self._fires = self._fires[-1:]  # older plans are no longer served: read them one last time
            rows = self._version_rows
            self._version_rows = {}
        fires_by_version: dict = {}
        for live, counters, last in tracked:
            for site, t in counters.items():
                now = t.tolist()
                before = last.get(site, [0] * len(now))
                last[site] = now
                for k, (n, v, p) in enumerate(live):
                    d = int(now[k]) - int(before[k])
                    if d:
                        fires_by_version[(n, v)] = fires_by_version.get((n, v), 0) + d
        for (n, v), d in fires_by_version.items():
            self.monitor.count(n, v, "all", "fires", d)
        self.gov.store.add_telemetry(self.monitor.drain())
        alerts = []
        snap = self._snap
        for (n, v), r in rows.items():
            rec = snap["sets"].get(n, {}).get("versions", {}).get(v)
            if rec and r:
                rate = fires_by_version.get((n, v), 0) / (r * len(rec["sites"]))
                a = self.gov.observe(Choice(n, v, "all", None), FIRE_RATE, rate)
                if a:
                    alerts.append(a)
        return alerts

    @property
    def handle(self):
        return self._handle

    @property
    def generation(self) -> Optional[int]:
        return None if self._snap is None else self._snap["generation"]

    def active(self) -> list:
        """(set, version, arm, weight %) for each version currently served."""
        out = []
        for name, s in (self._snap or {"sets": {}})["sets"].items():
            st = ro.normalise(s["rollout"])
            arms = [] if st["paused"] else st["arms"]
            if st["stable"]:
                out.append((name, st["stable"], ro.CONTROL, 100.0 - sum(a["weight"] for a in arms)))
            out += [(name, a["version"], a["arm"], a["weight"]) for a in arms]
        return out

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.remove()
                self._handle = None
