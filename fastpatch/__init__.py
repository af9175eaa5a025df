"""fastpatch: activation patches fused into the residual add + norm a transformer runs anyway."""
from .bank import PatchBank, as_bank
from .ops import config, fused_add_norm
from .patches import Ablate, CanonicalPatch, Clamp, Gate, Gated, LoReFT, LowRank, Patch, Steer
from .scope import Scope, Scoped
from . import reference
from .surgery import Handle, apply, patched
from . import cast, hooks
from .algebra import compose
from .fingerprint import fingerprint
from .io import ModelMismatchError, PatchFileError, load, save
from .gguf_io import export_gguf, import_gguf
from . import evaluate, fit
from .registry import Registry

__version__ = "0.1.0"

__all__ = [
    "Ablate", "CanonicalPatch", "Clamp", "Gate", "Gated", "LoReFT", "LowRank", "Patch", "PatchBank",
    "Scope", "Scoped", "Steer", "as_bank", "config", "fused_add_norm", "reference",
    "Handle", "apply", "patched", "cast", "hooks",
    "compose", "fingerprint", "save", "load", "PatchFileError", "ModelMismatchError", "export_gguf", "import_gguf",
    "evaluate", "fit", "Registry",
]
