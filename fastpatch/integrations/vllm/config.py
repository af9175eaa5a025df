"""The ``additional_config["fastpatch"]`` section: parsed and checked once, in every vLLM process.

The section travels in vLLM's ``additional_config`` (not an environment variable) because that dict is
part of vLLM's compile-cache key: an engine started with patches never reuses a vanilla graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

KEY = "fastpatch"  # the key in additional_config and in SamplingParams.extra_args
NORM_MODES = ("exact", "fused")
_OPTIONS = {"patches", "spare_slots", "max_rank", "sites", "norm", "backend", "force"}


class FastpatchConfigError(ValueError):
    """The fastpatch section of additional_config is malformed (the message names the field)."""


@dataclass(frozen=True)
class PluginConfig:
    """What one engine was started with.

    - ``patches``: name -> patch file (fastpatch .safetensors or a llama.cpp control-vector .gguf).
      The names are the allowlist a request may pick from.
    - ``spare_slots``: empty slots for patches loaded at run time (:func:`load_patch`).
    - ``max_rank``: the largest low-rank part any slot can hold (default: the largest declared).
    - ``sites``: the sites that get a bank; default the sites the declared patches use, "all" = every
      site. A patch loaded at run time may only use these (the traced graph is fixed at start-up).
    - ``norm``: "exact" (default): the patched stream goes through vLLM's own norm, so requests without
      a patch are bit-identical to vanilla vLLM; "fused": fastpatch's kernel also does the norm (one pass).
    - ``backend``: fastpatch kernel backend (None: fastest for the device).
    - ``force``: load patch files fitted on a different model anyway.
    """

    patches: dict = field(default_factory=dict)
    spare_slots: int = 0
    max_rank: Optional[int] = None
    sites: object = None
    norm: str = "exact"
    backend: Optional[str] = None
    force: bool = False

    @property
    def capacity(self) -> int:
        return len(self.patches) + self.spare_slots


def section(additional_config) -> Optional[dict]:
    """The raw fastpatch section, or None when the engine was started without one."""
    if not isinstance(additional_config, dict):
        return None
    return additional_config.get(KEY)


def parse(raw) -> PluginConfig:
    if not isinstance(raw, dict):
        raise FastpatchConfigError(f"additional_config['fastpatch'] must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _OPTIONS)
    if unknown:
        raise FastpatchConfigError(f"additional_config['fastpatch']: unknown option(s) {unknown}; "
                                   f"known: {sorted(_OPTIONS)}")
    patches = raw.get("patches", {})
    if not isinstance(patches, dict):
        raise FastpatchConfigError("additional_config['fastpatch']['patches'] must be a dict of name -> file path")
    clean = {}
    for name, path in patches.items():
        check_name(name)
        if not isinstance(path, (str, Path)):
            raise FastpatchConfigError(f"fastpatch patch {name!r}: the file must be a path string, got {path!r}")
        clean[name] = str(Path(path).expanduser())
    spare = raw.get("spare_slots", 0)
    if not isinstance(spare, int) or isinstance(spare, bool) or spare < 0:
        raise FastpatchConfigError(f"fastpatch spare_slots must be an integer >= 0, got {spare!r}")
    max_rank = raw.get("max_rank")
    if max_rank is not None and (not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 0):
        raise FastpatchConfigError(f"fastpatch max_rank must be an integer >= 0 or null, got {max_rank!r}")
    sites = raw.get("sites")
    if sites is not None and sites != "all" and not (
            isinstance(sites, (list, tuple)) and all(isinstance(s, str) for s in sites)):
        raise FastpatchConfigError(f"fastpatch sites must be null, 'all' or a list of site names, got {sites!r}")
    norm = raw.get("norm", "exact")
    if norm not in NORM_MODES:
        raise FastpatchConfigError(f"fastpatch norm must be one of {NORM_MODES}, got {norm!r}")
    if not clean and not spare:
        raise FastpatchConfigError("additional_config['fastpatch'] declares no patches and no spare_slots: "
                                   "nothing could ever be applied")
    backend = raw.get("backend")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise FastpatchConfigError(f"fastpatch force must be true or false, got {force!r}")
    return PluginConfig(clean, spare, max_rank, None if sites is None else (
        "all" if sites == "all" else tuple(sites)), norm, backend, force)


def check_name(name) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
        raise FastpatchConfigError(
            f"fastpatch patch names are non-empty printable strings (<= 128 chars), got {name!r}")
    return name
