"""Bad input gets a clear Python error naming the argument, before any kernel runs."""
import pytest
import torch

import fastpatch as fp

D = 16


def _args(n=4, dtype=torch.float32):
    return torch.randn(n, D, dtype=dtype), torch.randn(n, D, dtype=dtype), torch.randn(D, dtype=dtype)


def _bank(P=2, d=D):
    return fp.PatchBank([fp.Steer(torch.randn(d)) for _ in range(P)], d)


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("call, exc, words", [
    (lambda b: fp.fused_add_norm(torch.randn(4, D), torch.randn(3, D), torch.randn(D), backend=b), ValueError, "residual shape"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), torch.randn(4, D).half(), torch.randn(D), backend=b), TypeError, "residual dtype"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D + 1), backend=b), ValueError, "weight must have shape"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D).half(), backend=b), TypeError, "weight dtype"),
    (lambda b: fp.fused_add_norm(torch.randint(0, 5, (4, D)), None, torch.randn(D), backend=b), TypeError, "x must be"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), norm="batch", backend=b), ValueError, "norm must be"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bias=torch.randn(D), backend=b), ValueError, "bias"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), eps=float("nan"), backend=b), ValueError, "eps"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(1, D + 2), backend=b), ValueError, "hidden_size"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), backend=b), ValueError, "index is required"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0, 1, 2, 0]), backend=b), ValueError, "index values"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0, -2, 1, 0]), backend=b), ValueError, "index values"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0, 1, 1]), backend=b), ValueError, "one entry per row"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0., 1, 1, 0]), backend=b), TypeError, "int32 or int64"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), index=torch.tensor([0, 1, 1, 0]), backend=b), ValueError, "without a bank"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank="steer", backend=b), TypeError, "PatchBank"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0, 1, 1, 0]),
                                 fire_counts=torch.zeros(2, dtype=torch.int64), backend=b), TypeError, "fire_counts"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), bank=_bank(2), index=torch.tensor([0, 1, 1, 0]),
                                 fire_counts=torch.zeros(3, dtype=torch.int32), backend=b), ValueError, "fire_counts"),
    (lambda b: fp.fused_add_norm(torch.randn(4, D), None, torch.randn(D), out=torch.empty(4, D + 1), backend=b), ValueError, "out must match"),
])
def test_bad_call_raises_clear_error(call, exc, words, backend):
    with pytest.raises(exc, match=words):
        call(backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        fp.fused_add_norm(*_args(), backend="vulkan")


@pytest.mark.parametrize("make, words", [
    (lambda: fp.Steer(torch.tensor([1.0, float("nan")])), "NaN"),
    (lambda: fp.Ablate(torch.zeros(D)), "non-zero"),
    (lambda: fp.Clamp(torch.zeros(D), 1.0), "non-zero"),
    (lambda: fp.Clamp(torch.randn(D), float("inf")), "finite"),
    (lambda: fp.LowRank(torch.randn(D, 3), torch.randn(4, D)), "B must have shape"),
    (lambda: fp.LowRank(torch.randn(D, 3), torch.randn(3, D), bias=torch.randn(2)), "bias"),
    (lambda: fp.LoReFT(torch.randn(2, D), torch.randn(3, D), torch.randn(2)), "W"),
    (lambda: fp.Gated(fp.Steer(torch.randn(D)), torch.randn(D + 1), 0.1), "condition"),
    (lambda: fp.Gated(fp.Steer(torch.randn(D)), torch.randn(D), 0.1, metric="l2"), "metric"),
    (lambda: fp.Gated(fp.Steer(torch.randn(D)), torch.zeros(D), 0.1), "non-zero"),
    (lambda: fp.Steer(torch.arange(4)), "floating-point"),
    (lambda: fp.PatchBank([fp.Steer(torch.randn(D)), fp.Steer(torch.randn(D + 1))]), "hidden size"),
    (lambda: fp.PatchBank([]), "at least one"),
])
def test_bad_patch_raises(make, words):
    with pytest.raises((ValueError, TypeError), match=words):
        make()


def test_non_contiguous_inputs_are_handled():
    x = torch.randn(D, 6).T  # non-contiguous [6, D]
    r = torch.randn(6, 2 * D)[:, ::2]
    w = torch.randn(D)
    out, res = fp.fused_add_norm(x, r, w, backend="reference")
    exp_out, exp_res = fp.reference.fused_add_norm(x.contiguous(), r.contiguous(), w)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(res, exp_res)


def test_multi_dim_index_shape_accepted():
    x = torch.randn(2, 3, D)
    bank = _bank(2)
    idx = torch.tensor([[0, 1, -1], [1, 1, 0]], dtype=torch.int32)
    out, res = fp.fused_add_norm(x, None, None, bank=bank, index=idx, backend="reference")
    assert out.shape == x.shape
