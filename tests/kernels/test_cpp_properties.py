"""Property test: for any shape, patch mix, gate, index pattern and dtype the cpp backend matches the
float64 reference, counts the same firings, and writes every output element (poisoned buffers)."""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from fastpatch.kernels.backends import cpp  # noqa: E402

from casegen import DTYPES, KINDS, assert_matches_reference, make_case, run_backend  # noqa: E402

if not cpp.is_available("cpu"):  # pragma: no cover
    pytest.skip(f"cpp backend unavailable: {cpp.why_unavailable('cpu')}", allow_module_level=True)


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from((None, "mix") + KINDS))
    index_mode = "none" if kind is None else draw(st.sampled_from(("none", "all_off", "mixed")))
    gated = kind is not None and draw(st.booleans())
    D = draw(st.integers(1, 300))
    return dict(
        N=draw(st.integers(1, 40)), D=D, dtype=dtype, kind=kind, gated=gated, index_mode=index_mode,
        norm=draw(st.sampled_from(("rms", "layer"))), residual=draw(st.booleans()),
        num_patches=draw(st.integers(1, 7)), rank=draw(st.integers(1, 9)),
        seed=draw(st.integers(0, 2**16)),
        bank_dtype=draw(st.sampled_from((torch.float32, dtype))),
        # cosine at D = 1 is ±1 for every row: no gap for casegen's threshold (see casegen.check)
        metric=draw(st.sampled_from(("cosine", "projection") if D > 1 else ("projection",))),
        fire=draw(st.sampled_from(("above", "below"))),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cpp_matches_reference(params):
    N, D, dtype = params.pop("N"), params.pop("D"), params.pop("dtype")
    case = make_case(N, D, dtype, **params)
    counts = expected = None
    if case.bank is not None:
        counts = torch.zeros(case.bank.num_patches, dtype=torch.int32)
        expected = torch.zeros_like(counts)
    out, res_out = run_backend(case, "cpp", fire_counts=counts)
    assert_matches_reference(case, out, res_out)
    if counts is not None:
        case.expected(fire_counts=expected)
        assert counts.tolist() == expected.tolist()
