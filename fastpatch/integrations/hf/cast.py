"""``fastpatch.cast``: conditional (CAST) steering, the public names.

:class:`Condition` and :class:`Conditional` live in :mod:`.conditions` (the engine reads them);
:func:`apply` is ``fastpatch.apply`` with every behaviour patch wrapped in ``Conditional``.
"""
from __future__ import annotations

from .api import apply as _apply
from .conditions import Condition, Conditional

__all__ = ["Condition", "Conditional", "apply"]


def apply(model, condition: Condition, behaviour: dict, **kwargs):
    """``fastpatch.apply`` with every behaviour patch conditioned on ``condition``."""
    return _apply(model, {s: (None if p is None else Conditional(p, condition)) for s, p in behaviour.items()},
                  **kwargs)
