"""Errors shared by every integration.

One class per failure kind lives here, in the lowest layer, so that code handling an engine-neutral
failure (``except UnsupportedModelError``) catches it whichever integration raised it; the integrations
import it and keep re-exporting it under their own names.
"""
from __future__ import annotations


class UnsupportedModelError(ValueError):
    """A model whose structure an integration cannot map onto fastpatch sites (an unknown architecture,
    missing layers or norms, a norm class no kernel reproduces). The message names what was found and
    what is supported."""
