"""The kernel grid, once, on every backend: dtype × rows × hidden × kind × gate × index × norm × residual
through the public op (NaN-poisoned outputs) against the float64 reference (tests/casegen.py holds the
factors, the all-pairs cover and ``check``).

The ``backend`` fixture runs each test on ``cpp`` (CPU), ``triton-interp`` (CPU tensors through the
Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), ``triton-cuda`` and
``cuda`` (both marked ``gpu``: benchmarks/gpu_check.py runs ``pytest -m gpu tests``); each is skipped with
its reason where it cannot run, except that a CUDA machine whose ``cuda`` backend fails to build fails.

The full product (27,648 cases) is too large for the default run, so it is covered in strata:

- small grid: every dtype × kind × gate × index mode × norm × residual on each backend's small sizes,
  one test per dtype/kind/gate;
- no bank: the unpatched op over each backend's sizes;
- all pairs: a greedy cover in which every pair of values of every two factors occurs, over each
  backend's affordable (rows, hidden) shapes (``Grid.shapes``);
- gate modes: cosine / projection × above / below;
- ``-m slow``: the full product over each backend's exhaustive sizes.

Sizes are per backend (``GRIDS``): the interpreter runs one Python program per row, so triton-interp
takes small shapes, samples the small grid (one norm/residual pair per index mode, rotating between
tests) and keeps rows above 64 to the "mix" bank; cpp and cuda run the required rows {1, 3, 64, 257}
× hidden {1, 64, 768, 4097} in full. Bigger, backend-specific shapes (CUDA's streaming rows, triton's
kernel paths, cpp's threads) are in each backend's own test file.

"mix" and "actmix" with index mode "none" are one-patch banks of their first kind: the same case as
"steer" / "lowrank" with index "none", so the grid does not run them twice.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from fastpatch.kernels import backends

from casegen import (DTYPES, GATED, GRID_KINDS, HIDDEN, INDEX_MODES, NORMS, RESIDUAL, ROWS, all_pairs, check,
                     describe)


@dataclass(frozen=True)
class Grid:
    """One backend's sizes for the shared grid."""
    name: str  # the test id
    backend: str  # backend= of the public op
    device: str
    small: tuple  # (N, D) every small-grid test runs
    no_bank: tuple  # (N, D) of the unpatched sweep
    shapes: tuple  # (N, D) the all-pairs cover may draw
    exhaustive: tuple  # (N, D) of the slow full product
    gate_shape: tuple  # (N, D) of the gate-mode cases
    sample_norm_residual: bool = False  # small grid: one (norm, residual) pair per index mode, rotating
    mix_only_from_rows: Optional[int] = None  # the cover's cases with this many rows or more hold the "mix" bank
    tile_rank_from_rows: Optional[int] = None  # slow grid: from these rows on (D >= 16), every other case rank 16
    gpu: bool = False  # the default strata need a GPU (marked gpu)
    gpu_slow: bool = False  # the slow grid is marked gpu too (run by benchmarks/gpu_check.py's -m gpu)

    def marks(self, slow: bool = False):
        return [pytest.mark.gpu] if (self.gpu_slow if slow else self.gpu) else []


SMALL = tuple(itertools.product((1, 3, 64), (1, 64, 768)))
FULL = tuple(itertools.product(ROWS, HIDDEN))
# Each required row count and width at least twice, none of the interpreter's slow products of both.
TRITON_SHAPES = ((1, 1), (3, 1), (1, 64), (257, 64), (64, 768), (3, 768), (1, 4097), (3, 4097))
# (70, 256) with rank 16: the tl.dot tile kernel (>= 64 rows, rank >= 8).
TRITON_EXHAUSTIVE = ((1, 64), (3, 768), (257, 1), (70, 256))
_TRITON = dict(backend="triton", small=((3, 64),), sample_norm_residual=True, no_bank=((1, 1), (3, 64), (3, 4097)),
               shapes=TRITON_SHAPES, exhaustive=TRITON_EXHAUSTIVE, gate_shape=(9, 64), mix_only_from_rows=64,
               tile_rank_from_rows=64)

GRIDS = (
    Grid("cpp", "cpp", "cpu", small=SMALL, no_bank=FULL, shapes=FULL, exhaustive=FULL, gate_shape=(64, 96)),
    Grid("triton-interp", device="cpu", **_TRITON),
    # The same small shapes on a GPU: hundreds of JIT specialisations already; the slow grid is not
    # marked gpu (too many to compile in gpu_check's time), run it there with -m slow.
    Grid("triton-cuda", device="cuda", gpu=True, **_TRITON),
    Grid("cuda", "cuda", "cuda", small=SMALL, no_bank=FULL, shapes=FULL, exhaustive=FULL, gate_shape=(64, 96),
         gpu=True, gpu_slow=True),
)


@pytest.fixture
def backend(request) -> Grid:
    """The grid of request.param, skipped with the reason where its backend cannot run here."""
    grid: Grid = request.param
    if grid.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        module = backends.load(grid.backend)
    except ImportError as e:
        pytest.skip(f"{grid.backend} backend unavailable: {e}")
    if not module.is_available(grid.device):
        reason = module.why_unavailable(grid.device)
        # On a CUDA machine with a CUDA torch the CUDA backend must build: fail, do not skip.
        assert grid.backend != "cuda", f"cuda backend did not build: {reason}"
        pytest.skip(f"{grid.backend} backend unavailable on {grid.device}: {reason}")
    return grid


def _dtype_id(dtype):
    return str(dtype).split(".")[-1]


def _same_as_first_kind(kind, index_mode):
    return kind in ("mix", "actmix") and index_mode == "none"


def _params(cases, slow=False):
    """[(grid, case)] -> pytest params with the grid's marks and ids "<grid>-<case id>"."""
    return [pytest.param(g, case, id=f"{g.name}-{cid}", marks=g.marks(slow)) for g in GRIDS
            for case, cid in cases(g)]


def _grid_params(cases, slow=False):
    return dict(argnames="backend, case", argvalues=_params(cases, slow), indirect=["backend"])


# --- the small grid ------------------------------------------------------------------------------

def _small_items(grid):
    for dtype, kind, gated in itertools.product(DTYPES, GRID_KINDS, GATED):
        yield (dtype, kind, gated), f"{_dtype_id(dtype)}-{kind}-{'gated' if gated else 'ungated'}"


def small_cases(grid, dtype, kind, gated):
    """The small-grid cases of one test: (index mode, N, D, norm, residual). Sampled grids take one
    (norm, residual) pair per index mode and size, rotating with dtype, kind, gate and index mode so
    that each of those meets all four pairs in some test."""
    pairs = list(itertools.product(NORMS, RESIDUAL))
    turn = DTYPES.index(dtype) + GRID_KINDS.index(kind) + 2 * gated
    cases = []
    for m, index_mode in enumerate(INDEX_MODES):
        if _same_as_first_kind(kind, index_mode):
            continue
        chosen = [pairs[(turn + m) % len(pairs)]] if grid.sample_norm_residual else pairs
        cases += [(index_mode, N, D, norm, residual) for N, D in grid.small for norm, residual in chosen]
    return cases


@pytest.mark.parametrize(**_grid_params(_small_items))
def test_small_grid(backend, case):
    dtype, kind, gated = case
    for index_mode, N, D, norm, residual in small_cases(backend, dtype, kind, gated):
        check(backend.backend, N, D, dtype, kind, gated, index_mode, norm, residual, seed=N * 7919 + D,
              device=backend.device)


def test_small_grid_meets_every_pair_of_values():
    """Every small grid, sampled or not, holds every pair of values of every two of its factors."""
    factors = dict(dtype=DTYPES, kind=GRID_KINDS, gated=GATED, index_mode=INDEX_MODES, norm=NORMS,
                   residual=RESIDUAL)
    for grid in GRIDS:
        run = [dict(dtype=dtype, kind=kind, gated=gated, index_mode=c[0], norm=c[3], residual=c[4])
               for (dtype, kind, gated), _ in _small_items(grid) for c in small_cases(grid, dtype, kind, gated)]
        for a, b in itertools.combinations(factors, 2):
            want = {(va, vb) for va in factors[a] for vb in factors[b]
                    if not _same_as_first_kind(*(dict({a: va, b: vb}).get(f) for f in ("kind", "index_mode")))}
            assert {(r[a], r[b]) for r in run} == want, (grid.name, a, b)


# --- no bank -----------------------------------------------------------------------------------

@pytest.mark.parametrize(**_grid_params(lambda g: ((d, _dtype_id(d)) for d in DTYPES)))
def test_no_bank(backend, case):
    dtype = case
    for (N, D), norm, residual in itertools.product(backend.no_bank, NORMS, RESIDUAL):
        check(backend.backend, N, D, dtype, None, False, "none", norm, residual, seed=D, device=backend.device)


# --- all pairs ---------------------------------------------------------------------------------

def cover(grid):
    """The all-pairs cover of the grid's factors over the shapes ``grid`` can afford."""
    factors = dict(dtype=DTYPES, N=tuple(sorted({n for n, _ in grid.shapes})),
                   D=tuple(sorted({d for _, d in grid.shapes})), kind=GRID_KINDS, gated=GATED,
                   index_mode=INDEX_MODES, norm=NORMS, residual=RESIDUAL)
    shapes = set(grid.shapes)

    def allowed(c):
        return ((c["N"], c["D"]) in shapes and not _same_as_first_kind(c["kind"], c["index_mode"])
                and (grid.mix_only_from_rows is None or c["N"] < grid.mix_only_from_rows or c["kind"] == "mix"))

    return all_pairs(factors, allowed=allowed)


_COVERS = {g.name: cover(g) for g in GRIDS}


def _cover_cases(grid):
    for combo in _COVERS[grid.name]:
        dtype, N, D, kind, gated, index_mode, norm, residual = combo
        yield combo, describe(N, D, dtype, kind, gated, index_mode, norm, residual)


@pytest.mark.parametrize(**_grid_params(_cover_cases))
def test_all_pairs(backend, case):
    dtype, N, D, kind, gated, index_mode, norm, residual = case
    seed = zlib.crc32(describe(N, D, dtype, kind, gated, index_mode, norm, residual).encode()) % 10_000
    check(backend.backend, N, D, dtype, kind, gated, index_mode, norm, residual, seed=seed, device=backend.device)


def test_cover_holds_every_size_and_the_largest_shape():
    for grid in GRIDS:
        combos = _COVERS[grid.name]
        assert {c[1] for c in combos} == {n for n, _ in grid.shapes}
        assert {c[2] for c in combos} == {d for _, d in grid.shapes}
        largest = max(grid.shapes, key=lambda s: s[0] * s[1])
        assert any((c[1], c[2]) == largest for c in combos), (grid.name, largest)
        assert all((c[1], c[2]) in grid.shapes for c in combos)
        assert len(combos) < 60, (grid.name, len(combos))


# --- gate modes --------------------------------------------------------------------------------

@pytest.mark.parametrize(**_grid_params(lambda g: (((m, f), f"{m}-{f}") for m in ("cosine", "projection")
                                                   for f in ("above", "below"))))
def test_gate_modes(backend, case):
    metric, fire = case
    N, D = backend.gate_shape
    check(backend.backend, N, D, torch.float32, "mix", True, "mixed", "rms", True, device=backend.device,
          num_patches=5, metric=metric, fire=fire)


# --- the full product (slow) -------------------------------------------------------------------

def _exhaustive_items(grid):
    for dtype, kind, gated, index_mode in itertools.product(DTYPES, GRID_KINDS, GATED, INDEX_MODES):
        if not _same_as_first_kind(kind, index_mode):
            yield (dtype, kind, gated, index_mode), f"{_dtype_id(dtype)}-{kind}-{'gated' if gated else 'ungated'}-" \
                                                    f"{index_mode}"


@pytest.mark.slow
@pytest.mark.parametrize(**_grid_params(_exhaustive_items, slow=True))
def test_exhaustive_grid(backend, case):
    dtype, kind, gated, index_mode = case
    for i, ((N, D), norm, residual) in enumerate(itertools.product(backend.exhaustive, NORMS, RESIDUAL)):
        # rank 16 needs width: over one column, 257 rows' z leave no safe gap for 16 JumpReLU thresholds
        tile = backend.tile_rank_from_rows is not None and N >= backend.tile_rank_from_rows and D >= 16 and i % 2
        check(backend.backend, N, D, dtype, kind, gated, index_mode, norm, residual, seed=N * 7919 + D,
              device=backend.device, rank=16 if tile else 4)
