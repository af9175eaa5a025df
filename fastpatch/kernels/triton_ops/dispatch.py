"""Launch-config choice for the fused add + patch + norm kernels (pure Python, no triton).

Two kernels:

- ``row``: one program per row. With ``SINGLE_PASS`` the whole row lives in registers
  (D ≤ MAX_SINGLE_PASS_D); otherwise the row is walked in BLOCK_D chunks (several passes, no big
  register tile, so no spills for any D). The low-rank part is a loop over rank (two dot products
  of length D per rank), which suits decode: few rows, and the bank rows stay in L2 across rows.
- ``tile``: BLOCK_M rows per program and ``tl.dot`` for h·downᵀ and z·up (rank padded to R_PAD ≥ 16
  by masking). Used for prefill-sized N with TILE_MIN_RANK ≤ rank ≤ TILE_MAX_RANK.
  ``GROUPED`` (a per-row index into a bank of several patches): the block loops over the patches
  its rows use, one dot per patch present (rows of a sequence are consecutive, so a block usually
  holds one or two), so each bank row is read once per patch per block instead of once per row
  (as vLLM's LoRA kernels group tokens by adapter). ``ONE_CHUNK``: the whole row block fits on
  chip (BLOCK_D ≥ D): x and residual are read once and out / residual_out written once (4 units
  of traffic); otherwise three passes over D chunks (x and residual read twice, residual_out
  re-read: 7 units, the re-reads mostly from L2).

``select`` depends on D and rank only through power-of-two buckets and the thresholds below, so
``all_configs`` enumerates every config it can return by probing each bucket (see there).
"""
from __future__ import annotations

import os

from dataclasses import asdict, dataclass, replace

MAX_SINGLE_PASS_D = 4096   # whole row in registers up to here; 8192 needed 16 warps (128-register cap) and spilled
CHUNK_D = 2048             # chunk width of the multi-pass row kernel (4096 spilled with every part on)
TILE_MIN_N = 64            # fewer rows: one program per row keeps more SMs busy
TILE_MIN_RANK = 8          # lower ranks: the per-rank loop is cheaper than a padded 16-wide dot
TILE_MAX_RANK = 128        # R_PAD 256 tiles reach the 255-register cap: such ranks take the row kernel
TILE_BLOCK_M = 32
ONE_CHUNK_BLOCK_M = 16     # tl.dot's smallest M: the most row blocks in flight for a whole-row tile
ONE_CHUNK_MAX_D = 256      # whole-row tiles up to here: 512-wide ones spilled even with 16 warps
ONE_CHUNK_MAX_TILE = 8192  # BLOCK_D × R_PAD bound (16-bit dots): 256 × 64 reached 247 registers
MIN_R_PAD = 16             # tl.dot needs K, N >= 16
MAX_ENUMERATED_RANK = 256  # all_configs covers ranks up to here (larger ranks still run)


@dataclass(frozen=True)
class LaunchConfig:
    kernel: str          # "row" or "tile"
    BLOCK_D: int
    num_warps: int
    SINGLE_PASS: bool = False
    BLOCK_M: int = 1
    R_PAD: int = MIN_R_PAD
    DOT_FP32: bool = False  # tile: fp32 IEEE dots (fp32 banks; the interpreter), else 16-bit tensor cores
    GROUPED: bool = False   # tile: rows index several patches; one dot per patch present in a block
    ONE_CHUNK: bool = False  # tile: BLOCK_D ≥ D, the row block stays in registers (4 units of traffic)

    def constexprs(self) -> dict:
        """The config's compile-time kernel parameters."""
        d = {"BLOCK_D": self.BLOCK_D, "R_PAD": self.R_PAD}
        if self.kernel == "row":
            d["SINGLE_PASS"] = self.SINGLE_PASS
        else:
            d["BLOCK_M"] = self.BLOCK_M
            d["DOT_FP32"] = self.DOT_FP32
            d["GROUPED"] = self.GROUPED
            d["ONE_CHUNK"] = self.ONE_CHUNK
        return d

    def label(self) -> str:
        if self.kernel == "row":
            mode = "single" if self.SINGLE_PASS else "chunked"
            return f"row/{mode} BLOCK_D={self.BLOCK_D} R_PAD={self.R_PAD} warps={self.num_warps}"
        flags = "".join(f" {name}" for name, on in (("one-chunk", self.ONE_CHUNK), ("grouped", self.GROUPED),
                                                    ("fp32dot", self.DOT_FP32)) if on)
        return f"tile BLOCK_M={self.BLOCK_M} BLOCK_D={self.BLOCK_D} R_PAD={self.R_PAD} warps={self.num_warps}{flags}"

    def as_dict(self) -> dict:
        return asdict(self)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rank_pad(rank: int) -> int:
    return max(MIN_R_PAD, next_pow2(rank))


def uses_tile_kernel(N: int, rank: int, index_given: bool = False, num_patches: int = 1,
                     dot_fp32: bool = False) -> bool:
    """Prefill-sized low rank: the tile kernel (grouped by patch when rows index several). Grouped
    fp32-bank tiles above R_PAD 64 spilled at every chunk width: those take the row kernel."""
    if dot_fp32 and is_grouped(index_given, num_patches) and rank_pad(rank) > 64:
        return False
    return N >= TILE_MIN_N and TILE_MIN_RANK <= rank <= TILE_MAX_RANK


def is_grouped(index_given: bool, num_patches: int) -> bool:
    return index_given and num_patches > 1


def tile_chunk(r_pad: int, dot_fp32: bool, grouped: bool) -> int:
    """D-chunk width of the three-pass tile kernel: the widest without register spills on sm_80 /
    sm_90 with every part on (scripts/triton_aot_report.py, JIT specialisation: D divisible by 16).
    With D divisible by 16 a [32, 64] chunk at R_PAD 16 put 8 bytes on the stack (80 registers),
    and the grouped kernel's second set of bank tiles needs narrower chunks at high ranks."""
    if dot_fp32:  # fp32 operand tiles are twice as big
        if r_pad <= 16:
            return 32 if grouped else 64
        if r_pad == 32:
            return 16  # 64 and 32 put 8 bytes on the stack (fp16 sm_80; fp32 sm_90 on triton 3.6)
        return 16
    if r_pad <= 16:
        return 32
    if r_pad == 32:
        return 32 if grouped else 64
    if r_pad == 64:
        return 64
    return 16 if grouped else 32


def select(N: int, D: int, rank: int = 0, index_given: bool = False, num_patches: int = 1,
           dot_fp32: bool = False, interpreted: bool = False) -> LaunchConfig:
    """The launch config for N rows of width D with a bank of this rank (0 = no low-rank part).

    dot_fp32: the tile kernel's dots run in fp32 (an fp32 bank): operand tiles are twice as big.
    interpreted: the Triton interpreter, where every dot is fp32 (its bf16 dot is wrong) and stands
    in for the GPU's 16-bit one, so the configs follow the 16-bit choice (no registers to spill)."""
    if interpreted:
        return replace(select(N, D, rank, index_given, num_patches, False), DOT_FP32=True)
    if uses_tile_kernel(N, rank, index_given, num_patches, dot_fp32):
        r_pad = rank_pad(rank)
        grouped = is_grouped(index_given, num_patches)
        full = max(128, next_pow2(D))  # narrower rows share the 128-wide config (few configs to compile)
        # fp32 whole-row tiles reached 255 registers and spilled even at 128 × 16
        if full <= ONE_CHUNK_MAX_D and full * r_pad <= ONE_CHUNK_MAX_TILE and not dot_fp32:
            return LaunchConfig("tile", BLOCK_D=full, num_warps=4 if full <= 128 else 8, BLOCK_M=ONE_CHUNK_BLOCK_M,
                                R_PAD=r_pad, DOT_FP32=dot_fp32, GROUPED=grouped, ONE_CHUNK=True)
        return LaunchConfig("tile", BLOCK_D=tile_chunk(r_pad, dot_fp32, grouped), num_warps=8, BLOCK_M=TILE_BLOCK_M,
                            R_PAD=r_pad, DOT_FP32=dot_fp32, GROUPED=grouped)
    if D <= MAX_SINGLE_PASS_D:
        block_d = max(128, next_pow2(D))
        # ~16 elements per thread per live row vector: enough to hide latency, few registers.
        warps = min(16, max(1, block_d // 512))
        if block_d == MAX_SINGLE_PASS_D:
            warps = 16  # 8 warps spilled (sm_80, every part on); 16 keep 8 values per thread per row
        return LaunchConfig("row", BLOCK_D=block_d, num_warps=warps, SINGLE_PASS=True)
    # Chunked: the z vector ([R_PAD] fp32) must hold every rank before the second pass.
    # R_PAD 256 with 8 warps put 8 bytes on the stack (fp32, sm_90, D divisible by 16); 16 warps did not.
    r_pad = rank_pad(rank) if rank > 0 else MIN_R_PAD
    return LaunchConfig("row", BLOCK_D=CHUNK_D, num_warps=16 if r_pad >= 256 else 8, SINGLE_PASS=False, R_PAD=r_pad)


def _probe_points():
    """(N, D, rank, index_given, num_patches) points that reach every branch and bucket of select.

    select is constant between consecutive powers of two in D and in rank (it uses D and rank only
    through next_pow2 and comparisons against the power-of-two thresholds above), so probing each
    power of two and one past it, for both N regimes and both index regimes, reaches all outputs.
    """
    Ds = sorted({v for p in range(0, (2 * MAX_SINGLE_PASS_D).bit_length() + 1) for v in (1 << p, (1 << p) + 1)})
    ranks = sorted({0, 1, TILE_MIN_RANK - 1, TILE_MIN_RANK, TILE_MAX_RANK, TILE_MAX_RANK + 1}
                   | {v for p in range(0, MAX_ENUMERATED_RANK.bit_length()) for v in (1 << p, (1 << p) + 1)
                      if v <= MAX_ENUMERATED_RANK})
    for N in (1, TILE_MIN_N - 1, TILE_MIN_N):
        for D in Ds:
            for rank in ranks:
                for index_given, P in ((False, 1), (True, 1), (True, 4)):
                    for dot_fp32 in (False, True):
                        yield N, D, rank, index_given, P, dot_fp32


def all_configs() -> list[LaunchConfig]:
    """Every LaunchConfig that select() can return (ranks up to MAX_ENUMERATED_RANK), sorted."""
    seen = {select(*p) for p in _probe_points()}
    return sorted(seen, key=lambda c: (c.kernel, c.SINGLE_PASS, c.DOT_FP32, c.BLOCK_D, c.R_PAD, c.num_warps))


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``, read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
