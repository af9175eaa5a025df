"""The Triton backend: fastpatch/kernels/triton_ops kernels on CUDA tensors, or on CPU under TRITON_INTERPRET=1.

On CUDA tensors its kernels are one of the two the CUDA implementation of the one op
``torch.ops.fastpatch.fused_add_norm`` chooses between per shape (``backends.choose_cuda``), through
:func:`launch`; ``run`` calls the op with ``backend="triton"``, eager or compiled (graphs and CUDA graphs
trace the op, with its fake impl). On CPU tensors (the interpreter, for tests) ``run`` launches the
kernels directly: the op's CPU implementation is the C++ kernel, so this path has no compiled form.
"""
from __future__ import annotations

import torch

from ..triton_ops.dispatch import interpreting
from . import library
from .calls import invoke

_import_error = ""
try:
    from ..triton_ops import fused_add_norm as _kernels
except Exception as exc:  # triton missing or broken: the backend is just unavailable
    _kernels = None
    _import_error = f"{type(exc).__name__}: {exc}"


def why_unavailable(device) -> str:
    device = torch.device(device)
    if _kernels is None:
        return f"triton could not be imported ({_import_error})"
    if device.type == "cuda":
        return "available" if torch.cuda.is_available() else "CUDA is not available in this torch build"
    if device.type == "cpu":
        return "available" if interpreting() else (
            "the triton backend runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
            "before fastpatch is imported")
    return f"the triton backend does not support device type {device.type!r}"


def is_available(device) -> bool:
    return why_unavailable(device) == "available"


def launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
           gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, backend=None):
    """The op's flat arguments (see ``library``) run by the Triton kernels."""
    if _kernels is None:
        raise RuntimeError(why_unavailable(x.device))
    _kernels.launch(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
                    gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out,
                    num_patches=1 if gate_mode is None else gate_mode.numel())


def run(x2d, residual2d, weight, bias, norm, args, index, fire_counts, out=None, residual_out=None):
    if x2d.is_cuda:
        return invoke(library.OP, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out,
                      "triton")
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "backend='triton' on CPU tensors (TRITON_INTERPRET=1) has no compiled form: under torch.compile CPU "
            "tensors go through torch.ops.fastpatch.fused_add_norm, whose CPU implementation is the cpp kernel. "
            "Pass backend=None (or 'cpp'), or call it eagerly")
    return invoke(launch, x2d, residual2d, weight, bias, norm, args, index, fire_counts, out, residual_out)
