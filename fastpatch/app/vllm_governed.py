"""Governed patch sets served inside vLLM: the bridge between :class:`fastpatch.lifecycle.governance.Governance`
and the vLLM plugin's front end (``fastpatch.integrations.vllm.frontend``), which only offers the extension
point: this module sits above both, so neither layer imports the other.

An engine started with ``additional_config={"fastpatch": {"store": "<folder or postgresql:// URL>",
"patch_sets": ["support-tone"], "spare_slots": 4, "sites": [...]}}`` (and the worker extension) gets a
:class:`GovernedBridge` (registered by the ``fastpatch_governed`` ``vllm.general_plugins`` entry point; the
engine refuses to start without it). Per request (``extra_args={"fastpatch": {"set": ..., "key": ...,
"labels": {...}, "patch": optional}}``, ``vllm_xargs`` on the server):

- the bridge resolves the set through the rollout (sticky canary / A/B arms), policy scope and expiry on one
  snapshot of the store (:meth:`Governance.resolve` with ``snapshot=``), the snapshot whose live versions are
  all loaded in slots; the request runs with the slot ``set@version/patch`` to its end (the slot is freed only
  when no request holds it and no request can get it any more). "No patch" (outside the canary with no stable
  version, out of scope, expired) is served unpatched on purpose and reported so; an unknown set, bad labels or
  a version this engine cannot load is refused (HTTP 400), never served unpatched;
- what it served (set, version, arm, patch, reason, store generation) is kept per request id:
  :func:`served` (offline ``LLM``) and the ``X-Fastpatch-Served`` / ``X-Fastpatch-Generation`` headers
  (server responses, streamed or not; the generation names the store state the request was resolved on: the
  audit entries up to it replay that state);
- counters per set / version / arm (requests, prompt and output tokens, latency) go to vLLM's ``/metrics``
  (prometheus_client's registry), to the store's telemetry, and to the audit log (``served`` entries with the
  request counts); each request's latency is observed by the governance detector, so an alert and the set's
  guard (pause / abort / rollback) act while the engine serves.

The store is polled every ``poll_interval`` seconds (its generation: one indexed read): a publish, canary,
promote, abort, expiry or guard action loads and frees slots without a restart or a recompile (slot rows are
written in place). ``LLM`` / ``LLMEngine``: the poll runs in the thread that adds requests (vLLM's synchronous
engine client is not thread-safe); ``AsyncLLM`` (the server): a background thread, whose worker calls go
through the event loop.

Admin: the ``fastpatch_governed`` ``vllm.endpoint_plugins`` entry point mounts ``fastpatch.app.admin_server``'s
routes over the engine's store under ``/fastpatch/v1/...`` and ``/fastpatch/metrics`` (the same tokens file,
``FASTPATCH_TOKENS``, roles, audit and errors: :func:`fastpatch.app.admin_server.handle`). See docs/serving.md.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..integrations.vllm import frontend as fe
from ..integrations.vllm.compat import refuse
from ..lifecycle import rollout as ro
from ..lifecycle.governance import Choice, Governance
from ..lifecycle.policy import is_expired
from ..lifecycle.store import StoreError
from ..lifecycle.stores import open_store
from ..lifecycle.telemetry import Detector, Monitor

logger = logging.getLogger("fastpatch.vllm.governed")

LATENCY = "latency_s"  # the metric each finished request reports to the governance detector
TOKENS_ENV = "FASTPATCH_TOKENS"  # the admin routes' tokens file (fastpatch.app.admin_server.load_tokens format)
HEADER = "X-Fastpatch-Served"
GENERATION_HEADER = "X-Fastpatch-Generation"  # the store generation each prompt was resolved at (comma-separated)
SECTION_KEYS = ("set", "key", "labels", "patch")
MAX_REPORTS = 100_000  # per-request reports kept for served() / the response header
FLUSH_S = 5.0  # seconds between telemetry / audit flushes to the store
ORPHAN_S = 120.0  # a resolved request the output processor never showed is dropped after this long

_BRIDGES: "weakref.WeakSet" = weakref.WeakSet()
_COLLECTOR = []


def register() -> None:
    """The ``fastpatch_governed`` ``vllm.general_plugins`` entry point (every vLLM process; never raises)."""
    fe.register_bridge("governed", GovernedBridge)


@dataclass
class _Flight:
    choice: Choice
    slot: Optional[str]
    t0: float
    seen: bool = False


class GovernedBridge:
    """The resolver of one engine's governed patch sets (built by the front end when the engine exists)."""

    @property
    def engine(self):
        return self._engine()

    def __init__(self, front, engine, governed):
        self.front, self.conf = front, governed
        self._engine = weakref.ref(engine)  # weakly, like the front end: the engine owns this bridge
        try:
            store = open_store(governed.store, create=False)
        except StoreError as exc:
            raise refuse(f"the patch store {governed.store!r} cannot be opened ({exc})") from None
        # latency alerts only against a band the operator gave (set_guard): learnt ones would follow the load
        self.gov = Governance(store, actor="vllm", detector=Detector(given_only={LATENCY}))
        snap = self.gov.sync()
        missing = [s for s in governed.patch_sets if s not in snap["sets"]]
        if missing:
            raise refuse(f"patch set(s) {missing} are not in the store {governed.store!r} (it has "
                         f"{sorted(snap['sets'])}); create them first (fastpatch.lifecycle.Governance.create_set)")
        self.folder = Path(tempfile.mkdtemp(prefix="fastpatch_governed_"))
        self._lock = threading.RLock()  # snapshot, slots, refs, in-flight requests, counters
        self._refresh_lock = threading.Lock()
        self.snap: Optional[dict] = None
        self.live: set = set()
        self.slots: dict = {}  # (set, version, patch) -> loaded slot name
        self.broken: dict = {}  # (set, version) -> why it cannot be loaded
        self._alerted: set = set()
        self.refs: collections.Counter = collections.Counter()  # slot name -> requests holding it
        self.inflight: dict = {}  # request id -> _Flight
        self.reports: collections.OrderedDict = collections.OrderedDict()
        self.counters: dict = collections.defaultdict(float)  # (metric, set, version, arm[, kind]) -> value
        self.alerts = 0
        self.monitor = Monitor()
        self._served: collections.Counter = collections.Counter()  # (set, version, arm) -> requests since audit
        self._pending: list = []  # (choice, latency) not yet observed by the detector
        self._last_poll = 0.0
        self._last_flush = time.monotonic()
        self.slot_keys: dict = {}  # slot name -> (set, version, patch), every slot this bridge ever loaded
        self.arms: dict = {}  # (set, version) -> its arm in the rollout at the last poll that had it
        self._fires_seen: dict = {}  # slot name -> {site: cumulative fire count at the last read}
        self.ready = threading.Event()
        self.is_async = asyncio.iscoroutinefunction(getattr(engine, "collective_rpc", None))
        self._stop = threading.Event()
        if self.is_async:
            try:
                self.loop = asyncio.get_running_loop()
            except RuntimeError:
                raise refuse("an AsyncLLM serving governed patch sets must be built inside a running event loop "
                             "(its worker calls go through that loop)") from None
            self.thread = threading.Thread(target=self._poll_forever, name="fastpatch-governed", daemon=True)
            self.thread.start()
        else:
            self.refresh(force=True)
        _BRIDGES.add(self)
        _ensure_collector()

    # -- worker calls -----------------------------------------------------------------------------
    def _rpc(self, method: str, *args):
        if self.is_async:
            fut = asyncio.run_coroutine_threadsafe(self.engine.collective_rpc(method, args=args), self.loop)
            return fut.result(timeout=300)[0]
        return self.engine.collective_rpc(method, args=args)[0]

    # -- keeping up with the store ----------------------------------------------------------------
    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh(force=True)
            except Exception:  # noqa: BLE001 - keep polling; the log names the failure
                logger.exception("fastpatch: refreshing the governed patch sets failed")
            self._stop.wait(max(self.conf.poll_interval, 0.05))

    def close(self) -> None:
        self._stop.set()

    def _live(self, snap: dict) -> set:
        now = self.gov.clock()
        out = set()
        for name in self.conf.patch_sets:
            s = snap["sets"].get(name)
            if s is None:
                continue
            for v in ro.versions_in_use(s["rollout"]):
                rec = s["versions"].get(v)
                if rec is not None and not is_expired(rec, now):
                    out.update((name, v, p) for p in rec["patches"])
        return out

    def refresh(self, *, force: bool = False) -> bool:
        """Observe finished requests, re-read the store if it moved, load new live versions, free dead ones.
        Returns True when it ran (not rate-limited)."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.conf.poll_interval:
            return False
        with self._refresh_lock:
            self._last_poll = now
            self._observe_pending()  # an alert's guard acts on the store before the sync below
            snap = self.gov.sync()
            live = self._live(snap)
            self._prune()
            self._release(live | self.live)  # room first; a request may still resolve on the old snapshot
            for key in sorted(live):
                if key not in self.slots:
                    self._load(snap, key)
            with self._lock:
                self.snap, self.live = snap, live
            self._release(live)
            self._read_fires(snap)
            self._alert_broken()
            self._flush(force=False)
            self.ready.set()
            return True

    def _load(self, snap: dict, key: tuple) -> None:
        name, version, patch = key
        rec = snap["sets"][name]["versions"][version]
        slot = f"{name}@{version}/{patch}"
        try:
            digest = rec["blobs"][patch]
            path = self.folder / f"{digest}.safetensors"
            if not path.exists():
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(self.gov.store.get_blob(digest))  # verified against its content hash
                os.replace(tmp, path)
            self._rpc("fastpatch_load", slot, str(path))  # every worker reads and checks the file
        except Exception as exc:  # noqa: BLE001 - a bad blob, a rank / site outside the slots: this version only
            why = " ".join(f"{type(exc).__name__}: {exc}".split())
            with self._lock:
                self.broken[(name, version)] = why
            logger.error("fastpatch: %s cannot be loaded into a slot: %s", slot, why)
            return
        self.front.loaded(slot, str(path))
        with self._lock:
            self.slots[key] = slot
            self.slot_keys[slot] = key
            self.broken.pop((name, version), None)
        logger.info("fastpatch: %s loaded (store generation %s)", slot, snap["generation"])

    def _release(self, keep: set) -> None:
        with self._lock:
            gone = [k for k, slot in self.slots.items() if k not in keep and self.refs[slot] <= 0]
            slots = [self.slots.pop(k) for k in gone]
            for k in list(self.broken):
                if not any((k[0], k[1]) == (n, v) for n, v, _p in keep):
                    del self.broken[k]
        for slot in slots:
            self.front.unloaded(slot)
            self._rpc("fastpatch_unload", slot)
            self.refs.pop(slot, None)
            logger.info("fastpatch: %s freed (no request can get it any more)", slot)

    def _read_fires(self, snap: dict) -> None:
        """Fire counts (the worker extension's cumulative per-slot totals, an unloaded slot's included): the
        deltas since the last read go to the ``fires`` counters, labelled with each version's current arm."""
        for name in self.conf.patch_sets:
            s = snap["sets"].get(name)
            if s is None:
                continue
            st = ro.normalise(s["rollout"])
            arms = [(st["stable"], ro.CONTROL)] + [(a["version"], a["arm"]) for a in st["arms"]]
            for version, arm in reversed(arms):  # a version both stable and in an arm: control
                if version:
                    self.arms[(name, version)] = arm
        counts = self._rpc("fastpatch_fire_counts")
        with self._lock:
            for slot, sites in counts.items():
                key = self.slot_keys.get(slot)
                if key is None:  # not one of this bridge's slots
                    continue
                seen = self._fires_seen.setdefault(slot, {})
                arm = self.arms.get(key[:2], "none")
                for site, n in sites.items():
                    delta = n - seen.get(site, 0)
                    seen[site] = n
                    if delta > 0:
                        self.counters[("fires", *key[:2], arm, key[2], site)] += delta

    def _alert_broken(self) -> None:
        with self._lock:
            broken = dict(self.broken)
        for (name, version), why in sorted(broken.items()):
            if (name, version, why) in self._alerted:
                continue
            self._alerted.add((name, version, why))
            self.gov.store.add_alert({
                "kind": "unavailable", "name": name, "version": version, "arm": "all", "metric": "patch_files",
                "actor": "vllm", "ts": self.gov.clock(),
                "error": f"{name}@{version} is not served by this vLLM engine: {why}; its requests are refused"})

    def _prune(self) -> None:
        """Requests the output processor no longer tracks (aborted) stop holding their slots."""
        ids = fe.live_request_ids(self.engine)
        if ids is None:
            return
        now = time.monotonic()
        with self._lock:
            for rid, f in list(self.inflight.items()):
                if rid in ids:
                    f.seen = True
                elif f.seen or now - f.t0 > ORPHAN_S:
                    self._drop(rid)

    def _drop(self, request_id: str) -> Optional[_Flight]:
        f = self.inflight.pop(request_id, None)
        if f is not None and f.slot is not None:
            self.refs[f.slot] -= 1
        return f

    # -- requests (the front end's resolver) ------------------------------------------------------
    def resolve(self, request_id: str, section: dict) -> Optional[str]:
        unknown = sorted(set(section) - set(SECTION_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the request's fastpatch section; known: "
                             f"{list(SECTION_KEYS)}")
        name = section.get("set")
        if not isinstance(name, str) or not name:
            raise ValueError(f"the fastpatch section names the patch set under 'set' (a string), got {name!r}")
        if name not in self.conf.patch_sets:
            raise KeyError(f"unknown patch set {name!r}; this engine serves {list(self.conf.patch_sets)}")
        if not self.is_async:
            self.refresh()
        elif not self.ready.wait(timeout=60):
            raise ValueError("the governed patch sets are not loaded yet (the store could not be read); try again")
        with self._lock:
            snap = self.snap
            choice = self.gov.resolve(name, key=section.get("key"), labels=section.get("labels"),
                                      patch=section.get("patch"), snapshot=snap)
            slot = None
            if choice.version is not None:
                slot = self.slots.get((name, choice.version, choice.patch))
                if slot is None:
                    why = self.broken.get((name, choice.version), "it is not loaded in this engine")
                    raise ValueError(f"{name}@{choice.version} ({choice.arm}) cannot be served here: {why}. The "
                                     "request is refused rather than served unpatched")
                self.refs[slot] += 1
            self.inflight[request_id] = _Flight(choice, slot, time.monotonic())
            self.reports[request_id] = {"set": name, "version": choice.version, "arm": choice.arm,
                                        "patch": choice.patch, "reason": choice.reason,
                                        "generation": snap["generation"]}
            while len(self.reports) > MAX_REPORTS:
                self.reports.popitem(last=False)
        return slot

    def released(self, request_id: str) -> None:
        with self._lock:
            self._drop(request_id)
            self.reports.pop(request_id, None)

    def finished(self, request_id: str, prompt_tokens: int, output_tokens: int) -> None:
        with self._lock:
            f = self._drop(request_id)
            if f is None:
                return
            c = f.choice
            latency = time.monotonic() - f.t0
            lab = (c.name, c.version or "none", c.arm)
            self.counters[("requests", *lab)] += 1
            self.counters[("tokens", *lab, "prompt")] += prompt_tokens
            self.counters[("tokens", *lab, "output")] += output_tokens
            self.counters[("latency_sum", *lab)] += latency
            self._served[lab] += 1
            self._pending.append((c, latency))
        self.monitor.count(c.name, c.version, c.arm, "requests", 1)
        self.monitor.count(c.name, c.version, c.arm, "tokens", prompt_tokens + output_tokens)
        self.monitor.add(c.name, c.version, c.arm, LATENCY, latency)

    def report(self, request_id: str) -> Optional[dict]:
        with self._lock:
            r = self.reports.get(request_id)
            return None if r is None else dict(r)

    def reports_for(self, base_id: str) -> list:
        """The reports of a server request (``chatcmpl-<id>``, or ``cmpl-<id>-<i>`` per prompt)."""
        with self._lock:
            if f"chatcmpl-{base_id}" in self.reports:
                return [dict(self.reports[f"chatcmpl-{base_id}"])]
            out, i = [], 0
            while f"cmpl-{base_id}-{i}" in self.reports:
                out.append(dict(self.reports[f"cmpl-{base_id}-{i}"]))
                i += 1
            return out

    # -- telemetry, alerts, guard, audit ----------------------------------------------------------
    def _observe_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for choice, latency in pending:
            if self.gov.observe(choice, LATENCY, latency) is not None:  # stored; the set's guard acted
                with self._lock:
                    self.alerts += 1

    def _flush(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_S:
            return
        self._last_flush = now
        rows = self.monitor.drain()
        if rows:
            self.gov.store.add_telemetry(rows)
        with self._lock:
            served, self._served = self._served, collections.Counter()
        for (name, version, arm), n in sorted(served.items()):
            self.gov.store.append_audit("vllm", "served", {"name": name, "version": version, "arm": arm,
                                                           "requests": n})

    def flush(self) -> None:
        """Observe finished requests (alerts, guard) and write telemetry and ``served`` audit entries now."""
        with self._refresh_lock:
            self._observe_pending()
            self._flush(force=True)

    def metrics(self) -> list:
        """prometheus_client metric families of this engine's governed sets."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        lab = ["set", "version", "arm"]
        req = CounterMetricFamily("fastpatch_requests", "Requests served per patch set version and arm (finished)",
                                  labels=lab)
        tok = CounterMetricFamily("fastpatch_tokens", "Tokens per patch set version and arm (kind: prompt, output)",
                                  labels=lab + ["kind"])
        lat = SummaryMetricFamily("fastpatch_request_latency_seconds", "Request latency (resolve to finish) per "
                                  "patch set version and arm", labels=lab)
        active = GaugeMetricFamily("fastpatch_active_version", "Percent of request keys each served version gets, "
                                   "per arm (control: the stable version's share; an expired version's keys show "
                                   "where they go: version none, or arm fallback)", labels=lab)
        loaded = GaugeMetricFamily("fastpatch_version_loaded", "1 per version in a slot of this engine",
                                   labels=["set", "version", "patch"])
        unavailable = GaugeMetricFamily("fastpatch_version_unavailable", "1 per live version this engine cannot "
                                        "load (its requests are refused)", labels=["set", "version"])
        alerts = CounterMetricFamily("fastpatch_alerts", "Anomaly alerts raised by this engine's observations")
        fires = CounterMetricFamily("fastpatch_fires", "Token rows each version's patch applied to per site (its "
                                    "gate fired, or it has none), counted by the kernels; read at each store poll; "
                                    "arm: the version's arm at that poll", labels=lab + ["patch", "site"])
        with self._lock:
            counters = dict(self.counters)
            slots, broken, snap, n_alerts = dict(self.slots), dict(self.broken), self.snap, self.alerts
        for key, v in sorted(counters.items()):
            if key[0] == "requests":
                req.add_metric(list(key[1:]), v)
                lat.add_metric(list(key[1:]), count_value=v, sum_value=counters.get(("latency_sum", *key[1:]), 0.0))
            elif key[0] == "tokens":
                tok.add_metric(list(key[1:]), v)
            elif key[0] == "fires":
                fires.add_metric(list(key[1:]), v)
        for name in self.conf.patch_sets:
            s = (snap or {"sets": {}})["sets"].get(name)
            if s is None:
                continue
            st = ro.normalise(s["rollout"])
            arms = [] if st["paused"] else st["arms"]
            now = self.gov.clock()

            def served_as(version):  # what resolve serves for a version: None once it expired
                rec = s["versions"].get(version)
                return version if rec is None or not is_expired(rec, now) else None

            stable = served_as(st["stable"]) if st["stable"] else None
            if st["stable"]:
                active.add_metric([name, stable or "none", ro.CONTROL], 100.0 - sum(a["weight"] for a in arms))
            for a in arms:
                v = served_as(a["version"])
                if v is None:  # an expired arm's keys fall back to the stable version (or nothing)
                    active.add_metric([name, stable or "none", "fallback"], a["weight"])
                else:
                    active.add_metric([name, v, a["arm"]], a["weight"])
        for (name, version, patch) in sorted(slots):
            loaded.add_metric([name, version, patch], 1)
        for (name, version) in sorted(broken):
            unavailable.add_metric([name, version], 1)
        alerts.add_metric([], n_alerts)
        return [req, tok, lat, active, loaded, unavailable, alerts, fires]


class _Collector:
    """One prometheus_client collector for every live bridge of this process (vLLM's /metrics registry)."""

    def collect(self):
        families: dict = {}
        for bridge in list(_BRIDGES):
            for fam in bridge.metrics():
                if fam.name in families:
                    families[fam.name].samples.extend(fam.samples)
                else:
                    families[fam.name] = fam
        yield from families.values()


def _ensure_collector() -> None:
    if _COLLECTOR:
        return
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        registry = get_prometheus_registry()
    except Exception:  # noqa: BLE001 - an older layout: the default registry is the one vLLM serves
        from prometheus_client import REGISTRY as registry
    collector = _Collector()
    registry.register(collector)
    _COLLECTOR.append((registry, collector))


def bridge_of(llm) -> GovernedBridge:
    """The bridge of an ``LLM`` / ``LLMEngine`` / ``AsyncLLM`` that serves governed patch sets."""
    engine = getattr(llm, "llm_engine", llm)
    front = fe.front_of(engine.input_processor)
    if front is None or front.resolver is None:
        raise RuntimeError("this engine serves no governed patch sets (additional_config['fastpatch'] has no store)")
    return front.resolver


def served(llm, request_id: str) -> Optional[dict]:
    """What request ``request_id`` (``RequestOutput.request_id``) was served: {set, version, arm, patch,
    reason, generation}; version None = unpatched on purpose (reason says why)."""
    return bridge_of(llm).report(request_id)


def header_value(reports: list) -> str:
    return ", ".join(f"{r['set']}@{r['version'] or 'none'}{'/' + r['patch'] if r['patch'] else ''} ({r['arm']})"
                     for r in reports)


class GovernedEndpoints:
    """The ``fastpatch_governed`` ``vllm.endpoint_plugins`` entry point: the governance admin API over the
    engine's store (``/fastpatch/v1/...``, ``/fastpatch/metrics``) and the ``X-Fastpatch-Served`` /
    ``X-Fastpatch-Generation`` headers."""

    name = "fastpatch_governed"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine = None
        self._admin = None

    def bridge(self) -> Optional[GovernedBridge]:
        front = fe.front_of(self.engine.input_processor) if self.engine is not None else None
        return None if front is None else front.resolver

    def admin(self):
        from .admin_server import AdminServer, HTTPError, load_tokens

        bridge = self.bridge()
        if bridge is None:
            raise HTTPError(409, "this engine serves no governed patch sets (additional_config['fastpatch'] has no "
                                 "'store')")
        path = os.environ.get(TOKENS_ENV)
        if not path:
            raise HTTPError(403, f"the governance routes are off: start the server with {TOKENS_ENV} naming a "
                                 "tokens file ({'tokens': {secret: {'actor': ..., 'role': 'read'|'admin'}}})")
        if self._admin is None or self._admin.gov is not bridge.gov:
            self._admin = AdminServer(bridge.gov, load_tokens(path))
        return self._admin

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import JSONResponse, Response

        from .admin_server import HTTPError, handle

        plugin = self
        router = APIRouter()

        async def route(request: Request, admin_path: str):
            from urllib.parse import parse_qs

            try:
                admin = plugin.admin()
            except HTTPError as exc:
                return JSONResponse({"error": str(exc)}, exc.status)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > admin.max_body:
                return JSONResponse({"error": f"body of {length} bytes is over the limit of {admin.max_body}"}, 413)
            body = await request.body() if request.method == "POST" else b""
            status, payload, headers = await asyncio.to_thread(
                handle, admin, request.method, admin_path, parse_qs(request.url.query),
                request.headers.get("authorization"), lambda: body)
            if isinstance(payload, str):
                return Response(payload, status, headers, media_type="text/plain; version=0.0.4; charset=utf-8")
            return JSONResponse(payload, status, headers)

        async def v1(path: str, request: Request):
            return await route(request, f"/v1/{path}")

        async def metrics(request: Request):
            return await route(request, "/metrics")

        # This module has `from __future__ import annotations`: FastAPI needs the real classes to see `request`.
        v1.__annotations__ = {"path": str, "request": Request}
        metrics.__annotations__ = {"request": Request}
        router.add_api_route("/fastpatch/v1/{path:path}", v1, methods=["GET", "POST"])
        router.add_api_route("/fastpatch/metrics", metrics, methods=["GET"])
        app.include_router(router)

        @app.middleware("http")
        async def served_header(request, call_next):
            if request.method != "POST" or request.url.path not in ("/v1/completions", "/v1/chat/completions"):
                return await call_next(request)
            rid = request.headers.get("x-request-id")
            if not rid:  # vLLM names the request after this header: the reports can then be found
                rid = uuid.uuid4().hex
                request.scope["headers"] = [*request.scope["headers"], (b"x-request-id", rid.encode())]
            response = await call_next(request)
            bridge = plugin.bridge()
            reports = bridge.reports_for(rid) if bridge is not None else []
            body = getattr(response, "body_iterator", None)
            if not reports and bridge is not None and body is not None:
                # A streamed response's headers exist before vLLM resolves the request (its generator runs
                # when the stream is read): take the first chunk, which comes after the resolution, and
                # send it after the headers; they are sent only once this middleware returns.
                first = await anext(body, None)
                reports = bridge.reports_for(rid)

                async def replay(first=first, rest=body):
                    if first is not None:
                        yield first
                    async for chunk in rest:
                        yield chunk

                response.body_iterator = replay()
            if reports:
                response.headers[HEADER] = header_value(reports)
                response.headers[GENERATION_HEADER] = ", ".join(str(r["generation"]) for r in reports)
            return response

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client


def endpoint_plugin() -> GovernedEndpoints:
    """The ``fastpatch_governed`` ``vllm.endpoint_plugins`` entry point."""
    return GovernedEndpoints()
