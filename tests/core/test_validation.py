"""Bad input gets a clear Python error naming the argument, before any kernel runs."""
import pytest
import torch

import fastpatch as fp

D = 16


def _args(n=4, dtype=torch.float32):
    return torch.randn(n, D, dtype=dtype), torch.randn(n, D, dtype=dtype), torch.randn(D, dtype=dtype)


def _bank(P=2, d=D):
    return fp.PatchBank([fp.Steer(torch.randn(d)) for _ in range(P)], d)


def _idx(*values, dtype=None):
    return torch.tensor(values, dtype=dtype)


# Each case: the arguments that differ from a valid call (x [4, D], no residual, weight [D]).
BAD_CALLS = [
    (dict(residual=lambda: torch.randn(3, D)), ValueError, "residual shape"),
    (dict(residual=lambda: torch.randn(4, D).half()), TypeError, "residual dtype"),
    (dict(weight=lambda: torch.randn(D + 1)), ValueError, "weight must have shape"),
    (dict(weight=lambda: torch.randn(D).half()), TypeError, "weight dtype"),
    (dict(x=lambda: torch.randint(0, 5, (4, D))), TypeError, "x must be"),
    (dict(norm=lambda: "batch"), ValueError, "norm must be"),
    (dict(bias=lambda: torch.randn(D)), ValueError, "bias"),
    (dict(eps=lambda: float("nan")), ValueError, "eps"),
    (dict(bank=lambda: _bank(1, D + 2)), ValueError, "hidden_size"),
    (dict(bank=lambda: _bank(2)), ValueError, "index is required"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, 1, 2, 0)), ValueError, "index values"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, -2, 1, 0)), ValueError, "index values"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, 1, 1)), ValueError, "one entry per row"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, 1, 1, 0, dtype=torch.float32)), TypeError, "int32 or int64"),
    (dict(index=lambda: _idx(0, 1, 1, 0)), ValueError, "without a bank"),
    (dict(bank=lambda: "steer"), TypeError, "PatchBank"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, 1, 1, 0),
          fire_counts=lambda: torch.zeros(2, dtype=torch.int64)), TypeError, "fire_counts"),
    (dict(bank=lambda: _bank(2), index=lambda: _idx(0, 1, 1, 0),
          fire_counts=lambda: torch.zeros(3, dtype=torch.int32)), ValueError, "fire_counts"),
    (dict(out=lambda: torch.empty(4, D + 1)), ValueError, "out must match"),
]


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("changes, exc, words", BAD_CALLS)
def test_bad_call_raises_clear_error(changes, exc, words, backend):
    args = dict(x=lambda: torch.randn(4, D), residual=lambda: None, weight=lambda: torch.randn(D))
    args.update(changes)
    kwargs = {name: make() for name, make in args.items()}
    with pytest.raises(exc, match=words):
        fp.fused_add_norm(kwargs.pop("x"), kwargs.pop("residual"), kwargs.pop("weight"), backend=backend, **kwargs)


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


# --- the same errors once the fast path holds a plan for the weight/bank (fastpatch/kernels/ops.py) ---

_W = torch.randn(D)
_BANK2 = _bank(2)
_IDX = torch.tensor([0, 1, 1, 0])


@pytest.mark.parametrize("backend", ["cpp", None])
@pytest.mark.parametrize("bad, exc, words", [
    (dict(residual=torch.randn(3, D)), ValueError, "residual shape"),
    (dict(residual=torch.randn(4, D).half()), TypeError, "residual dtype"),
    (dict(residual=[[0.0] * D] * 4), TypeError, "residual must be a torch.Tensor"),
    (dict(x=torch.randint(0, 5, (4, D))), TypeError, "x must be"),
    (dict(x=torch.randn(4, D).double()), TypeError, "x must be"),
    (dict(x=torch.randn(4, D + 1), residual=None), ValueError, "weight must have shape"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(eps=[1e-6]), ValueError, "eps"),
    (dict(index=torch.tensor([0, 1, 2, 0])), ValueError, "index values"),
    (dict(index=torch.tensor([0, -2, 1, 0], dtype=torch.int32)), ValueError, "index values"),
    (dict(index=torch.tensor([0, 1, 1])), ValueError, "one entry per row"),
    (dict(index=torch.tensor([[0], [1], [1], [0]])), ValueError, "one entry per row"),
    (dict(index=torch.tensor([0., 1, 1, 0])), TypeError, "int32 or int64"),
    (dict(index=None), ValueError, "index is required"),
    (dict(out=torch.empty(4, D + 1)), ValueError, "out must match"),
    (dict(out=torch.empty(4, D).half()), ValueError, "out must match"),
    (dict(residual_out=torch.empty(D, 4).T), ValueError, "residual_out must be contiguous"),
    (dict(residual_out="buffer"), TypeError, "residual_out must be a torch.Tensor"),
    (dict(fire_counts=torch.zeros(2, dtype=torch.int64)), TypeError, "fire_counts"),
    (dict(x=torch.randn(2, 2, D), residual=torch.randn(4, D)), ValueError, "residual shape"),
    (dict(x=torch.randn(2, 2, D), residual=torch.randn(2, 2, D), out=torch.empty(4, D)), ValueError, "out must match"),
    (dict(x=torch.randn(2, 2, D), residual=torch.randn(2, 2, D), index=torch.tensor([[0, 1, 1, 0]])), ValueError,
     "one entry per row"),
    (dict(x=torch.randn(2, 2, D), residual=torch.randn(2, 2, D), index=torch.tensor([[0, 1], [5, 0]])), ValueError,
     "index values"),
    (dict(x=torch.randn(D), residual=torch.randn(D), index=torch.tensor([2])), ValueError, "index values"),
])
def test_bad_call_after_a_good_one_raises_the_same_error(bad, exc, words, backend):
    good = dict(x=torch.randn(4, D), residual=torch.randn(4, D), eps=1e-6, index=_IDX)
    kw = dict(good, **bad)
    x, residual = kw.pop("x"), kw.pop("residual")
    fp.fused_add_norm(good["x"], good["residual"], _W, bank=_BANK2, index=_IDX, backend=backend)
    fp.fused_add_norm(good["x"], good["residual"], _W, bank=_BANK2, index=_IDX, backend=backend)
    with pytest.raises(exc, match=words):
        fp.fused_add_norm(x, residual, _W, bank=_BANK2, backend=backend, **kw)
