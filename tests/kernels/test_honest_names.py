"""Names that say what they are (issue 20): ``fastpatch.fused_add_norm`` under autograd, the per-shape
CUDA backend's name, one ``UnsupportedModelError`` for every integration.

``fastpatch.fused_add_norm`` calls kernels without a backward. A call that needs a gradient (grad mode
on, an input requiring grad) runs the differentiable op of ``fastpatch.kernels.autograd`` instead; its
gradients are checked here against torch autograd through the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

import fastpatch as fp
from fastpatch.core import reference
from fastpatch.kernels import autograd as ag
from fastpatch.kernels import backends

from casegen import gate_threshold, make_patch
from test_training import TRAINED, _close
from test_training import _reference_grads as _reference  # the float64 oracle of the training tests



def _case(norm, seed, trainable_bank=True, D=24, N=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    r = torch.randn(N, D, generator=g).requires_grad_()
    w = torch.randn(D, generator=g).requires_grad_()
    b = torch.randn(D, generator=g).requires_grad_() if norm == "layer" else None
    h64 = x.detach().double() + r.detach().double()
    cond = torch.randn(D, generator=g, dtype=torch.float64)
    patches = [make_patch("lowrank", D, g, rank=3), make_patch("steer", D, g),
               fp.Gated(make_patch("lowrank", D, g, rank=2), cond, gate_threshold(h64, cond, "cosine"))]
    bank = ag.TrainableBank(patches, D) if trainable_bank else fp.PatchBank(patches, D)
    idx = torch.tensor([-1, 0, 1, 2] + [i % 3 for i in range(N - 4)])
    return x, r, w, b, bank, idx, g


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("norm,offset", [("rms", 0.0), ("rms", 1.0), ("layer", 0.0)])
def test_public_op_gradients_match_the_float64_reference(backend, norm, offset):
    x, r, w, b, bank, idx, g = _case(norm, seed=7 + len(norm))
    o, h = fp.fused_add_norm(x, r, w, bias=b, eps=1e-5, norm=norm, bank=bank, index=idx, weight_offset=offset,
                             backend=backend)
    assert o.grad_fn is not None and h.grad_fn is not None, "the public op returned outputs without a backward"
    g_out, g_res = torch.randn(o.shape, generator=g), torch.randn(h.shape, generator=g)
    ((o * g_out).sum() + (h * g_res).sum()).backward()
    ro, rh, rg = _reference(x, r, w, b, bank, idx, norm, 1e-5, offset, g_out, g_res, TRAINED)
    _close(o, ro, 1e-4, "out")
    _close(h, rh, 1e-4, "residual_out")
    ours = {"x": x.grad, "residual": r.grad, "weight": w.grad, "norm_bias": None if b is None else b.grad}
    ours.update({n: getattr(bank, n).grad for n in TRAINED})
    for name, ref in rg.items():
        if ref is None:
            assert ours[name] is None, name
        else:
            _close(ours[name], ref, 1e-4, f"grad {name}")
    assert bank.shift.grad[1].abs().sum() > 0 and bank.up.grad[0].abs().sum() > 0  # not vacuous


def test_public_op_gradients_with_a_frozen_bank():
    """Only the stream and the norm weight require grad (a fitted patch under a fine-tuned model)."""
    x, r, w, b, bank, idx, g = _case("rms", seed=3, trainable_bank=False)
    o, h = fp.fused_add_norm(x, r, w, eps=1e-6, bank=bank, index=idx)
    g_out, g_res = torch.randn(o.shape, generator=g), torch.randn(h.shape, generator=g)
    ((o * g_out).sum() + (h * g_res).sum()).backward()
    _, _, rg = _reference(x, r, w, None, bank, idx, "rms", 1e-6, 0.0, g_out, g_res, ())
    for name, ours in (("x", x.grad), ("residual", r.grad), ("weight", w.grad)):
        _close(ours, rg[name], 1e-4, f"grad {name}")


def test_public_op_output_buffers_with_grad_raise_naming_the_fix():
    x, r, w, _, bank, idx, _ = _case("rms", seed=5)
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    with pytest.raises(ValueError, match=r"out= / residual_out=.*fastpatch\.kernels\.autograd.*no_grad"):
        fp.fused_add_norm(x, r, w, bank=bank, index=idx, out=out, residual_out=res_out)
    with pytest.raises(ValueError, match="residual_out="):
        fp.fused_add_norm(x, r, w, bank=bank, index=idx, residual_out=res_out)
    # the same call without gradients fills the buffers, as before
    with torch.no_grad():
        o, h = fp.fused_add_norm(x, r, w, bank=bank, index=idx, out=out, residual_out=res_out)
    assert o.data_ptr() == out.data_ptr() and h.data_ptr() == res_out.data_ptr()
    ro, rh = reference.fused_add_norm(x.detach(), r.detach(), w.detach(), bank=bank, index=idx)
    _close(o, ro, 1e-4, "out under no_grad")
    _close(h, rh, 1e-4, "residual_out under no_grad")


def test_public_op_without_grad_stays_on_the_kernel_path(monkeypatch):
    """No input requires grad, or grad mode is off: the kernels run, the differentiable op does not."""
    def refuse(*a, **k):
        raise AssertionError("the differentiable op ran for a call that needs no gradient")

    monkeypatch.setattr(ag, "fused_add_norm", refuse)
    x, r, w, _, bank, idx, _ = _case("rms", seed=9, trainable_bank=False)
    plain = [t.detach() for t in (x, r, w)]
    o, h = fp.fused_add_norm(*plain, bank=bank, index=idx)
    assert o.grad_fn is None and h.grad_fn is None
    with torch.no_grad():
        o2, _ = fp.fused_add_norm(x, r, w, bank=bank, index=idx)
    torch.testing.assert_close(o2, o, rtol=0, atol=0)


def test_per_shape_backend_has_an_honest_name():
    """The CUDA per-call chooser is an object, not a module: it says "auto" through ``name`` and
    ``name_of``, and no longer poses as a module through ``__name__``."""
    chooser = backends.PerShape(("reference",))
    assert chooser.name == "auto" and backends.name_of(chooser) == "auto"
    assert "__name__" not in vars(backends.PerShape)
    for name in ("reference", "cpp", "cuda"):
        assert backends.name_of(backends.load(name)) == name
    assert backends.prepare("cpu", "reference") == "reference"


def test_one_unsupported_model_error_for_every_integration():
    from fastpatch.core.errors import UnsupportedModelError
    from fastpatch.integrations import hf, vllm
    from fastpatch.integrations.hf import model_sites
    from fastpatch.integrations.vllm import model as vllm_model

    assert hf.UnsupportedModelError is UnsupportedModelError is vllm.UnsupportedModelError
    assert model_sites.UnsupportedModelError is UnsupportedModelError is vllm_model.UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="does not support"):
        vllm_model.decoder(torch.nn.Linear(2, 2))
