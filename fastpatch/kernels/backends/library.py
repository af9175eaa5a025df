"""The one op, ``torch.ops.fastpatch.fused_add_norm``: its schema and fake impl, defined once, here.

Per-device implementations (vLLM's shape: one schema, an implementation per dispatch key):

- CPU: the C++ kernel, registered from C++ (``TORCH_LIBRARY_IMPL(fastpatch, CPU, m)`` in
  csrc/cpu/torch_bindings.cpp) when the JIT-built extension loads (``backends.cpp.build``). When it
  cannot be built, :func:`register_fallback` registers the float64 reference for CPU instead, and
  ``backends.resolve`` says so loudly (cause and fix).
- CUDA: one Python implementation (``backends._cuda_impl``) that picks the CUDA extension or the
  Triton kernels per shape (``backends.choose_cuda``) and launches it.

The schema is defined in Python, not by the extension's ``TORCH_LIBRARY``: the extension is built on
first use and may fail to build, and the op (with its fake, and its CUDA implementation) must exist
either way; the dispatcher takes an implementation registered before or after the definition.

The op writes ``out``, ``residual_out`` and ``fire_counts`` in place and returns nothing; ``backend``
None runs the device's implementation as it chooses, a name forces one (``"cpp"`` on CPU; ``"cuda"`` or
``"triton"`` on CUDA), so that a backend named under torch.compile stays the one that runs.
"""
from __future__ import annotations

import torch

NAME = "fastpatch::fused_add_norm"
SCHEMA = ("fused_add_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, int norm_kind, "
          "float weight_offset, Tensor? down, Tensor? down_bias, Tensor? up, Tensor? shift, Tensor? gate_dir, "
          "Tensor? gate_threshold, Tensor? gate_mode, Tensor? act_threshold, Tensor? index, "
          "Tensor(a!)? fire_counts, Tensor(b!) out, Tensor(c!) residual_out, str? backend=None) -> ()")

_lib = torch.library.Library("fastpatch", "FRAGMENT")
_lib.define(SCHEMA)
# No autograd formula: fastpatch.fused_add_norm sends calls that need a gradient to the differentiable op
# (fastpatch.kernels.autograd), which calls this one with grad mode off. A fallthrough instead of torch's
# boxed "autograd not implemented" fallback keeps an eager CPU call unboxed from the C++ entry to the kernel.
_lib.impl("fused_add_norm", torch.library.fallthrough_kernel, "Autograd")

OP = torch.ops.fastpatch.fused_add_norm.default


@torch.library.register_fake(NAME, lib=_lib)
def _fake(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
          gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    return None  # writes only into its out-arguments: nothing to compute for tracing


def register_impl(dispatch_key: str, fn) -> None:
    """Register ``fn`` (the op's flat arguments, ``backend`` last) as the op's implementation for
    ``dispatch_key`` (e.g. "CUDA")."""
    _lib.impl("fused_add_norm", fn, dispatch_key)


def has_impl(dispatch_key: str) -> bool:
    """Whether the op has its own implementation for ``dispatch_key`` (e.g. "CPU" once the C++ extension
    loaded)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(NAME, dispatch_key)


_fallbacks: dict = {}  # dispatch key -> the Library holding a fallback implementation (removable)


def register_fallback(dispatch_key: str, fn) -> None:
    """Register ``fn`` for ``dispatch_key`` where the op has no implementation there (the C++ extension did
    not build). The caller warns; :func:`remove_fallbacks` undoes it."""
    if dispatch_key in _fallbacks or has_impl(dispatch_key):
        return
    lib = torch.library.Library("fastpatch", "IMPL")
    lib.impl("fused_add_norm", fn, dispatch_key)
    _fallbacks[dispatch_key] = lib


def remove_fallbacks() -> None:
    """Unregister the fallback implementations (``backends.forget``: tests, after a rebuild)."""
    for lib in _fallbacks.values():
        lib._destroy()
    _fallbacks.clear()
