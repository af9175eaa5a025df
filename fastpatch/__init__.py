"""fastpatch: activation patches fused into the residual add + norm a transformer runs anyway."""
# The public API, one import per layer (core -> kernels -> files -> integrations -> lifecycle);
# docs/architecture.md says what lives where.
from .core import reference
from .core.algebra import compose
from .core.bank import PatchBank, as_bank
from .core.patches import Ablate, CanonicalPatch, Clamp, Encoded, Gate, Gated, LoReFT, LowRank, Patch, Steer
from .core.scope import Scope, Scoped
from .kernels.autograd import TrainableBank
from .kernels.ops import config, fused_add_norm
from .files.fingerprint import fingerprint
from .files.patch_file import ModelMismatchError, PatchFileError, load, save
from .files.gguf_io import export_gguf, import_gguf
from .integrations.hf import Handle, apply, cast, hooks, patched
from .lifecycle import Registry, evaluate, fit
from .lifecycle import sae  # fastpatch.sae.load(path): SAE feature edits as patches
from .core.version import __version__  # noqa: F401 (re-export: fastpatch.__version__)

__all__ = [
    "Ablate", "CanonicalPatch", "Clamp", "Encoded", "Gate", "Gated", "LoReFT", "LowRank", "Patch", "PatchBank",
    "Scope", "Scoped", "Steer", "TrainableBank", "as_bank", "config", "fused_add_norm", "reference",
    "Handle", "apply", "patched", "cast", "hooks",
    "compose", "fingerprint", "save", "load", "PatchFileError", "ModelMismatchError", "export_gguf", "import_gguf",
    "evaluate", "fit", "Registry", "sae",
]
