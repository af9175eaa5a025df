"""Rollout of a patch set's versions to requests: a stable version, a sticky percentage canary, A/B arms.

Semantics follow Unleash's gradual rollout: a request's stickiness key (user / session / tenant id) is
hashed together with the patch set's name into one of ``BUCKETS`` buckets; an arm covers a fixed range
of buckets, so a key always lands in the same arm, and growing an arm's percentage only adds keys to
it (everyone already in stays in). Unleash uses murmur3 into 100 buckets; we use sha256 into 10,000
(1/100 of a percent resolution, no extra dependency). A request without a key gets a random bucket
(not sticky), as Unleash's ``random`` stickiness does.

Several arms (an A/B/n experiment) each get their own *lane*: the bucket space is split into
``len(arms)`` equal lanes when the experiment starts and arm i grows from the start of lane i. So an
arm can take at most ``100 / len(arms)`` percent, and changing one arm's weight never moves a key
between the other arms. Keys outside every arm are the *control*: they get the stable version (or no
patch, when nothing is stable yet).

The state is a JSON-able dict kept by the store; the functions here are pure (state in, state out):

    {"stable": "1.0.0" | None, "history": [...older stables...], "paused": False,
     "lanes": 1, "arms": [{"arm": "canary", "version": "1.1.0", "weight": 10.0, "lane": 0}]}
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Optional

BUCKETS = 10_000
CONTROL = "control"
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def empty() -> dict:
    return {"stable": None, "history": [], "paused": False, "lanes": 1, "arms": []}


def normalise(state: Optional[dict]) -> dict:
    out = empty()
    out.update(state or {})
    return out


def bucket(name: str, key: Optional[str], rng: Optional[random.Random] = None) -> int:
    """The bucket (0 .. BUCKETS-1) of ``key`` for patch set ``name``; a random one without a key."""
    if key is None or key == "":
        return (rng or random).randrange(BUCKETS)
    digest = hashlib.sha256(f"{name}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def _width(weight: float) -> int:
    return int(round(weight * BUCKETS / 100.0))


def assign(state: dict, name: str, key: Optional[str], rng: Optional[random.Random] = None) -> tuple:
    """(arm, version) for one request: an arm covering the key's bucket, else the control (stable)."""
    state = normalise(state)
    if state["arms"] and not state["paused"]:
        b = bucket(name, key, rng)
        lane = BUCKETS // max(1, state["lanes"])
        for a in state["arms"]:
            start = a["lane"] * lane
            if start <= b < start + _width(a["weight"]):
                return a["arm"], a["version"]
    return CONTROL, state["stable"]


def _check_weight(arm: str, weight, lanes: int) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 <= weight <= 100):
        raise ValueError(f"arm {arm!r}: weight must be a percentage between 0 and 100, got {weight!r}")
    limit = 100.0 / lanes
    if _width(weight) > BUCKETS // lanes:
        raise ValueError(f"arm {arm!r}: {weight}% is more than an arm's lane holds with {lanes} arms "
                         f"({limit:.2f}%); promote or start a new experiment with fewer arms")
    return float(weight)


def check_arm_name(arm: str) -> str:
    if not isinstance(arm, str) or not _ARM_NAME.match(arm) or arm == CONTROL:
        raise ValueError(f"arm name {arm!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
                         f"(and not {CONTROL!r}, which is the stable version)")
    return arm


def activate(state: dict, version: str) -> dict:
    """Serve ``version`` as the stable version (to everyone outside the arms)."""
    s = normalise(state)
    if s["stable"] is not None and s["stable"] != version:
        s["history"] = s["history"] + [s["stable"]]
    s["stable"] = version
    return s


def canary(state: dict, version: str, percent: float) -> dict:
    """A one-arm rollout of ``version`` to ``percent`` of keys; raising it keeps every key already in."""
    s = normalise(state)
    weight = _check_weight("canary", percent, 1)
    s["lanes"], s["paused"] = 1, False
    s["arms"] = [{"arm": "canary", "version": version, "weight": weight, "lane": 0}]
    return s


def experiment(state: dict, arms: dict) -> dict:
    """A/B/n: ``{arm name: (version, weight percent)}``. Re-sending the same arm names with new weights
    keeps each arm's lane (keys stay put); a different set of names starts a new experiment."""
    if not isinstance(arms, dict) or not arms:
        raise ValueError("an experiment needs at least one arm: {arm name: (version, weight)}")
    s = normalise(state)
    names = [check_arm_name(a) for a in arms]
    same = sorted(names) == sorted(a["arm"] for a in s["arms"]) and s["lanes"] == len(names)
    lanes = {a["arm"]: a["lane"] for a in s["arms"]} if same else {n: i for i, n in enumerate(names)}
    s["lanes"], s["paused"] = len(names), False
    s["arms"] = [{"arm": n, "version": arms[n][0], "weight": _check_weight(n, arms[n][1], len(names)),
                  "lane": lanes[n]} for n in names]
    return s


def promote(state: dict, arm: Optional[str] = None) -> dict:
    """Make an arm's version the stable one and end the rollout."""
    s = normalise(state)
    if not s["arms"]:
        raise ValueError("nothing to promote: no canary or experiment is running")
    if arm is None:
        if len(s["arms"]) != 1:
            raise ValueError(f"several arms are running ({[a['arm'] for a in s['arms']]}); name the one to promote")
        chosen = s["arms"][0]
    else:
        found = [a for a in s["arms"] if a["arm"] == arm]
        if not found:
            raise ValueError(f"no arm named {arm!r}; running: {[a['arm'] for a in s['arms']]}")
        chosen = found[0]
    s = activate(s, chosen["version"])
    s["arms"], s["lanes"], s["paused"] = [], 1, False
    return s


def abort(state: dict) -> dict:
    """End the rollout: everyone gets the stable version again."""
    s = normalise(state)
    if not s["arms"]:
        raise ValueError("nothing to abort: no canary or experiment is running")
    s["arms"], s["lanes"], s["paused"] = [], 1, False
    return s


def pause(state: dict) -> dict:
    """Keep the arms' configuration but serve everyone the stable version until resumed."""
    s = normalise(state)
    if not s["arms"]:
        raise ValueError("nothing to pause: no canary or experiment is running")
    s["paused"] = True
    return s


def resume(state: dict) -> dict:
    s = normalise(state)
    s["paused"] = False
    return s


def rollback(state: dict) -> dict:
    """The stable version before the current one becomes stable again (arms are left as they are)."""
    s = normalise(state)
    if not s["history"]:
        raise ValueError(f"nothing to roll back to: {s['stable']!r} is the first stable version")
    s["stable"] = s["history"][-1]
    s["history"] = s["history"][:-1]
    return s


def versions_in_use(state: dict) -> list:
    s = normalise(state)
    out = [s["stable"]] if s["stable"] else []
    out += [a["version"] for a in s["arms"] if a["version"] and a["version"] not in out]
    return out
