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
        module = load(names[0] if names else "reference")
    else:
        module = load(backend)
        if not module.is_available(device):
            raise ValueError(f"backend {backend!r} is not available for device {device} here: "
                             f"{getattr(module, 'why_unavailable', lambda d: 'unsupported device')(device)}")
    _resolved[key] = module
    return module


def prepare(device="cpu", backend=None) -> str:
    """Build/load a backend now (e.g. before torch.compile); returns the backend's name."""
    module = resolve(backend, torch.device(device))
    return module.__name__.rsplit(".", 1)[-1].replace("_backend", "")


# The light backend modules are imported up front: torch.compile cannot trace importlib, so a
# compiled first call would otherwise fail. Triton's module imports triton (~0.3 s) and stays lazy.
for _name in ("reference", "cpp", "cuda"):
    load(_name)
