"""Random test cases shared by every backend's tests: one grid, one oracle, one tolerance table.

Inputs are random normals (never zeros); gate thresholds are put in the widest gap between the
rows' metric values so that a backend's rounding cannot flip a gate decision. The kernel grid's
factors, its all-pairs cover and its one ``check`` are here too; tests/kernels/test_backend_grid.py
runs the grid on every backend.
"""
from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass
from typing import Optional

import torch

import fastpatch as fp
from fastpatch import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("steer", "ablate", "clamp", "lowrank", "loreft")
# Patches with a per-component activation (fastpatch.Encoded); "actmix" cycles ACT_MIX through one bank
# (identity low-rank, ReLU, JumpReLU and a steer side by side, ranks padded to the largest).
ACT_KINDS = ("relu", "jumprelu", "actmix")
ACT_MIX = ("lowrank", "relu", "jumprelu", "steer")
# No JumpReLU θ lies closer than this to any row's z: kernels round z differently from the float64
# reference (fp32 sums), and a flip across the jump would be a real error, not rounding.
JUMP_MARGIN = 1e-3

# Tolerances against the float64 reference (rtol, atol). bf16 keeps 8 mantissa bits: the residual
# is rounded once and the normed output twice (the norm reads the rounded residual).
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (3e-3, 4e-3),
}


@contextlib.contextmanager
def one_thread():
    """Case generation and the float64 oracle on one thread: their tensors are small, and torch's
    thread pool costs them far more than it gains (a 768 × 4 QR takes ~20 ms with two threads on a
    busy machine, ~0.01 ms with one). Backends under test keep the caller's threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BadDraw(AssertionError):
    """A random case too close to a decision edge to test (see jump_thresholds)."""


def jump_thresholds(h: torch.Tensor, down: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per component, a JumpReLU θ between the rows' z = h·downᵀ + bias values (the widest gap near the
    median, as for gates) so that some rows pass the jump and some do not; with one row, θ sits 0.25
    below z on even components (fires) and 0.25 above on odd ones (does not)."""
    z = h @ down.T + bias  # [N, r]
    out = []
    for r in range(z.shape[1]):
        v, _ = torch.sort(z[:, r])
        if v.numel() == 1:
            out.append(float(v[0]) + (-0.25 if r % 2 == 0 else 0.25))
            continue
        n = v.numel()
        lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4 + 1)
        j = int(torch.argmax(v[lo + 1:hi + 1] - v[lo:hi])) + lo
        out.append(float((v[j] + v[j + 1]) / 2))
    thr = torch.tensor(out, dtype=torch.float64)
    margin = float((z - thr).abs().min())
    if margin < JUMP_MARGIN:  # never silently flaky: a case this close is a bad draw, say so
        raise BadDraw(f"casegen: a JumpReLU threshold lies {margin:.2g} from a row's z (< {JUMP_MARGIN}); "
                             "pick another seed or size")
    return thr


def make_patch(kind: str, D: int, gen: torch.Generator, rank: int = 4,
               h: Optional[torch.Tensor] = None) -> fp.Patch:
    """A random patch of ``kind``; "jumprelu" places its thresholds between the z values of rows ``h``."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind in ("relu", "jumprelu"):
        down, bias, up = randn(rank, D) / D**0.5, randn(rank) * 0.5, randn(rank, D) / rank**0.5
        if kind == "relu":
            return fp.Encoded(down, bias, up, activation="relu")
        if h is None:
            h = randn(8, D)
        return fp.Encoded(down, bias, up, shift=randn(D) * 0.1, activation="jumprelu",
                          threshold=jump_thresholds(h, down, bias))
    if kind == "steer":
        return fp.Steer(randn(D), scale=0.5 + torch.rand(1, generator=gen).item())
    if kind == "ablate":
        return fp.Ablate(randn(D))
    if kind == "clamp":
        return fp.Clamp(randn(D), value=float(randn(1)))
    if kind == "lowrank":
        return fp.LowRank(randn(D, rank) / D**0.5, randn(rank, D) / rank**0.5, bias=randn(rank) * 0.3, scale=0.7)
    if kind == "loreft":
        q, _ = torch.linalg.qr(randn(D, rank)) if D >= rank else (randn(D, rank), None)
        R = q.T.contiguous()  # orthonormal rows, as pyreft trains them
        return fp.LoReFT(R, R + randn(rank, D) * 0.3 / D**0.5, randn(rank) * 0.3)
    raise ValueError(kind)


def gate_threshold(h: torch.Tensor, condition: torch.Tensor, metric: str) -> float:
    """A threshold in the widest gap between rows' metric values, near their median."""
    c = condition.to(torch.float64)
    c = c / c.norm()
    proj = h @ c
    if metric == "cosine":
        hn = h.norm(dim=-1)
        vals = torch.where(hn > 0, proj / hn.clamp_min(1e-300), torch.zeros_like(hn))
    else:
        vals = proj
    v, _ = torch.sort(vals)
    if v.numel() == 1:
        return float(v[0]) - 0.05
    n = v.numel()
    lo, hi = max(0, n // 4 - 1), min(n - 1, (3 * n) // 4 + 1)
    gaps = v[lo + 1:hi + 1] - v[lo:hi]
    j = int(torch.argmax(gaps)) + lo
    return float((v[j] + v[j + 1]) / 2)


@dataclass
class Case:
    x: torch.Tensor
    residual: Optional[torch.Tensor]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    norm: str
    eps: float
    bank: Optional[fp.PatchBank]
    index: Optional[torch.Tensor]

    def kwargs(self) -> dict:
        return dict(bias=self.bias, eps=self.eps, norm=self.norm, bank=self.bank, index=self.index)

    def expected(self, fire_counts=None):
        """(out, residual_out) in float64 from the reference."""
        with one_thread():
            return reference.fused_add_norm(self.x, self.residual, self.weight, exact=True,
                                            fire_counts=fire_counts, **self.kwargs())


@one_thread()
def make_case(N: int, D: int, dtype: torch.dtype, *, kind: Optional[str] = "steer", gated: bool = False,
              index_mode: str = "none", norm: str = "rms", residual: bool = True, num_patches: int = 3,
              rank: int = 4, seed: int = 0, device="cpu", bank_dtype=torch.float32,
              metric: str = "cosine", fire: str = "above") -> Case:
    """A random case. kind=None: no bank; "mix": kinds cycle over the bank. index_mode: "none" (index=None,
    one-patch bank), "all_off" (all −1), "mixed" (random ids incl. −1 over ``num_patches`` patches)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype)
    res = torch.randn(N, D, generator=gen, dtype=torch.float64).to(dtype) if residual else None
    weight = (1 + 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype)
    bias = (0.2 * torch.randn(D, generator=gen, dtype=torch.float64)).to(dtype) if norm == "layer" else None
    bank = index = None
    if kind is not None:
        h = x.to(torch.float64) + (res.to(torch.float64) if res is not None else 0)
        P = 1 if index_mode == "none" else num_patches
        patches = []
        for k in range(P):
            # kind="mix" cycles through kinds so one bank holds several kinds and ranks
            kk = (KINDS[k % len(KINDS)] if kind == "mix" else ACT_MIX[k % len(ACT_MIX)] if kind == "actmix"
                  else kind)
            p = make_patch(kk, D, gen, rank=rank if kk != "relu" else rank + 1, h=h)
            if gated:
                cond = torch.randn(D, generator=gen, dtype=torch.float64)
                p = fp.Gated(p, cond, gate_threshold(h, cond, metric), metric=metric, fire=fire)
            patches.append(p)
        bank = fp.PatchBank(patches, D, dtype=bank_dtype)
        if index_mode == "all_off":
            index = torch.full((N,), -1, dtype=torch.int64)
        elif index_mode == "mixed":
            index = torch.randint(-1, P, (N,), generator=gen, dtype=torch.int64)
        elif index_mode != "none":
            raise ValueError(index_mode)
    dev = torch.device(device)

    def mv(t):
        return None if t is None else t.to(dev)

    return Case(mv(x), mv(res), mv(weight), mv(bias), norm, 1e-6, None if bank is None else bank.to(dev),
                mv(index))


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element a kernel forgets to write fails the comparison."""
    return torch.full_like(x, float("nan"))


def assert_matches_reference(case: Case, out: torch.Tensor, residual_out: torch.Tensor) -> None:
    # .cpu(): for device="cuda" cases the reference computes on the GPU (float64) too.
    exp_out, exp_res = (t.cpu() for t in case.expected())
    rtol, atol = TOLERANCES[case.x.dtype]
    assert out.dtype == case.x.dtype and residual_out.dtype == case.x.dtype
    with one_thread():
        torch.testing.assert_close(residual_out.cpu().double(), exp_res, rtol=rtol, atol=atol,
                                   msg=lambda m: f"residual_out differs from reference: {m}")
        torch.testing.assert_close(out.cpu().double(), exp_out, rtol=rtol, atol=atol,
                                   msg=lambda m: f"out differs from reference: {m}")


def run_backend(case: Case, backend: str, fire_counts=None, poison: bool = True):
    """Call the public op with NaN-poisoned output buffers; returns (out, residual_out)."""
    out = poisoned_like(case.x) if poison else None
    res_out = poisoned_like(case.x) if poison else None
    return fp.fused_add_norm(case.x, case.residual, case.weight, out=out, residual_out=res_out,
                             fire_counts=fire_counts, backend=backend, **case.kwargs())


# --- the kernel grid: factors, all-pairs cover, one check -------------------------------------------

GRID_KINDS = KINDS + ("mix",) + ACT_KINDS  # "mix" cycles KINDS through one bank, "actmix" cycles ACT_MIX
ROWS = (1, 3, 64, 257)
HIDDEN = (1, 64, 768, 4097)
GATED = (False, True)
INDEX_MODES = ("none", "all_off", "mixed")
NORMS = ("rms", "layer")
RESIDUAL = (True, False)


def all_pairs(factors: dict, seed: int = 0, candidates: int = 60, allowed=None) -> list[tuple]:
    """A small list of combinations in which every pair of values of every two factors occurs.

    Greedy: each round fixes one uncovered pair, draws ``candidates`` random completions and keeps the
    one covering most uncovered pairs (deterministic for a seed); ~35 rows for the full kernel grid
    instead of 27,648. ``allowed(dict of factor -> value)`` rules combinations out (a backend's
    affordable shapes); a pair that no drawn allowed completion holds is dropped as infeasible.
    """
    rng = random.Random(seed)
    names = list(factors)
    pairs = list(itertools.combinations(range(len(names)), 2))
    uncovered = {(a, va, b, vb) for a, b in pairs
                 for va in range(len(factors[names[a]])) for vb in range(len(factors[names[b]]))}
    rows = []
    while uncovered:
        # seed every round with one uncovered pair so the loop always progresses
        a, va, b, vb = min(uncovered)
        best, best_gain = None, -1
        for _ in range(candidates):
            combo = [rng.randrange(len(factors[n])) for n in names]
            combo[a], combo[b] = va, vb
            if allowed is not None and not allowed({n: factors[n][v] for n, v in zip(names, combo)}):
                continue
            gain = sum((i, combo[i], j, combo[j]) in uncovered for i, j in pairs)
            if gain > best_gain:
                best, best_gain = combo, gain
        if best is None:  # no allowed combination holds this pair
            uncovered.discard((a, va, b, vb))
            continue
        for i, j in pairs:
            uncovered.discard((i, best[i], j, best[j]))
        rows.append(tuple(factors[n][v] for n, v in zip(names, best)))
    return rows


DRAWS = 8


def describe(N, D, dtype, kind, gated, index_mode, norm, residual, **kw) -> str:
    """A grid case in one line (test ids, failure notes)."""
    extra = "".join(f"-{k}={v}" for k, v in sorted(kw.items()))
    return (f"{str(dtype).split('.')[-1]}-{N}x{D}-{kind}-{'gated' if gated else 'ungated'}-{index_mode}-{norm}-"
            f"{'res' if residual else 'nores'}{extra}")


def check(backend: str, N: int, D: int, dtype: torch.dtype, kind: Optional[str] = "steer", gated: bool = False,
          index_mode: str = "none", norm: str = "rms", residual: bool = True, *, seed: int = 0,
          device="cpu", **kw) -> Case:
    """One grid case through the public op on ``backend`` with poisoned outputs, against the float64
    reference; returns the case. A failure names the case (the grid loops several per test). A draw
    with a JumpReLU threshold too close to a row (wide, many-row cases: 257 × 1) is redrawn with the
    next seed, deterministically, at most DRAWS times."""
    # "mix" cycles all five kinds (six patches: one kind twice), "actmix" the four of ACT_MIX
    kw.setdefault("num_patches", 6 if kind == "mix" else 4 if kind == "actmix" else 3)
    if gated and D == 1:
        # At D = 1 every row's cosine is exactly ±1, so casegen's threshold lands on the metric
        # values themselves and fp32 rounding decides the gate; the projection has real gaps.
        kw.setdefault("metric", "projection")
    for draw in range(DRAWS):
        try:
            case = make_case(N, D, dtype, kind=kind, gated=gated, index_mode=index_mode, norm=norm, residual=residual,
                             seed=seed, device=device, **kw)
            break
        except BadDraw:
            if draw == DRAWS - 1:
                raise
            seed += 1_000_003  # the next draw of the same case; the seed used is named on failure
    try:
        out, res_out = run_backend(case, backend)
        assert out.device == case.x.device and res_out.device == case.x.device
        assert_matches_reference(case, out, res_out)
    except AssertionError as e:
        e.add_note(f"case: backend={backend} device={device} seed={seed} "
                   f"{describe(N, D, dtype, kind, gated, index_mode, norm, residual, **kw)}")
        raise
    return case
