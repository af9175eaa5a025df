"""Backend registry: each backend module exposes ``is_available(device)`` and ``run(...)``.

``run(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
out, residual_out)``
receives inputs already validated by :func:`fastpatch.kernels.ops.check_inputs` (contiguous 2-D
rows, ``index`` 1-D or None, ``norm_kind`` 0 = RMS, 1 = Layer) and returns ``(out, residual_out)``
as [N, D] tensors in x's dtype: into ``out`` / ``residual_out`` when given (preallocated,
contiguous, possibly aliasing x2d or residual2d), else newly allocated.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..triton_ops.dispatch import uses_tile_kernel

# name -> module path; imported lazily so that a missing toolchain only affects its backend.
_MODULES = {
    "reference": "fastpatch.kernels.backends.reference_backend",
    "cpp": "fastpatch.kernels.backends.cpp",
    "triton": "fastpatch.kernels.backends.triton_backend",
    "cuda": "fastpatch.kernels.backends.cuda",
}

# Fastest first, per device type.
_PREFERENCE = {
    "cpu": ("cpp", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

BACKENDS = tuple(_MODULES)


# Imported modules by name: a dict lookup keeps the per-call cost of backend="..." tiny and lets
# torch.compile trace through resolve() (dynamo refuses to trace importlib.import_module).
_loaded: dict = {}


def load(name: str) -> ModuleType:
    module = _loaded.get(name)
    if module is None:
        if name not in _MODULES:
            raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or None")
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def available(device) -> list[str]:
    """Backends that can run on ``device`` here, fastest first."""
    device = torch.device(device)
    names = []
    for name in _PREFERENCE.get(device.type, ("reference",)):
        try:
            if load(name).is_available(device):
                names.append(name)
        except ImportError:
            continue
    return names


# (backend name or None, device type) -> module, filled by eager calls. Availability checks may
# build an extension, which torch.compile cannot trace: compiled code only looks up this table.
_resolved: dict = {}


def choose_cuda(N: int, rank: int, index_given: bool, num_patches: int, names, dot_fp32: bool = False) -> str:
    """Which of the CUDA backends ``names`` (available ones, e.g. ``("cuda", "triton")``) runs one call.

    - Prefill-sized low-rank calls (``uses_tile_kernel``: N ≥ 64, 8 ≤ rank ≤ 128) → ``triton``:
      its tile kernel computes h·downᵀ and z·up with ``tl.dot`` on tensor cores for 16–32 rows at
      a time, reading each bank row once per block (once per patch present in the block when rows
      index several patches). The CUDA kernel loops over the rank per row with a block barrier
      per rank chunk: it re-reads the bank for every row and its arithmetic is scalar.
    - Everything else (decode, steering/ablation/gates: rank < 8, rank > 128) →
      ``cuda``: row kernels with 16-byte vector accesses and ~0.5 µs of host overhead per call
      (a pybind11 function), against tens of µs for a Triton launch from Python, which is what a
      decode step with 2 calls per layer pays when it does not run in a CUDA graph.
    - Whichever of the two is available when only one is (no nvcc: ``triton``), else ``reference``.
    """
    if "triton" in names and rank and uses_tile_kernel(N, rank, index_given, num_patches, dot_fp32):
        return "triton"
    for name in ("cuda", "triton", "reference"):
        if name in names:
            return name
    return "reference"


class PerShape:
    """The backend used when none is named on a CUDA device: picks per call (``choose_cuda``).

    Has the backend interface (``run``, ``is_available``); both backends are loaded (and the CUDA
    one built) when it is created, so calls under torch.compile only pick between loaded modules.
    """

    __name__ = "fastpatch.kernels.backends.auto"

    def __init__(self, names):
        self.names = tuple(names)
        self.modules = {name: load(name) for name in self.names}

    def is_available(self, device) -> bool:
        return torch.device(device).type == "cuda"

    def choose(self, x2d, bank, index) -> str:
        if bank is None:
            return choose_cuda(x2d.shape[0], 0, False, 1, self.names)
        return choose_cuda(x2d.shape[0], bank.rank, index is not None, bank.num_patches, self.names,
                           bank.dtype == torch.float32)

    def run(self, x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index, fire_counts,
            out=None, residual_out=None):
        module = self.modules[self.choose(x2d, bank, index)]
        return module.run(x2d, residual2d, weight, bias, eps, norm_kind, weight_offset, bank, index,
                          fire_counts, out, residual_out)

    def __repr__(self) -> str:
        return f"PerShape({', '.join(self.names)})"


def resolve(backend, device: torch.device) -> ModuleType:
    key = (backend, device.type)
    module = _resolved.get(key)
    if module is not None:
        return module
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"fastpatch backend {backend!r} for {device.type} is not initialised yet: call "
            f"fastpatch.kernels.backends.prepare({device.type!r}, {backend!r}) (or run once eagerly) before torch.compile")
    if backend is None:
        names = available(device)
        gpu_names = [n for n in names if n in ("cuda", "triton")]
        if device.type == "cuda" and gpu_names:
            module = PerShape(gpu_names)  # per-call choice between the CUDA and Triton kernels
        else:
            module = load(names[0] if names else "reference")
    else:
        module = load(backend)
        if not module.is_available(device):
            raise ValueError(f"backend {backend!r} is not available for device {device} here: "
                             f"{getattr(module, 'why_unavailable', lambda d: 'unsupported device')(device)}")
    _resolved[key] = module
    return module


def prepare(device="cpu", backend=None) -> str:
    """Build/load a backend now (e.g. before torch.compile); returns the backend's name
    ("auto" for the per-shape choice on CUDA, see ``choose_cuda``)."""
    module = resolve(backend, torch.device(device))
    return module.__name__.rsplit(".", 1)[-1].replace("_backend", "")


# The light backend modules are imported up front: torch.compile cannot trace importlib, so a
# compiled first call would otherwise fail. Triton's module imports triton (~0.3 s) and stays lazy.
for _name in ("reference", "cpp", "cuda"):
    load(_name)
