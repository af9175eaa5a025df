"""Fused residual add + activation patch + RMSNorm/LayerNorm in Triton.

Semantics are fastpatch.reference's: h = x + residual (fp32), h' = h + g(h)·(φ(h·downᵀ + bias)·up +
shift) with patch k = index[row] (−1 or out of range: no patch), residual_out = h' rounded to x's
dtype, out = norm(residual_out)·(weight + weight_offset) (+ bias).

Every optional part is a constexpr flag, so an unpatched call compiles to a plain fused add + norm and
an all-identity bank (HAS_ACT off) to the code it had before activations existed. With HAS_ACT, φ is
one compare + select per component against the bank's level t (PatchBank.act_threshold):
φ(z) = z if z > t else 0 (t = -inf identity, 0 ReLU, max(θ, 0) JumpReLU), applied to z in fp32.
Launch configs come from :mod:`fastpatch.kernels.triton_ops.dispatch`. Outputs may alias x or residual:
each program reads a row (or chunk) in full before it writes that row (or chunk) back, and the
multi-pass variants only re-read what they wrote themselves (residual_out), after a barrier.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core import patches as _patches
from . import dispatch
from .dispatch import interpreting

# The gate modes of fastpatch.core.patches, as constexprs the kernels can read.
GATE_NONE = tl.constexpr(_patches.GATE_NONE)
GATE_COSINE_ABOVE = tl.constexpr(_patches.GATE_COSINE_ABOVE)
GATE_COSINE_BELOW = tl.constexpr(_patches.GATE_COSINE_BELOW)
GATE_PROJECTION_ABOVE = tl.constexpr(_patches.GATE_PROJECTION_ABOVE)


@triton.jit
def _load_h(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _gate_fires(proj, sumsq, mode, threshold):
    """Gate decision from h·ĉ and ‖h‖²: works on scalars (one row) and on vectors (a row block)."""
    norm = tl.sqrt(sumsq)
    cosine = tl.where(norm > 0, proj / tl.where(norm > 0, norm, 1.0), 0.0)
    is_cosine = (mode == GATE_COSINE_ABOVE) | (mode == GATE_COSINE_BELOW)
    metric = tl.where(is_cosine, cosine, proj)
    above = (mode == GATE_COSINE_ABOVE) | (mode == GATE_PROJECTION_ABOVE)
    fires = tl.where(above, metric > threshold, metric < threshold)
    return (mode == GATE_NONE) | fires


@triton.jit
def _norm_scale(w_ptr, cols, mask, weight_offset, HAS_WEIGHT: tl.constexpr):
    if HAS_WEIGHT:
        return tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    else:
        return tl.zeros_like(cols.to(tl.float32)) + (1.0 + weight_offset)


@triton.jit
def fused_add_norm_row_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr,
    down_ptr, down_bias_ptr, up_ptr, shift_ptr, gate_dir_ptr, gate_thr_ptr, gate_mode_ptr, act_thr_ptr,
    index_ptr, fire_ptr,
    D, rank, num_patches, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYER: tl.constexpr,
    HAS_PATCH: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_LOWRANK: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_GATE: tl.constexpr, COUNT_FIRES: tl.constexpr, HAS_ACT: tl.constexpr,
    SINGLE_PASS: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Move the row pointers once (64-bit scalar math) so per-element offsets stay 32-bit.
    row_start = row * D
    x_ptr += row_start
    res_ptr += row_start
    out_ptr += row_start
    res_out_ptr += row_start
    out_dtype = res_out_ptr.dtype.element_ty

    if HAS_PATCH:
        if HAS_INDEX:
            k = tl.load(index_ptr + row)
            valid = (k >= 0) & (k < num_patches)  # compared in the index's own dtype: no wraparound
            k = tl.where(valid, k, 0).to(tl.int64)
        else:
            k = row * 0
            valid = k == 0
        if HAS_GATE:
            mode = tl.load(gate_mode_ptr + k)
            threshold = tl.load(gate_thr_ptr + k)

    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        h = _load_h(x_ptr, res_ptr, cols, mask, HAS_RESIDUAL)
        if HAS_PATCH:
            fires = valid
            if HAS_GATE:
                c = tl.load(gate_dir_ptr + k * D + cols, mask=mask, other=0.0).to(tl.float32)
                fires = fires & _gate_fires(tl.sum(h * c, 0), tl.sum(h * h, 0), mode, threshold)
            if COUNT_FIRES:
                tl.atomic_add(fire_ptr + k, 1, mask=fires)
            delta = tl.zeros([BLOCK_D], dtype=tl.float32)
            if HAS_LOWRANK:
                for r in range(rank):
                    base = (k * rank + r) * D
                    d_r = tl.load(down_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
                    z_r = tl.sum(h * d_r, 0) + tl.load(down_bias_ptr + k * rank + r).to(tl.float32)
                    if HAS_ACT:
                        z_r = tl.where(z_r > tl.load(act_thr_ptr + k * rank + r), z_r, 0.0)
                    u_r = tl.load(up_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
                    delta += z_r * u_r
            if HAS_SHIFT:
                delta += tl.load(shift_ptr + k * D + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.where(fires, h + delta, h)
        rounded = h.to(out_dtype)
        tl.store(res_out_ptr + cols, rounded, mask=mask)
        y = rounded.to(tl.float32)  # the norm reads the stored (rounded) residual, as the reference does
        if IS_LAYER:
            mean = tl.sum(y, 0) / D
            y = tl.where(mask, y - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(y * y, 0) / D + eps)
        o = y * rstd * _norm_scale(w_ptr, cols, mask, weight_offset, HAS_WEIGHT)
        if HAS_BIAS:
            o += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, o.to(out_dtype), mask=mask)
    else:
        # Multi-pass over BLOCK_D chunks. Pass 1: gate statistics and z = h·downᵀ over the whole row.
        offs_r = tl.arange(0, R_PAD)
        if HAS_PATCH:
            fires = valid
            if HAS_GATE or HAS_LOWRANK:
                # Scalar accumulators (one reduction per chunk): [BLOCK_D] ones cost registers.
                proj = 0.0
                sumsq = 0.0
                z = tl.zeros([R_PAD], dtype=tl.float32)
                for start in range(0, D, BLOCK_D):
                    cols = start + tl.arange(0, BLOCK_D)
                    mask = cols < D
                    h = _load_h(x_ptr, res_ptr, cols, mask, HAS_RESIDUAL)
                    if HAS_GATE:
                        c = tl.load(gate_dir_ptr + k * D + cols, mask=mask, other=0.0).to(tl.float32)
                        proj += tl.sum(h * c, 0)
                        sumsq += tl.sum(h * h, 0)
                    if HAS_LOWRANK:
                        for r in range(rank):
                            d_r = tl.load(down_ptr + (k * rank + r) * D + cols, mask=mask, other=0.0)
                            z = tl.where(offs_r == r, z + tl.sum(h * d_r.to(tl.float32), 0), z)
                if HAS_GATE:
                    fires = fires & _gate_fires(proj, sumsq, mode, threshold)
                if HAS_LOWRANK:
                    z += tl.load(down_bias_ptr + k * rank + offs_r, mask=offs_r < rank, other=0.0).to(tl.float32)
                    if HAS_ACT:
                        t = tl.load(act_thr_ptr + k * rank + offs_r, mask=offs_r < rank, other=0.0)
                        z = tl.where(z > t, z, 0.0)
            if COUNT_FIRES:
                tl.atomic_add(fire_ptr + k, 1, mask=fires)
        # Pass 2: apply the patch, store residual_out, accumulate the norm's sums.
        sum_y = 0.0
        sumsq_y = 0.0
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            h = _load_h(x_ptr, res_ptr, cols, mask, HAS_RESIDUAL)
            if HAS_PATCH:
                delta = tl.zeros([BLOCK_D], dtype=tl.float32)
                if HAS_LOWRANK:
                    for r in range(rank):
                        z_r = tl.sum(tl.where(offs_r == r, z, 0.0), 0)
                        u_r = tl.load(up_ptr + (k * rank + r) * D + cols, mask=mask, other=0.0)
                        delta += z_r * u_r.to(tl.float32)
                if HAS_SHIFT:
                    delta += tl.load(shift_ptr + k * D + cols, mask=mask, other=0.0).to(tl.float32)
                h = tl.where(fires, h + delta, h)
            rounded = h.to(out_dtype)
            tl.store(res_out_ptr + cols, rounded, mask=mask)
            y = rounded.to(tl.float32)
            sum_y += tl.sum(y, 0)
            sumsq_y += tl.sum(y * y, 0)
        tl.debug_barrier()  # residual_out chunks written by other threads are re-read below
        mean = sum_y / D
        if IS_LAYER:
            # Second pass for the variance about the mean: E[y²] − mean² cancels badly.
            var = 0.0
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < D
                y = tl.load(res_out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                y = tl.where(mask, y - mean, 0.0)
                var += tl.sum(y * y, 0)
            rstd = tl.rsqrt(var / D + eps)
        else:
            rstd = tl.rsqrt(sumsq_y / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            mask = cols < D
            y = tl.load(res_out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_LAYER:
                y = y - mean
            o = y * rstd * _norm_scale(w_ptr, cols, mask, weight_offset, HAS_WEIGHT)
            if HAS_BIAS:
                o += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + cols, o.to(out_dtype), mask=mask)


@triton.jit
def _tile_dot(a, b, DOT_FP32: tl.constexpr):
    """a·b with fp32 accumulation: IEEE fp32 operands, or a's operands in b's 16-bit dtype."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _tile_gate_stats(h, cols, col_mask, mask, kD, gate_dir_ptr, GROUPED: tl.constexpr):
    """(h·ĉ, ‖h‖²) per row of this chunk; GROUPED: each row's own patch's direction."""
    if GROUPED:
        c = tl.load(gate_dir_ptr + kD[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.load(gate_dir_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.sum(h * c, 1), tl.sum(h * h, 1)


@triton.jit
def _tile_z(h, z, cols, col_mask, k, valid, k_lo, k_hi, down_ptr, D, rank, offs_r, r_mask,
            GROUPED: tl.constexpr, DOT_FP32: tl.constexpr):
    """z += h·downᵀ over this chunk's columns (down_t tiles [BLOCK_D, R_PAD]). GROUPED: one dot per
    patch present in the block (k_lo..k_hi, skipping absent ones), kept for that patch's rows."""
    tile = offs_r[None, :] * D + cols[:, None]
    tile_mask = col_mask[:, None] & r_mask[None, :]
    if GROUPED:
        for kk in range(k_lo, k_hi + 1):
            sel = valid & (k == kk)
            if tl.sum(sel.to(tl.int32), 0) > 0:
                down_t = tl.load(down_ptr + kk * rank * D + tile, mask=tile_mask, other=0.0)
                z = tl.where(sel[:, None], z + _tile_dot(h, down_t, DOT_FP32), z)
    else:
        down_t = tl.load(down_ptr + tile, mask=tile_mask, other=0.0)
        z += _tile_dot(h, down_t, DOT_FP32)
    return z


@triton.jit
def _tile_delta(z, cols, col_mask, mask, k, valid, kD, k_lo, k_hi, up_ptr, shift_ptr, D, rank, offs_r, r_mask,
                GROUPED: tl.constexpr, HAS_SHIFT: tl.constexpr, DOT_FP32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """z·up + shift for this chunk's columns ([BLOCK_M, BLOCK_D] fp32). GROUPED: per patch present,
    the dot of that patch's rows of z (others zeroed) with its up tile."""
    tile = offs_r[:, None] * D + cols[None, :]
    tile_mask = r_mask[:, None] & col_mask[None, :]
    if GROUPED:
        delta = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for kk in range(k_lo, k_hi + 1):
            sel = valid & (k == kk)
            if tl.sum(sel.to(tl.int32), 0) > 0:
                up = tl.load(up_ptr + kk * rank * D + tile, mask=tile_mask, other=0.0)
                delta += _tile_dot(tl.where(sel[:, None], z, 0.0), up, DOT_FP32)
        if HAS_SHIFT:
            delta += tl.load(shift_ptr + kD[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        up = tl.load(up_ptr + tile, mask=tile_mask, other=0.0)
        delta = _tile_dot(z, up, DOT_FP32)
        if HAS_SHIFT:
            delta += tl.load(shift_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return delta


@triton.jit
def fused_add_norm_tile_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr,
    down_ptr, down_bias_ptr, up_ptr, shift_ptr, gate_dir_ptr, gate_thr_ptr, gate_mode_ptr, act_thr_ptr,
    index_ptr, fire_ptr,
    N, D, rank, num_patches, eps, weight_offset,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYER: tl.constexpr,
    HAS_INDEX: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_GATE: tl.constexpr, COUNT_FIRES: tl.constexpr,
    HAS_ACT: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, R_PAD: tl.constexpr,
    GROUPED: tl.constexpr, ONE_CHUNK: tl.constexpr,
):
    """BLOCK_M rows, low-rank part by tl.dot (rank padded to R_PAD by masking).

    Not GROUPED: every row uses bank patch 0 (index None, or a one-patch bank): rows differ only in
    whether the patch fires. GROUPED: rows index a bank of several patches; the dots run once per
    patch present in the block. ONE_CHUNK (BLOCK_D ≥ D): the block's rows stay in registers, so x
    and residual are read once and residual_out is not re-read; else three passes over D chunks.
    DOT_FP32: dot in fp32 with IEEE precision (fp32 banks, where TF32 would miss the fp32
    tolerance, and the interpreter, whose bf16 tl.dot is wrong); otherwise the bank's 16-bit dtype.
    """
    pid = tl.program_id(0)
    local_rows = tl.arange(0, BLOCK_M)
    rows = pid * BLOCK_M + local_rows
    row_mask = rows < N
    # Move the row pointers to this block once (64-bit scalar math), so the per-element offsets
    # are 32-bit: [BLOCK_M, BLOCK_D] tiles of 64-bit offsets cost two registers per element.
    block_start = pid.to(tl.int64) * BLOCK_M * D
    x_ptr += block_start
    res_ptr += block_start
    out_ptr += block_start
    res_out_ptr += block_start
    out_dtype = res_out_ptr.dtype.element_ty
    if HAS_INDEX:
        k = tl.load(index_ptr + rows, mask=row_mask, other=-1)  # rows: int32, N < 2**31
        valid = row_mask & (k >= 0) & (k < num_patches)  # compared in the index's own dtype
        k = tl.where(valid, k, 0).to(tl.int32)
    else:
        k = local_rows * 0
        valid = row_mask
    fires = valid
    if GROUPED:
        # 64-bit, so that kk * rank * D in the patch loop cannot wrap
        k_lo = tl.min(tl.where(valid, k, num_patches), 0).to(tl.int64)
        k_hi = tl.max(tl.where(valid, k, -1), 0).to(tl.int64)
        kD = k.to(tl.int64) * D  # each row's patch's D-vectors (shift, gate direction)
    else:
        k_lo = 0
        k_hi = 0
        kD = k.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < rank
    if GROUPED:
        z_bias = tl.load(down_bias_ptr + k[:, None] * rank + offs_r[None, :],
                         mask=valid[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    else:
        z_bias = tl.load(down_bias_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_ACT:  # per-component levels t of φ(z) = z if z > t else 0 (padding columns: z = 0 anyway)
        if GROUPED:
            z_level = tl.load(act_thr_ptr + k[:, None] * rank + offs_r[None, :],
                              mask=valid[:, None] & r_mask[None, :], other=0.0)
        else:
            z_level = tl.load(act_thr_ptr + offs_r, mask=r_mask, other=0.0)[None, :]
    if HAS_GATE:
        if GROUPED:
            mode = tl.load(gate_mode_ptr + k, mask=valid, other=0)
            threshold = tl.load(gate_thr_ptr + k, mask=valid, other=0.0)
        else:
            mode = tl.load(gate_mode_ptr)
            threshold = tl.load(gate_thr_ptr)

    if ONE_CHUNK:
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < D
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = local_rows[:, None] * D + cols[None, :]
        h = _load_h(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL)
        if HAS_GATE:
            proj, sumsq = _tile_gate_stats(h, cols, col_mask, mask, kD, gate_dir_ptr, GROUPED)
            fires = fires & _gate_fires(proj, sumsq, mode, threshold)
        z = _tile_z(h, tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32), cols, col_mask, k, valid, k_lo, k_hi,
                    down_ptr, D, rank, offs_r, r_mask, GROUPED, DOT_FP32) + z_bias
        if HAS_ACT:
            z = tl.where(z > z_level, z, 0.0)  # in fp32, before the 16-bit cast for the second dot
        if not DOT_FP32:
            z = z.to(down_ptr.dtype.element_ty)
        delta = _tile_delta(z, cols, col_mask, mask, k, valid, kD, k_lo, k_hi, up_ptr, shift_ptr, D, rank, offs_r,
                            r_mask, GROUPED, HAS_SHIFT, DOT_FP32, BLOCK_M, BLOCK_D)
        h = tl.where(fires[:, None], h + delta, h)
        rounded = h.to(out_dtype)
        tl.store(res_out_ptr + offsets, rounded, mask=mask)
        y = rounded.to(tl.float32)  # the norm reads the stored (rounded) residual
        if IS_LAYER:
            mean = tl.sum(y, 1) / D
            y = tl.where(mask, y - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(y * y, 1) / D + eps)
        o = y * rstd[:, None] * _norm_scale(w_ptr, cols, col_mask, weight_offset, HAS_WEIGHT)[None, :]
        if HAS_BIAS:
            o += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, o.to(out_dtype), mask=mask)
    else:
        # Pass 1: z = h·downᵀ and the gate statistics, chunk by chunk.
        z = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        proj = tl.zeros([BLOCK_M], dtype=tl.float32)
        sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            h = _load_h(x_ptr, res_ptr, local_rows[:, None] * D + cols[None, :], mask, HAS_RESIDUAL)
            if HAS_GATE:
                p, s = _tile_gate_stats(h, cols, col_mask, mask, kD, gate_dir_ptr, GROUPED)
                proj += p
                sumsq += s
            z = _tile_z(h, z, cols, col_mask, k, valid, k_lo, k_hi, down_ptr, D, rank, offs_r, r_mask, GROUPED,
                        DOT_FP32)
        z += z_bias
        if HAS_ACT:
            z = tl.where(z > z_level, z, 0.0)
        if HAS_GATE:
            fires = fires & _gate_fires(proj, sumsq, mode, threshold)
        if not DOT_FP32:
            z = z.to(down_ptr.dtype.element_ty)

        # Pass 2: h' = h + g·(z·up + shift); store residual_out; accumulate the norm's sums.
        sum_y = tl.zeros([BLOCK_M], dtype=tl.float32)
        sumsq_y = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = local_rows[:, None] * D + cols[None, :]
            h = _load_h(x_ptr, res_ptr, offsets, mask, HAS_RESIDUAL)
            delta = _tile_delta(z, cols, col_mask, mask, k, valid, kD, k_lo, k_hi, up_ptr, shift_ptr, D, rank,
                                offs_r, r_mask, GROUPED, HAS_SHIFT, DOT_FP32, BLOCK_M, BLOCK_D)
            h = tl.where(fires[:, None], h + delta, h)
            rounded = h.to(out_dtype)
            tl.store(res_out_ptr + offsets, rounded, mask=mask)
            y = rounded.to(tl.float32)
            sum_y += tl.sum(y, 1)
            sumsq_y += tl.sum(y * y, 1)
        tl.debug_barrier()  # residual_out written above by other threads is re-read below
        mean = sum_y / D
        if IS_LAYER:
            var = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (cols < D)[None, :]
                y = tl.load(res_out_ptr + local_rows[:, None] * D + cols[None, :], mask=mask,
                            other=0.0).to(tl.float32)
                y = tl.where(mask, y - mean[:, None], 0.0)
                var += tl.sum(y * y, 1)
            rstd = tl.rsqrt(var / D + eps)
        else:
            rstd = tl.rsqrt(sumsq_y / D + eps)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            mask = row_mask[:, None] & col_mask[None, :]
            offsets = local_rows[:, None] * D + cols[None, :]
            y = tl.load(res_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if IS_LAYER:
                y = y - mean[:, None]
            o = y * rstd[:, None] * _norm_scale(w_ptr, cols, col_mask, weight_offset, HAS_WEIGHT)[None, :]
            if HAS_BIAS:
                o += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offsets, o.to(out_dtype), mask=mask)
    if COUNT_FIRES:
        if GROUPED:
            tl.atomic_add(fire_ptr + k, 1, mask=fires)
        else:
            tl.atomic_add(fire_ptr, tl.sum(fires.to(tl.int32), 0))  # one atomic per block


KERNELS = {"row": fused_add_norm_row_kernel, "tile": fused_add_norm_tile_kernel}


def launch(x, residual, weight, bias, eps, norm_kind, weight_offset,
           down, down_bias, up, shift, gate_dir, gate_threshold, gate_mode, act_threshold, index, fire_counts,
           out, residual_out, num_patches: int = 1, config: dispatch.LaunchConfig | None = None) -> None:
    """Launch into preallocated ``out`` / ``residual_out`` ([N, D], x's dtype).

    Bank parts that no patch uses are passed as None and compiled out (down/bias/up together,
    shift, gate_dir/threshold/mode together, act_threshold when every component is the identity).
    No host sync, no allocation.
    """
    N, D = x.shape
    if N == 0:
        return
    has_patch = gate_mode is not None
    rank = down.shape[1] if (has_patch and down is not None) else 0
    if config is None:
        # fp32 banks need IEEE fp32 dots (TF32 misses the fp32 tolerance); the interpreter's bf16
        # tl.dot is wrong (triton #11584), so it always takes the fp32 path.
        config = dispatch.select(N, D, rank, index is not None, num_patches,
                                 dot_fp32=rank > 0 and down.dtype == torch.float32, interpreted=interpreting())
    dummy = x  # never dereferenced: its flag is off
    args = [x, residual if residual is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy, out, residual_out,
            down if rank else dummy, down_bias if rank else dummy, up if rank else dummy,
            shift if shift is not None else dummy, gate_dir if gate_dir is not None else dummy,
            gate_threshold if gate_threshold is not None else dummy,
            gate_mode if gate_mode is not None else dummy,
            act_threshold if (rank and act_threshold is not None) else dummy, index if index is not None else dummy,
            fire_counts if fire_counts is not None else dummy]
    common = dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  IS_LAYER=norm_kind == 1, HAS_INDEX=index is not None, HAS_SHIFT=shift is not None,
                  HAS_GATE=gate_dir is not None, COUNT_FIRES=fire_counts is not None and has_patch,
                  HAS_ACT=bool(rank) and act_threshold is not None,
                  num_warps=config.num_warps)
    if config.kernel == "tile":
        if not rank:
            raise ValueError("the tile kernel needs a low-rank part")
        fused_add_norm_tile_kernel[(triton.cdiv(N, config.BLOCK_M),)](
            *args, N, D, rank, num_patches, eps, weight_offset, **common, **config.constexprs())
    else:
        fused_add_norm_row_kernel[(N,)](
            *args, D, rank, num_patches, eps, weight_offset, HAS_PATCH=has_patch, HAS_LOWRANK=rank > 0,
            **common, **config.constexprs())
