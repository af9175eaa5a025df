"""The control plane of patches in production: publish, roll out, contain, expire, audit, guard.

:class:`Governance` keeps all of its state in a :class:`~.store.Store` (by default
:class:`~.store.SQLiteStore`: SQLite WAL + content-addressed patch files), so a restart loses nothing
and several processes can share one store. Every change is audited with its actor in the same
transaction. Serving processes call :meth:`Governance.resolve` for each request (on a snapshot that
:meth:`sync` refreshes when the store's generation moves) to learn which version, arm and patch the
request gets: rollout (sticky canary / A/B arms), policy scope (labels) and expiry all decide there.

    >>> gov = Governance(SQLiteStore("/srv/patches"), actor="alice")
    >>> gov.create_set("tone", policy={"regions": ["eu"], "sites": ["layers.8.*"], "max_edit_norm": 40})
    >>> gov.publish("tone", "1.0.0", {"positive": {"layers.8.resid_post": Steer(v)}})
    >>> gov.activate("tone", "1.0.0"); gov.publish("tone", "1.1.0", {...}); gov.canary("tone", "1.1.0", 10)
    >>> gov.resolve("tone", key="user-42", labels={"region": "eu"})   # Choice(version=..., arm=...)
"""
from __future__ import annotations

import getpass
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..core.patches import CanonicalPatch, Patch, to_canonical
from ..files import patch_file
from . import policy as pol
from . import rollout as ro
from .registry import _check_patch_set, content_hash, parse_version
from .store import Store, StoreError
from .telemetry import Detector

# Names become parts of URLs, file names and Prometheus labels: a conservative alphabet, no '/', no '..'.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PATCH_FILE_BYTES = 64 << 20
GUARD_ACTIONS = ("pause", "abort", "rollback")


def check_name(name, what: str = "patch set name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} must be 1-64 characters of letters, digits, '_', '.', '-', starting "
                         "with a letter or digit, with no '/' or '..'")
    return name


def check_version(version) -> str:
    parse_version(version)  # raises ValueError with a clear message
    return version.strip()


@dataclass(frozen=True)
class Choice:
    """What one request gets from one patch set: ``version`` None means no patch (with ``reason``)."""

    name: str
    version: Optional[str]
    arm: str
    patch: Optional[str]
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}" if self.version else f"{self.name}@none"


class Governance:
    def __init__(self, store: Store, *, actor: Optional[str] = None, clock: Callable[[], float] = time.time,
                 max_patch_bytes: int = MAX_PATCH_FILE_BYTES, detector: Optional[Detector] = None):
        self.store = store
        self.actor = actor or _default_actor()
        self.clock = clock
        self.max_patch_bytes = int(max_patch_bytes)
        self.detector = detector or Detector(clock=clock)
        self._snap: Optional[dict] = None
        self._lock = threading.Lock()
        self._loaded: dict = {}  # blob digest -> {site: patch}
        self._expiry_audited: set = set()

    # -- reading --------------------------------------------------------------------------------
    def sync(self) -> dict:
        """The current snapshot; reloaded only when the store's generation moved (cheap to call often)."""
        gen = self.store.generation()
        with self._lock:
            snap = self._snap
        if snap is None or snap["generation"] != gen:
            snap = self.store.snapshot()
            with self._lock:
                if self._snap is None or snap["generation"] >= self._snap["generation"]:
                    self._snap = snap
        return snap

    def _set(self, name: str) -> dict:
        s = self.store.get_set(check_name(name))
        if s is None:
            raise KeyError(f"no patch set named {name!r}; known: {self.store.list_sets()}")
        return s

    def _version(self, name: str, version: str) -> dict:
        rec = self.store.get_version(check_name(name), check_version(version))
        if rec is None:
            self._set(name)  # an unknown set says so
            known = [v["version"] for v in self.store.list_versions(name)]
            raise KeyError(f"{name!r} has no version {version!r}; published: {known}")
        return rec

    def sets(self) -> list:
        return self.store.list_sets()

    def versions(self, name: str, *, now: Optional[float] = None) -> list:
        """Every version of ``name`` with its status: stable / arm:<name> / expired / published."""
        s = self._set(name)
        state = ro.normalise(s["rollout"])
        now = self.clock() if now is None else now
        out = []
        for rec in self.store.list_versions(name):
            v = rec["version"]
            if pol.is_expired(rec, now):
                status = "expired"
            elif v == state["stable"]:
                status = "stable"
            else:
                arms = [a["arm"] for a in state["arms"] if a["version"] == v]
                status = f"arm:{arms[0]}{' (paused)' if state['paused'] else ''}" if arms else "published"
            out.append(dict(rec, status=status))
        return out

    def show(self, name: str) -> dict:
        s = self._set(name)
        return {"name": name, "policy": s["policy"], "rollout": ro.normalise(s["rollout"]),
                "versions": self.versions(name)}

    def load(self, name: str, version: str) -> dict:
        """The patches of a version, ``{patch name: {site: patch}}``, read back from its patch files."""
        rec = self._version(name, version)
        return self._load_record(rec)

    def _load_record(self, rec: dict) -> dict:
        out = {}
        for pname, digest in rec["blobs"].items():
            if digest not in self._loaded:
                data = self.store.get_blob(digest)  # verifies the content hash; a file or a database row
                with tempfile.TemporaryDirectory() as tmp:  # the bytes just verified are the bytes loaded
                    path = Path(tmp) / f"blob-{digest[:12]}.safetensors"
                    path.write_bytes(data)
                    self._loaded[digest] = patch_file.load(path)
            out[pname] = self._loaded[digest]
        return out

    # -- patch sets and policy ------------------------------------------------------------------
    def create_set(self, name: str, *, policy: Optional[dict] = None, actor: Optional[str] = None) -> None:
        self.store.create_set(check_name(name), pol.check_policy(policy), actor=actor or self.actor)

    def set_policy(self, name: str, policy: dict, *, actor: Optional[str] = None) -> dict:
        new = pol.check_policy(policy)
        self._set(name)
        return self.store.update_set(name, "policy", lambda old: new, actor=actor or self.actor,
                                     action="policy", audit={"policy": new})

    def set_guard(self, name: str, action: Optional[str], *, bands: Optional[dict] = None,
                  actor: Optional[str] = None) -> dict:
        """The automatic response to an alert on ``name`` (None: alert only) and its metric bands."""
        if action is not None and action not in GUARD_ACTIONS:
            raise ValueError(f"guard action must be one of {GUARD_ACTIONS} or None, got {action!r}")
        bands = {} if bands is None else dict(bands)
        for metric, band in bands.items():
            if (not isinstance(band, (list, tuple)) or len(band) != 2 or not all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in band) or band[0] > band[1]):
                raise ValueError(f"band for {metric!r} must be [lo, hi] finite with lo <= hi, got {band!r}")

        def mutate(state):
            s = ro.normalise(state)
            s["guard"] = action
            s["bands"] = {m: [float(b[0]), float(b[1])] for m, b in bands.items()}
            return s

        return self._rollout(name, mutate, "guard", actor, {"guard": action, "bands": bands})

    # -- publishing -----------------------------------------------------------------------------
    def publish(self, name: str, version: str, patches: dict, *, expires_at: Optional[float] = None,
                note: Optional[str] = None, actor: Optional[str] = None, model=None) -> dict:
        """Store an immutable version. ``patches``: ``{patch name: {site: patch}}`` or ``{patch name: path of
        a fastpatch .safetensors file}``. Refused (nothing stored) if a name or version is malformed, a
        file is oversized or invalid, the policy forbids the patches, or the version is not the newest."""
        check_name(name)
        version = check_version(version)
        if not isinstance(patches, dict) or not patches:
            raise ValueError("a patch set is a non-empty {patch name: {site: patch}} dict")
        if expires_at is not None and (isinstance(expires_at, bool) or not isinstance(expires_at, (int, float))
                                       or not math.isfinite(expires_at)):
            raise ValueError(f"expires_at must be UNIX seconds, got {expires_at!r}")
        if note is not None and (not isinstance(note, str) or len(note) > 4096):
            raise ValueError("note must be a string of at most 4096 characters")
        loaded = {}
        fitted_on = {}  # pname -> the model fingerprint its uploaded file records (kept in the stored file)
        for pname, value in patches.items():
            check_name(pname, "patch name")
            if isinstance(value, (str, Path)):
                loaded[pname] = self._read_file(pname, value, model)
                fitted_on[pname] = patch_file.read_manifest(value)[0].get("model")
            else:
                loaded[pname] = value
        loaded = _check_patch_set(loaded)
        for pname, sites in loaded.items():
            for site, p in sites.items():
                c = to_canonical(p)
                if not all(bool(t.isfinite().all()) for t in (c.down, c.bias, c.up, c.shift)):
                    raise ValueError(f"{pname} at {site}: non-finite (NaN or inf) parameters")
        if self.store.get_set(name) is None:
            self.create_set(name, actor=actor)
        policy = pol.check_policy(self.store.get_set(name)["policy"])
        problems = pol.violations(policy, loaded)
        if problems:
            raise pol.PolicyViolation(f"{name}@{version} violates its policy: " + "; ".join(problems))
        blobs = {}
        with tempfile.TemporaryDirectory() as tmp:
            for pname, sites in loaded.items():
                path = patch_file.save(sites, Path(tmp) / f"{pname}.safetensors", name=pname, version=version,
                                       author=actor or self.actor,
                                       model=model if model is not None else fitted_on.get(pname))
                data = path.read_bytes()
                if len(data) > self.max_patch_bytes:
                    raise ValueError(f"{pname}: the patch file would be {len(data)} bytes, over the limit of "
                                     f"{self.max_patch_bytes}")
                blobs[pname] = data
        digests = {pname: self.store.put_blob(data) for pname, data in blobs.items()}  # before the commit
        hidden = {to_canonical(p).hidden_size for m in loaded.values() for p in m.values()}.pop()
        record = {"blobs": digests, "content_hash": content_hash(loaded), "hidden_size": hidden,
                  "sites": sorted({s for m in loaded.values() for s in m}), "patches": sorted(loaded),
                  "expires_at": None if expires_at is None else float(expires_at), "note": note}
        self.store.add_version(name, version, list(_sort_key(version)), record, actor=actor or self.actor,
                               audit={"content_hash": record["content_hash"], "patches": record["patches"],
                                      "sites": record["sites"], "expires_at": record["expires_at"]})
        return self._version(name, version)

    def _read_file(self, pname: str, path, model) -> dict:
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ValueError(f"{pname}: cannot read {path}: {exc.strerror}") from None
        if size > self.max_patch_bytes:
            raise ValueError(f"{pname}: {path} is {size} bytes, over the limit of {self.max_patch_bytes}")
        mapping = patch_file.load(path, model=model)  # PatchFileError on any defect (NaN, truncation, ...)
        for site, p in mapping.items():
            if not isinstance(p, (Patch, CanonicalPatch)):
                raise ValueError(f"{pname}: {path} holds a {type(p).__name__} at {site}; a published patch has "
                                 "one patch per site (publish each patch of a bank under its own name)")
        return mapping

    # -- rollout --------------------------------------------------------------------------------
    def _servable(self, name: str, version: str) -> dict:
        rec = self._version(name, version)
        if pol.is_expired(rec, self.clock()):
            raise ValueError(f"{name}@{version} expired; publish a new version")
        return rec

    def _rollout(self, name, mutate, action, actor, audit) -> dict:
        self._set(name)
        return self.store.update_set(name, "rollout", mutate, actor=actor or self.actor, action=action,
                                     audit=audit)

    def activate(self, name: str, version: str, *, actor: Optional[str] = None) -> dict:
        """Serve ``version`` to everyone outside the running arms (the stable version)."""
        rec = self._servable(name, version)
        return self._rollout(name, lambda s: ro.activate(s, version), "activate", actor,
                             {"version": version, "content_hash": rec["content_hash"]})

    def canary(self, name: str, version: str, percent: float, *, actor: Optional[str] = None) -> dict:
        """Sticky percentage rollout of ``version``; raising ``percent`` keeps every key already in."""
        self._servable(name, version)
        return self._rollout(name, lambda s: ro.canary(s, version, percent), "rollout", actor,
                             {"version": version, "percent": percent})

    def experiment(self, name: str, arms: dict, *, actor: Optional[str] = None) -> dict:
        """A/B/n arms ``{arm: (version, weight percent)}``; the rest of the keys get the stable version."""
        for arm, (version, _w) in arms.items():
            self._servable(name, version)
        return self._rollout(name, lambda s: ro.experiment(s, arms), "experiment", actor,
                             {"arms": {a: list(v) for a, v in arms.items()}})

    def promote(self, name: str, arm: Optional[str] = None, *, actor: Optional[str] = None) -> dict:
        state = ro.normalise(self._set(name)["rollout"])
        for a in state["arms"]:
            if arm in (None, a["arm"]):
                self._servable(name, a["version"])
        return self._rollout(name, lambda s: ro.promote(s, arm), "promote", actor, {"arm": arm})

    def abort(self, name: str, *, actor: Optional[str] = None, reason: Optional[str] = None) -> dict:
        return self._rollout(name, ro.abort, "abort", actor, {"reason": reason})

    def pause(self, name: str, *, actor: Optional[str] = None, reason: Optional[str] = None) -> dict:
        return self._rollout(name, ro.pause, "pause", actor, {"reason": reason})

    def resume(self, name: str, *, actor: Optional[str] = None) -> dict:
        return self._rollout(name, ro.resume, "resume", actor, {})

    def rollback(self, name: str, *, actor: Optional[str] = None, reason: Optional[str] = None) -> dict:
        return self._rollout(name, ro.rollback, "rollback", actor, {"reason": reason})

    def expire(self, name: str, version: str, *, at: Optional[float] = None, actor: Optional[str] = None) -> dict:
        """Give ``version`` an expiry (default: now). From that instant on it is not served."""
        at = self.clock() if at is None else at
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise ValueError(f"expiry must be UNIX seconds, got {at!r}")
        self._version(name, version)
        return self.store.update_version(name, version, lambda r: dict(r, expires_at=float(at)),
                                         actor=actor or self.actor, action="expire", audit={"expires_at": float(at)})

    # -- serving decisions ----------------------------------------------------------------------
    def resolve(self, name: str, *, key: Optional[str] = None, labels: Optional[dict] = None,
                patch: Optional[str] = None, snapshot: Optional[dict] = None, now: Optional[float] = None,
                rng=None) -> Choice:
        """Which version / arm / patch of ``name`` a request gets (version None: no patch, and why)."""
        labels = pol.check_labels(labels)
        if key is not None and (not isinstance(key, str) or len(key) > 256):
            raise ValueError("the stickiness key must be a string of at most 256 characters")
        snap = snapshot or self.sync()
        s = snap["sets"].get(name)
        if s is None:
            raise KeyError(f"no patch set named {name!r}; known: {sorted(snap['sets'])}")
        ok, why = pol.allows(s["policy"], labels)
        if not ok:
            return Choice(name, None, ro.CONTROL, None, f"out of scope: {why}")
        state = ro.normalise(s["rollout"])
        arm, version = ro.assign(state, name, key, rng)
        now = self.clock() if now is None else now
        reason = ""
        if version is not None and pol.is_expired(s["versions"][version], now):
            self._audit_expiry(name, version, s["versions"][version])
            reason = f"{name}@{version} expired"
            arm, version = ("fallback", state["stable"]) if arm != ro.CONTROL else (arm, None)
            if version is not None and pol.is_expired(s["versions"][version], now):
                self._audit_expiry(name, version, s["versions"][version])
                reason += f"; the stable {name}@{version} expired too"
                version = None
        if version is None:
            return Choice(name, None, arm, None, reason or "nothing is served")
        rec = s["versions"][version]
        if patch is None:
            if len(rec["patches"]) != 1:
                raise ValueError(f"{name}@{version} has patches {rec['patches']}: name the one to apply")
            patch = rec["patches"][0]
        elif patch not in rec["patches"]:
            return Choice(name, None, arm, None, f"{name}@{version} has no patch {patch!r}")
        return Choice(name, version, arm, patch, reason)

    def _audit_expiry(self, name: str, version: str, rec: dict) -> None:
        """Audit the first time an expired version is not served (once per version, across processes)."""
        if (name, version) in self._expiry_audited or rec.get("expiry_audited"):
            return

        class _Done(Exception):
            pass

        def mutate(r):
            if r.get("expiry_audited"):
                raise _Done
            return dict(r, expiry_audited=True)

        try:
            self.store.update_version(name, version, mutate, actor="expiry", action="expired",
                                      audit={"expires_at": rec.get("expires_at")})
        except _Done:
            pass
        self._expiry_audited.add((name, version))

    # -- monitoring -----------------------------------------------------------------------------
    def observe(self, choice: Choice, metric: str, value: float) -> Optional[dict]:
        """Feed one observation to the anomaly detector; on an alert, store it and run the guard.

        The set's bands are read from the current snapshot (``sync``: one generation read, a reload only when
        the store changed), so a guard set after traffic began applies from the next window on."""
        snap = self.sync()
        s = snap["sets"].get(choice.name, {})
        # The operator's bands (set_guard, in the store) win over learnt ones; a removed band stops applying.
        self.detector.replace_bands(choice.name, {m: (b[0], b[1]) for m, b in
                                                  ro.normalise(s.get("rollout")).get("bands", {}).items()})
        alert = self.detector.observe(choice.name, choice.version, choice.arm, metric, value)
        if alert is not None:
            alert = self.raise_alert(alert)  # the stored alert: with its id and the guard that ran
        return alert

    def raise_alert(self, alert: dict) -> dict:
        name = alert["name"]
        guard = ro.normalise((self.store.get_set(name) or {}).get("rollout")).get("guard")
        alert = dict(alert, guard=guard)
        stored = self.store.add_alert(alert)
        why = (f"{alert['metric']} window mean {alert['window_mean']:.4g} outside "
               f"[{alert['band'][0]:.4g}, {alert['band'][1]:.4g}] on arm {alert['arm']}")
        state = ro.normalise(self._set(name)["rollout"])
        try:
            if guard == "rollback" and alert["arm"] == ro.CONTROL and state["history"]:
                self.rollback(name, actor="guard", reason=why)
            elif guard in ("pause", "abort", "rollback") and state["arms"] and not state["paused"]:
                (self.pause if guard == "pause" else self.abort)(name, actor="guard", reason=why)
        except (ValueError, StoreError):
            pass  # another replica's guard acted first
        return stored

    def audit(self, name: Optional[str] = None, *, since: int = 0) -> list:
        return self.store.audit(name=name, since=since)

    def alerts(self, name: Optional[str] = None) -> list:
        return self.store.alerts(name=name)


def _sort_key(version: str) -> list:
    """parse_version as JSON-comparable lists (tuples do not survive JSON)."""
    def conv(x):
        return [conv(i) for i in x] if isinstance(x, tuple) else x
    return conv(parse_version(version))


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return os.environ.get("USER", "unknown")
