"""Position scopes: which token positions of a sequence a patch acts on.

A scope is written as a string (also accepted wherever a Scope is):

- "all": every position (the default)
- "prompt": prompt positions only; "generated": generated positions only
- "f{p}+l{s}" (pyreft's notation): the first p and the last s prompt positions; "f{p}" or "l{s}" alone.
  As in pyreft (``get_intervention_locations``), p and s are each capped at n // 2 for a prompt of n
  real tokens, so the two ends never overlap and a short prompt is not patched everywhere: "f3+l3" on
  a 4-token prompt patches positions 0, 1 and 2, 3; on a 3-token prompt only 0 and 2. pyreft's
  examples (LoReFT) pass ``last_position`` = the prompt length, which is what fastpatch does; its
  generic ``ReftDataset`` passes the prompt length − 1 after prepending a pad token, which leaves the
  prompt's final token out of the last s (to reproduce that, scope the prompt without its last token).

Model surgery turns a scope into a per-row patch index on the device at every step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_EDGES = re.compile(r"^(?:f(\d+))?(?:\+?l(\d+))?$")


@dataclass(frozen=True)
class Scope:
    kind: str = "all"  # "all" | "prompt" | "generated" | "edges"
    first: int = 0
    last: int = 0

    @staticmethod
    def parse(value) -> "Scope":
        if isinstance(value, Scope):
            return value
        if value is None:
            return Scope()
        if not isinstance(value, str):
            raise TypeError(f"scope must be a string like 'all', 'prompt', 'generated' or 'f3+l2', got {value!r}")
        text = value.strip().lower()
        if text in ("all", "prompt", "generated"):
            return Scope(text)
        m = _EDGES.match(text)
        if not text or not m or (m.group(1) is None and m.group(2) is None):
            raise ValueError(f"unknown scope {value!r}: use 'all', 'prompt', 'generated' or "
                             "'f{p}+l{s}' (e.g. 'f3+l2')")
        return Scope("edges", int(m.group(1) or 0), int(m.group(2) or 0))

    def __str__(self) -> str:
        if self.kind != "edges":
            return self.kind
        parts = ([f"f{self.first}"] if self.first else []) + ([f"l{self.last}"] if self.last else [])
        return "+".join(parts)


@dataclass(frozen=True)
class Scoped:
    """A patch (or PatchBank) restricted to a position scope: ``Scoped(Steer(v), "prompt")``."""

    patch: object
    scope: Scope = Scope()

    def __init__(self, patch, scope="all"):
        object.__setattr__(self, "patch", patch)
        object.__setattr__(self, "scope", Scope.parse(scope))
