"""Model surgery: fuse activation patches into the residual adds + norms of a transformers model."""
from .api import Handle, apply, patched
from .sites import SUPPORTED_MODEL_TYPES, UnsupportedModelError, all_sites, model_info, parse_site

__all__ = ["Handle", "apply", "patched", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "all_sites",
           "model_info", "parse_site"]
