"""Site names: the points of the residual stream a patch can act on (shared by every engine and file).

Site names (``L`` layers, ``0 <= i < L``):

- ``layers.{i}.resid_pre``: the stream entering layer ``i``. For ``i > 0`` it is the same point as
  ``layers.{i-1}.resid_post`` (both names map to one key; naming both is an error).
- ``layers.{i}.resid_mid``: the sum after the attention block's residual add.
- ``layers.{i}.resid_post``: the sum after the MLP's residual add.

A key is ``("pre", 0)``, ``("mid", i)`` or ``("post", i)``; ``order(key)`` sorts keys in the order a
forward pass reaches them.
"""
from __future__ import annotations

import re
from typing import Optional

SITE_KINDS = ("resid_pre", "resid_mid", "resid_post")
SITE_PATTERN = re.compile(r"^(?:model\.)?layers\.(\d+)\.(resid_pre|resid_mid|resid_post)$")


def split_site(name) -> Optional[tuple]:
    """``(layer, kind)`` of a well-formed site name, or None."""
    m = SITE_PATTERN.match(name.strip()) if isinstance(name, str) else None
    return None if m is None else (int(m.group(1)), m.group(2))


def parse_site(name, num_layers: int) -> tuple:
    """Site name → key; clear errors for unknown names and out-of-range layers."""
    if not isinstance(name, str):
        raise TypeError(f"site names are strings like 'layers.3.resid_post', got {name!r}")
    m = SITE_PATTERN.match(name.strip())
    if not m:
        raise ValueError(f"unknown site {name!r}: sites are 'layers.{{i}}.resid_pre', 'layers.{{i}}.resid_mid' "
                         f"or 'layers.{{i}}.resid_post' with 0 <= i < {num_layers}")
    i, kind = int(m.group(1)), m.group(2)
    if not 0 <= i < num_layers:
        raise ValueError(f"site {name!r}: layer {i} is out of range; the model has {num_layers} layers "
                         f"(0..{num_layers - 1})")
    if kind == "resid_pre":
        return ("pre", 0) if i == 0 else ("post", i - 1)
    return ("mid", i) if kind == "resid_mid" else ("post", i)


def order(key: tuple) -> int:
    kind, i = key
    return 0 if kind == "pre" else (2 * i + 1 if kind == "mid" else 2 * i + 2)


def site_name(key: tuple) -> str:
    kind, i = key
    return "layers.0.resid_pre" if kind == "pre" else f"layers.{i}.resid_{kind}"


def all_sites(num_layers: int) -> list:
    """Every distinct site name of a model with ``num_layers`` layers, in forward order."""
    return ["layers.0.resid_pre"] + [f"layers.{i}.resid_{k}" for i in range(num_layers) for k in ("mid", "post")]
