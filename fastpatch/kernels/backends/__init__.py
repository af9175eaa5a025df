"""Backend registry around the one op ``torch.ops.fastpatch.fused_add_norm`` (``library``).

The op has one schema and one fake impl; its CPU implementation is the C++ kernel (registered from C++
when ``cpp`` builds; the reference when it cannot, loudly), its CUDA implementation :func:`_cuda_impl`
(the per-shape choice of :class:`PerShape` between the ``cuda`` and ``triton`` kernels).

Each backend module exposes ``is_available(device)``, ``launch(...)`` (the op's flat arguments: what an
implementation of the op runs) and
``run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None)``
with ``norm`` a :class:`NormSpec` and ``args`` the bank's ``kernel_args()`` (None: no bank). ``run``
receives inputs already validated by :func:`fastpatch.kernels.checks.check_inputs` (contiguous 2-D
rows, ``index`` 1-D or None) and returns ``(out, residual_out)`` as [N, D] tensors in x's dtype: into
``out`` / ``residual_out`` when given (preallocated, contiguous, possibly aliasing x2d or residual2d),
else newly allocated. ``cpp``, ``cuda``, ``triton`` (on CUDA tensors) and :class:`PerShape` run the op;
``reference`` (and ``triton`` on CPU tensors, under the interpreter) compute eagerly, by name.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import warnings
from types import ModuleType
from typing import Optional

import torch

from ...core.bank import KernelArgs  # noqa: F401  (re-exported: what a backend's run takes)
from ..triton_ops.dispatch import uses_tile_kernel
from . import library, selftest
from .calls import NormSpec, invoke  # noqa: F401  (NormSpec re-exported: what a backend's run takes)

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
_NAMES = {path: name for name, path in _MODULES.items()}  # module path -> registry name (name_of)


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


# (backend name or None, device type, dtype or None) -> module, filled by eager calls. Availability
# checks may build an extension and the first use runs a self-test, neither of which torch.compile can
# trace: compiled code only looks up this table. Keyed on the device type, not the index: the first
# GPU a process uses is the one whose self-test counts.
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
    """The CUDA implementation of the op when no backend is named: picks the kernel per call
    (``choose_cuda``) among those that passed their self-test.

    Has the backend interface (``run``, ``launch``, ``is_available``); both backends are loaded (and the
    CUDA one built) when it is created, so calls only pick between loaded modules.
    """

    # What prepare() and name_of() report. Not __name__: this is an object choosing between two
    # backend modules per call, not a module, and posing as one sent readers looking for auto.py.
    name = "auto"

    def __init__(self, names):
        self.names = tuple(names)
        self.modules = {name: load(name) for name in self.names}

    def is_available(self, device) -> bool:
        return torch.device(device).type == "cuda"

    def choose(self, x2d, gate_mode, down, index) -> str:
        """The backend for one call, from the op's arguments (``gate_mode`` None: no bank)."""
        if gate_mode is None or down is None:
            return choose_cuda(x2d.shape[0], 0, False, 1, self.names)
        return choose_cuda(x2d.shape[0], down.shape[1], index is not None, gate_mode.numel(), self.names,
                           down.dtype == torch.float32)

    def launch(self, x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
               gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
        self.modules[self.choose(x, gate_mode, down, index)].launch(
            x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
            gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out)

    def run(self, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
        if x2d.is_cuda:  # the op, whose CUDA implementation comes back to launch()
            return invoke(library.OP, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out,
                          residual_out)
        return invoke(self.launch, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out)

    def __repr__(self) -> str:
        return f"PerShape({', '.join(self.names)})"


def _cuda_impl(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
               gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    """The op's CUDA implementation: the named kernel, or (None) the per-shape choice of ``resolve``."""
    impl = load(backend) if backend is not None else resolve(None, x.device, x.dtype)
    impl.launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
                gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out)


library.register_impl("CUDA", _cuda_impl)


class SelfTestError(RuntimeError):
    """A named backend failed its first-use self-test against the float64 reference."""


_log = logging.getLogger("fastpatch")
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep
_warned: set = set()  # what was already warned about in this process (each warning once)


def _warn_once(key, message: str) -> None:
    """warnings.warn once per process per ``key``, and the same line to the "fastpatch" logger when the
    application configured logging (without handlers, logging's last-resort handler would print it to
    stderr a second time under the warning)."""
    if key in _warned:
        return
    _warned.add(key)
    # Point at the user's line (the first frame outside fastpatch): fused_add_norm, apply() and the
    # autograd op reach here through different depths, so no fixed stacklevel fits them all.
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, FastpatchWarning, stacklevel=level)
    if _log.hasHandlers():
        _log.warning(message)


class FastpatchWarning(RuntimeWarning):
    """A backend was refused or is missing, so fastpatch runs something slower than it could."""


def _self_tested(name: str, device: torch.device, dtype, named: bool, fallback=None) -> bool:
    """Whether ``name`` passes its first-use self-test (always True with FASTPATCH_SELFTEST=0 and for
    the reference, which is the oracle). A failure warns (``backend=None``) or raises (named)."""
    if name == "reference" or not selftest.enabled():
        return True
    result = selftest.check(name, load(name), device, dtype)
    if result.ok:
        return True
    if named:
        raise SelfTestError(selftest.refusal_message(result, named=True))
    _warn_once(("refused", name, device.type), selftest.refusal_message(result, named=False, fallback=fallback))
    _refused[name, device.type] = f"refused: failed its self-test ({result.describe()})"
    return False


# (name, device type) -> why backend=None skipped a backend that is available (its self-test failed)
_refused: dict = {}


def _warn_slow(device: torch.device) -> None:
    """backend=None found nothing faster than the float64 reference for ``device``: say why and how to
    fix it, once per process and device type (the reference is correct but 10-100x slower)."""
    if device.type not in _PREFERENCE:
        return  # no compiled backend exists for this device type: nothing was missed
    reasons = []
    for name in _PREFERENCE.get(device.type, ()):
        if name == "reference":
            continue
        if (name, device.type) in _refused:
            why = _refused[name, device.type]
        else:
            try:
                module = load(name)
                why = getattr(module, "why_unavailable", lambda d: "unsupported device")(device)
            except ImportError as exc:
                why = f"{type(exc).__name__}: {exc}"
        why = " ".join(why.split())
        if (name, device.type) in _refused:  # its own warning (just before this one) gave the fix
            reasons.append(f"{name}: {why}")
        else:
            reasons.append(f"{name}: {why[:600]} (fix: {selftest.fix_for(name, why)})")
    _warn_once(("slow", device.type),
               f"fastpatch: no compiled backend works for {device.type} tensors here, so backend=None runs the "
               f"float64 reference (correct, but 10-100x slower). " + "; ".join(reasons) + ". "
               "`fastpatch doctor` checks every backend; pass backend='reference' to choose the reference on "
               "purpose (no warning).")


def resolve(backend, device: torch.device, dtype: Optional[torch.dtype] = None) -> ModuleType:
    """The backend module for ``backend`` (a name, or None for the fastest working one) on ``device``.

    The first resolution per (backend, device type, dtype) checks availability (may build an extension)
    and runs the backend's first-use self-test (see ``selftest``; ``dtype`` None: every dtype, what
    apply() / vLLM's install use since they serve whatever dtype comes); later ones are one dict lookup.
    """
    key = (backend, device.type, dtype)
    module = _resolved.get(key)
    if module is not None:
        return module
    if torch.compiler.is_compiling():
        module = _resolved.get((backend, device.type, None))  # prepare() resolved every dtype at once
        if module is not None:
            return module
        raise RuntimeError(
            f"fastpatch backend {backend!r} for {device.type} is not initialised yet: call "
            f"fastpatch.kernels.backends.prepare({device.type!r}, {backend!r}) (or run once eagerly) "
            "before torch.compile")
    with _resolve_lock:
        module = _resolved.get(key)
        if module is None:
            module = _resolve_now(backend, device, dtype)
            _resolved[key] = module
    return module


_resolve_lock = threading.RLock()


def _resolve_now(backend, device: torch.device, dtype):
    if backend is not None:
        module = load(backend)
        if not module.is_available(device):
            raise ValueError(f"backend {backend!r} is not available for device {device} here: "
                             f"{getattr(module, 'why_unavailable', lambda d: 'unsupported device')(device)}")
        _self_tested(backend, device, dtype, named=True)
        return module
    names = available(device)
    if device.type == "cuda":
        # the per-call choice between the CUDA and Triton kernels, over those that pass their self-test
        gpu_names = [n for n in names if n in ("cuda", "triton")]
        passed = [n for i, n in enumerate(gpu_names)
                  if _self_tested(n, device, dtype, named=False,
                                  fallback=next(iter(gpu_names[i + 1:]), "reference"))]
        if passed:
            return PerShape(passed)
    else:
        for i, name in enumerate(names):
            rest = names[i + 1:]
            if _self_tested(name, device, dtype, named=False, fallback=rest[0] if rest else None):
                if name == "reference":
                    _warn_slow(device)
                    _fallback_impl(device)
                return load(name)
    _warn_slow(device)
    _fallback_impl(device)
    return load("reference")


def _fallback_impl(device: torch.device) -> None:
    """No compiled kernel for ``device`` (the warning just given names cause and fix): the op gets the
    reference as its implementation there, if it has none (a C++ kernel that failed its self-test stays
    registered; backend=None calls then run the reference by name instead of the op)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is not None:
        library.register_fallback(key, load("reference").launch)


def forget() -> None:
    """Forget resolved backends, self-test results and warnings given (tests; after a rebuild)."""
    with _resolve_lock:
        _resolved.clear()
        _refused.clear()
        _warned.clear()
        selftest.forget()
        library.remove_fallbacks()


def name_of(impl) -> str:
    """The registry name of what :func:`resolve` returned: "reference", "cpp", "triton", "cuda", or
    "auto" for the per-call choice on CUDA (:class:`PerShape`)."""
    if isinstance(impl, PerShape):
        return impl.name
    return _NAMES[impl.__name__]


def prepare(device="cpu", backend=None) -> str:
    """Build/load a backend now (e.g. before torch.compile); returns the backend's name
    ("auto" for the per-shape choice on CUDA, see ``choose_cuda``)."""
    return name_of(resolve(backend, torch.device(device)))


# The light backend modules are imported up front: torch.compile cannot trace importlib, so a
# compiled first call would otherwise fail. Triton's module imports triton (~0.3 s) and stays lazy.
for _name in ("reference", "cpp", "cuda"):
    load(_name)
