"""Hugging Face integration: fuse activation patches into the residual adds + norms of a transformers
model (``apply``), the same semantics with plain hooks (``hooks``), position scopes and CAST conditions."""
from . import cast, hooks
from .api import apply, patched
from .handle import Handle
from ...core.sites import all_sites, parse_site
from .model_sites import SUPPORTED_MODEL_TYPES, UnsupportedModelError, model_info

__all__ = ["Handle", "apply", "patched", "cast", "hooks", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError",
           "all_sites", "model_info", "parse_site"]
