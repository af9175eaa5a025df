// Host-side launch shape for the fused add + patch + norm kernels: which layout, vector width,
// block size and dynamic shared memory. Plain C++ so tests/kernels/test_cuda_compile.py can check it with
// g++ on a machine without a GPU (csrc/cuda/host_plan_test.cpp).
#pragma once

#include <cstdint>

#include "params.h"

namespace fastpatch {
namespace cuda {

// How rows map to threads.
enum Layout : int {
  kWarpPerRow = 0,     // narrow rows: one warp per row, several rows per block, shuffles only
  kBlockPerRow = 1,    // wide rows: one block per row, row cached in registers
  kBlockStreaming = 2  // rows too wide for the register cache: one block per row, re-read from
                       // global (L2) in later passes instead of caching
};

// Constants shared with the kernels (kernels.cuh static_asserts against them).
constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 512;  // __launch_bounds__: leaves 128 registers per thread
constexpr int kWarpRowsPerBlock = 8;   // rows (warps) per block in kWarpPerRow
constexpr int kWarpCacheVecs = 4;      // vectors per lane cached in kWarpPerRow
constexpr int kCacheFloats = 16;       // fp32 values per thread cached in kBlockPerRow
constexpr int kRankChunk = 4;          // low-rank dots (and gate statistics) reduced together
constexpr int64_t kMaxDynamicSmem = 48 * 1024;  // no opt-in attribute needed below this

// Elements per 16-byte access of the activation type.
inline int full_vector_width(int x_dtype) { return 16 / dtype_size(x_dtype); }

// Cached vectors per thread in kBlockPerRow for a vector width. The scalar path caches 16, not 32:
// its loops are fully unrolled per cached element, and 512 threads × 16 still hold 8192 elements.
constexpr int kScalarCacheVecs = 16;
constexpr int block_cache_vecs(int vec) { return vec == 1 ? kScalarCacheVecs : kCacheFloats / vec; }

inline bool aligned_for(const void* p, int dtype, int vec) {
  if (p == nullptr) return true;
  int bytes = vec * dtype_size(dtype);
  if (bytes > 16) bytes = 16;  // wider packs are read as several 16-byte accesses
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Vector width for a problem: 16-byte accesses when every row start of every tensor is aligned
// for them, i.e. hidden is a multiple of the width and every base pointer is aligned. Otherwise
// 1 (scalar): with hidden odd, row r starts r·hidden elements in, so no fixed vector width
// can be aligned for every row (and weight/bank rows have their own offsets).
inline int choose_vector_width(const FusedAddNormParams& p) {
  const int vec = full_vector_width(p.x_dtype);
  if (p.hidden % vec != 0) return 1;
  const bool ok = aligned_for(p.x, p.x_dtype, vec) && aligned_for(p.residual, p.x_dtype, vec) &&
                  aligned_for(p.out, p.x_dtype, vec) &&
                  aligned_for(p.residual_out, p.x_dtype, vec) &&
                  aligned_for(p.weight, p.weight_dtype, vec) &&
                  aligned_for(p.norm_bias, p.norm_bias_dtype, vec) &&
                  aligned_for(p.down, p.bank_dtype, vec) && aligned_for(p.up, p.bank_dtype, vec) &&
                  aligned_for(p.shift, p.bank_dtype, vec) &&
                  aligned_for(p.gate_dir, p.bank_dtype, vec);
  return ok ? vec : 1;
}

struct LaunchPlan {
  int layout = kWarpPerRow;
  int vec = 1;             // elements per access
  int threads = 32;        // per block
  int rows_per_block = 1;
  int64_t blocks = 0;
  int64_t smem_bytes = 0;  // dynamic: the low-rank coefficients z of each row in the block
  bool ok = true;          // false: rank too large for shared memory
};

inline int round_up(int a, int b) { return (a + b - 1) / b * b; }

inline LaunchPlan plan_launch(const FusedAddNormParams& p) {
  LaunchPlan plan;
  plan.vec = choose_vector_width(p);
  const int nvec = p.hidden / plan.vec;
  const bool patched = p.num_patches > 0;
  const int64_t z_bytes_per_row = patched ? static_cast<int64_t>(p.rank) * 4 : 0;
  if (nvec <= kWarpSize * kWarpCacheVecs) {
    // Narrow rows: a block of 8 warps would leave most lanes of a row idle with one block per
    // row; a warp per row needs no shared memory or barriers for its reductions, and rows of a
    // block that share a patch read its down/up rows through the same L1 lines.
    plan.layout = kWarpPerRow;
    int rows = kWarpRowsPerBlock;
    if (p.rows < rows) rows = static_cast<int>(p.rows < 1 ? 1 : p.rows);
    while (rows > 1 && rows * z_bytes_per_row > kMaxDynamicSmem) rows /= 2;
    plan.rows_per_block = rows;
    plan.threads = rows * kWarpSize;
  } else {
    plan.rows_per_block = 1;
    int threads = round_up(nvec, kWarpSize);
    if (threads > kMaxBlockThreads) threads = kMaxBlockThreads;
    plan.threads = threads;
    const int iters = (nvec + threads - 1) / threads;
    plan.layout = iters <= block_cache_vecs(plan.vec) ? kBlockPerRow : kBlockStreaming;
  }
  plan.smem_bytes = plan.rows_per_block * z_bytes_per_row;
  plan.ok = plan.smem_bytes <= kMaxDynamicSmem;
  plan.blocks = (p.rows + plan.rows_per_block - 1) / plan.rows_per_block;
  return plan;
}

}  // namespace cuda
}  // namespace fastpatch
