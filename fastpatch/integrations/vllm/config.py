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
_OPTIONS = {"patches", "spare_slots", "max_rank", "sites", "norm", "backend", "force", "saes", "sae_slots",
            "max_sae_features"} | {"store", "patch_sets", "poll_interval"}  # the last three: governed()
SAE_SLOTS = 16  # default rows for per-request SAE feature configs
MAX_SAE_FEATURES = 64  # default bound on the features one request edits


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
    - ``saes``: name -> SAE (an SAELens folder, or ``{"path": ..., "site": "layers.N.resid_post"}``, e.g.
      for a Gemma Scope params.npz): requests edit their features inline (``{"sae": name, "clamp": ...}``).
    - ``sae_slots``: bank rows for distinct feature configs running at once (more wait to be scheduled).
    - ``max_sae_features``: the most features one request may edit (the rank of every bank row).
    """

    patches: dict = field(default_factory=dict)
    spare_slots: int = 0
    max_rank: Optional[int] = None
    sites: object = None
    norm: str = "exact"
    backend: Optional[str] = None
    force: bool = False
    saes: dict = field(default_factory=dict)  # name -> (path, site or None)
    sae_slots: int = 0
    max_sae_features: int = 0

    @property
    def named_capacity(self) -> int:
        """Slots for named patches (declared + spare); the SAE rows follow them."""
        return len(self.patches) + self.spare_slots

    @property
    def capacity(self) -> int:
        return self.named_capacity + self.sae_slots


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
    saes = _parse_saes(raw.get("saes", {}))
    sae_slots = _count(raw, "sae_slots", SAE_SLOTS if saes else 0, 1 if saes else 0)
    max_feats = _count(raw, "max_sae_features", MAX_SAE_FEATURES if saes else 0, 1 if saes else 0)
    if not saes and (raw.get("sae_slots") or raw.get("max_sae_features")):
        raise FastpatchConfigError("fastpatch sae_slots / max_sae_features are set but no 'saes' are declared")
    if not clean and not spare and not saes:
        raise FastpatchConfigError("additional_config['fastpatch'] declares no patches and no spare_slots (and no "
                                   "saes): nothing could ever be applied")
    backend = raw.get("backend")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise FastpatchConfigError(f"fastpatch force must be true or false, got {force!r}")
    return PluginConfig(clean, spare, max_rank, None if sites is None else (
        "all" if sites == "all" else tuple(sites)), norm, backend, force, saes, sae_slots, max_feats)


def _count(raw: dict, key: str, default: int, least: int) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < least or v > 4096:
        raise FastpatchConfigError(f"fastpatch {key} must be an integer in [{least}, 4096], got {v!r}")
    return v


def _parse_saes(saes) -> dict:
    """{name: (path, site or None)} of the 'saes' option."""
    if not isinstance(saes, dict):
        raise FastpatchConfigError("additional_config['fastpatch']['saes'] must be a dict of name -> SAE folder "
                                   "(or {'path': ..., 'site': 'layers.N.resid_post'})")
    out = {}
    for name, spec in saes.items():
        check_name(name)
        site = None
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"path", "site"})
            if unknown or "path" not in spec:
                raise FastpatchConfigError(f"fastpatch sae {name!r}: a dict spec has 'path' and optionally 'site', "
                                           f"got keys {sorted(spec)}")
            site = spec.get("site")
            if site is not None and not isinstance(site, str):
                raise FastpatchConfigError(f"fastpatch sae {name!r}: site must be a site name, got {site!r}")
            spec = spec["path"]
        if not isinstance(spec, (str, Path)):
            raise FastpatchConfigError(f"fastpatch sae {name!r}: the SAE must be a path string, got {spec!r}")
        out[name] = (str(Path(spec).expanduser()), site)
    return out


def check_name(name) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
        raise FastpatchConfigError(
            f"fastpatch patch names are non-empty printable strings (<= 128 chars), got {name!r}")
    return name


@dataclass(frozen=True)
class Governed:
    """Governed patch sets: ``store`` (a folder or a ``postgresql://`` URL) and the ``patch_sets`` of it this
    engine serves. A request names a set (``extra_args={"fastpatch": {"set": ..., "key": ..., "labels": ...}}``)
    and the bridge registered with :func:`~.frontend.register_bridge` resolves it to a slot; the versions live
    in the spare slots. ``poll_interval``: seconds between the bridge's looks at the store."""

    store: str
    patch_sets: tuple
    poll_interval: float = 1.0


def governed(raw) -> Optional[Governed]:
    """The governed-sets options of a fastpatch section (None without ``store``), checked."""
    if not isinstance(raw, dict):
        return None
    store, sets, poll = raw.get("store"), raw.get("patch_sets"), raw.get("poll_interval", 1.0)
    if store is None:
        if sets is not None or "poll_interval" in raw:
            raise FastpatchConfigError("additional_config['fastpatch']: 'patch_sets' / 'poll_interval' need 'store' "
                                       "(the patch store the sets live in: a folder or a postgresql:// URL)")
        return None
    if not isinstance(store, str) or not store:
        raise FastpatchConfigError(f"fastpatch store must be a folder or a postgresql:// URL string, got {store!r}")
    if (not isinstance(sets, (list, tuple)) or not sets or not all(isinstance(s, str) and s for s in sets)
            or len(set(sets)) != len(sets)):
        raise FastpatchConfigError("fastpatch patch_sets must be a non-empty list of distinct patch set names (the "
                                   f"sets of the store this engine serves), got {sets!r}")
    spare = raw.get("spare_slots", 0)
    if not isinstance(spare, int) or isinstance(spare, bool) or spare < 1:
        raise FastpatchConfigError("fastpatch: governed patch sets are loaded into spare slots; set spare_slots >= 1 "
                                   "(one per version that can be live at once: the stable one plus each arm, plus "
                                   "the versions requests in flight still hold)")
    if raw.get("sites") is None:
        raise FastpatchConfigError("fastpatch: with a store, list the 'sites' the sets' versions may patch (or "
                                   "'all'): the banks are fixed when the engine starts, the versions come later")
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 <= poll <= 3600:
        raise FastpatchConfigError(f"fastpatch poll_interval must be a number of seconds in 0..3600, got {poll!r}")
    return Governed(store, tuple(sets), float(poll))
