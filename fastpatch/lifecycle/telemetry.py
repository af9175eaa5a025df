"""Telemetry of served patches: counters per patch set version and arm, anomaly bands, Prometheus text.

Counters, per (set, version, arm): ``requests``, ``rows`` (token rows the patch was applied to: the
prompt plus every decode step), ``fires`` (rows x sites the kernel actually fired on, read from the
kernel's own counters), and every outcome ``metric`` an operator reports (count, sum, sum of squares).
A serving process keeps them in memory and :meth:`Monitor.drain` hands the increments to the store.

Anomaly detection (:class:`Detector`): observations of one (set, arm, metric) are taken in windows of
``window`` values; the window mean must stay inside the band. The band is given (from validation:
``{"metric": [lo, hi]}``) or, if not, learnt from the first full window of that (set, arm, metric):
mean ± k·sd/√window (the spread of a window mean), at least ±``min_half_width``. A given band always wins
over a learnt one, whenever it is given (before or after traffic), and is checked from the next window on. The fire rate
(fires / (rows x sites)) is one more metric, ``fire_rate``, observed once per telemetry flush.
"""
from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from typing import Optional

FIRE_RATE = "fire_rate"


class Monitor:
    """In-memory counters of one serving process (thread-safe); ``drain()`` returns and clears them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rows: dict = defaultdict(lambda: [0, 0.0, 0.0])  # (name, version, arm, metric) -> n, sum, sumsq

    def add(self, name: str, version: Optional[str], arm: str, metric: str, value: float) -> None:
        """One observation of an outcome metric."""
        if not math.isfinite(value):
            raise ValueError(f"metric {metric!r}: value must be finite, got {value!r}")
        with self._lock:
            r = self._rows[(name, version or "-", arm, metric)]
            r[0] += 1
            r[1] += value
            r[2] += value * value

    def count(self, name, version, arm, metric, amount) -> None:
        """A counter increment (requests, rows, fires): n += amount, sum += amount."""
        with self._lock:
            r = self._rows[(name, version or "-", arm, metric)]
            r[0] += int(amount)
            r[1] += float(amount)

    def drain(self) -> list:
        with self._lock:
            rows = [(k[0], k[1], k[2], k[3], v[0], v[1], v[2]) for k, v in self._rows.items()]
            self._rows.clear()
        return rows


class Detector:
    """Windowed band checks; ``observe`` returns an alert dict when a window mean leaves its band."""

    def __init__(self, *, window: int = 20, k: float = 4.0, min_half_width: float = 1e-6,
                 clock=time.time, given_only=()):
        """``given_only``: metrics checked only against a given band, never a learnt one (latency: it follows
        the machine's load, not the patch, so a band learnt from a first window alerts on load swings)."""
        if window < 2:
            raise ValueError("an anomaly window needs at least 2 observations")
        self.window, self.k, self.min_half_width, self.clock = int(window), float(k), float(min_half_width), clock
        self.given_only = frozenset(given_only)
        self._lock = threading.Lock()
        self._values: dict = defaultdict(list)
        self._bands: dict = {}  # given: (name, arm or None, metric) -> (lo, hi, source)
        self._learnt: dict = {}  # learnt from a first window: (name, arm, metric) -> (lo, hi, "first window")
        self._from_store: dict = {}  # name -> the metrics whose (name, None, metric) band came from replace_bands

    def set_band(self, name: str, metric: str, lo: float, hi: float, *, arm: Optional[str] = None,
                 source: str = "validation") -> None:
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"band for {metric!r} must be finite with lo <= hi, got [{lo}, {hi}]")
        with self._lock:
            self._bands[(name, arm, metric)] = (float(lo), float(hi), source)

    def replace_bands(self, name: str, bands: dict, *, source: str = "validation") -> None:
        """The set's bands as the store holds them (``set_guard``): replaces those given this way before, so
        a band removed from the store stops applying too. Bands given with :meth:`set_band` stay."""
        new = {}
        for metric, (lo, hi) in bands.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"band for {metric!r} must be finite with lo <= hi, got [{lo}, {hi}]")
            new[metric] = (float(lo), float(hi), source)
        with self._lock:
            for metric in self._from_store.pop(name, set()) - set(new):
                self._bands.pop((name, None, metric), None)
            for metric, band in new.items():
                self._bands[(name, None, metric)] = band
            self._from_store[name] = set(new)

    def _band(self, name: str, arm: str, metric: str) -> Optional[tuple]:
        return (self._bands.get((name, arm, metric)) or self._bands.get((name, None, metric))
                or self._learnt.get((name, arm, metric)))

    def band(self, name: str, arm: str, metric: str) -> Optional[tuple]:
        """The band a window of (name, arm, metric) is checked against: given for the arm, given for the set,
        else learnt from the first window of that arm (None before it)."""
        with self._lock:
            return self._band(name, arm, metric)

    def observe(self, name: str, version: Optional[str], arm: str, metric: str, value: float) -> Optional[dict]:
        if not math.isfinite(value):
            raise ValueError(f"metric {metric!r}: value must be finite, got {value!r}")
        with self._lock:
            vals = self._values[(name, arm, metric)]
            vals.append(float(value))
            if len(vals) < self.window:
                return None
            window = vals[:]
            vals.clear()
            mean = sum(window) / len(window)
            band = self._band(name, arm, metric)
            if band is None and metric in self.given_only:
                return None  # nothing to check it against until an operator gives a band
            if band is None:
                sd = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
                half = max(self.k * sd / math.sqrt(len(window)), self.min_half_width)
                self._learnt[(name, arm, metric)] = (mean - half, mean + half, "first window")
                return None
            lo, hi, source = band
            if lo <= mean <= hi:
                return None
        return {"name": name, "version": version, "arm": arm, "metric": metric, "window_mean": mean,
                "band": [lo, hi], "band_source": source, "window": len(window), "ts": self.clock()}


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_HELP = {
    "requests": ("fastpatch_requests_total", "counter", "Requests served, per patch set version and arm"),
    "rows": ("fastpatch_rows_total", "counter", "Token rows served with the patch (prompt + decode steps)"),
    "fires": ("fastpatch_fires_total", "counter", "Rows x sites the kernel applied the patch on"),
}


def prometheus(telemetry_rows: list, *, alerts: int = 0, generation: Optional[int] = None,
               active: Optional[list] = None, unavailable: Optional[dict] = None) -> str:
    """Prometheus text exposition (version 0.0.4) of the store's telemetry rows.

    ``active``: (set, version, arm, weight %) of each version served, exported as
    ``fastpatch_active_version`` whose value is the percentage of request keys the arm gets (the control
    arm: what the running arms leave, 100 with none; a paused rollout's arms are not listed, as they serve
    nobody). ``unavailable``: {(set, version): reason} of live versions this process cannot serve
    (``fastpatch_version_unavailable`` 1 each)."""
    out = []
    by_metric: dict = defaultdict(list)
    for r in telemetry_rows:
        by_metric[r["metric"]].append(r)
    for metric, (pname, ptype, phelp) in _HELP.items():
        out += [f"# HELP {pname} {phelp}", f"# TYPE {pname} {ptype}"]
        for r in by_metric.get(metric, []):
            out.append(f'{pname}{{set="{_escape(r["name"])}",version="{_escape(r["version"])}",'
                       f'arm="{_escape(r["arm"])}"}} {int(r["total"])}')
    outcome = [r for m, rs in sorted(by_metric.items()) if m not in _HELP for r in rs]
    out += ["# HELP fastpatch_metric Outcome metrics reported by the operator (summary: sum and count)",
            "# TYPE fastpatch_metric summary"]
    for r in outcome:
        lab = (f'set="{_escape(r["name"])}",version="{_escape(r["version"])}",arm="{_escape(r["arm"])}",'
               f'metric="{_escape(r["metric"])}"')
        out.append(f"fastpatch_metric_sum{{{lab}}} {float(r['total']):.17g}")
        out.append(f"fastpatch_metric_count{{{lab}}} {int(r['n'])}")
    out += ["# HELP fastpatch_alerts_total Anomaly alerts raised", "# TYPE fastpatch_alerts_total counter",
            f"fastpatch_alerts_total {int(alerts)}"]
    if generation is not None:
        out += ["# HELP fastpatch_registry_generation Changes committed to the registry store",
                "# TYPE fastpatch_registry_generation gauge", f"fastpatch_registry_generation {int(generation)}"]
    if active is not None:
        out += ["# HELP fastpatch_active_version Percent of request keys (0-100) each served version gets, per arm "
                "(control: the stable version's share)",
                "# TYPE fastpatch_active_version gauge"]
        for name, version, arm, weight in active:
            out.append(f'fastpatch_active_version{{set="{_escape(name)}",version="{_escape(version)}",'
                       f'arm="{_escape(arm)}"}} {float(weight):g}')
    if unavailable is not None:
        out += ["# HELP fastpatch_version_unavailable 1 for each live version this process cannot serve (its patch "
                "files are missing or corrupted; its requests are refused)",
                "# TYPE fastpatch_version_unavailable gauge"]
        for (name, version) in sorted(unavailable):
            out.append(f'fastpatch_version_unavailable{{set="{_escape(name)}",version="{_escape(version)}"}} 1')
    return "\n".join(out) + "\n"
