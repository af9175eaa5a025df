"""Where the C++/CUDA sources are: the repo's csrc/ (editable install) or the copy in a wheel."""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[2]


def csrc_dir() -> Path:
    for candidate in (_PACKAGE.parent / "csrc", _PACKAGE / "_csrc"):
        if (candidate / "patch_math.h").is_file():
            return candidate
    return _PACKAGE.parent / "csrc"  # missing: the backend reports why it is unavailable
