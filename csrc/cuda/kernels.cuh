// Fused residual add + activation patch + RMSNorm/LayerNorm, one kernel family for every case.
//
// Per row (semantics: fastpatch/core/reference.py):
//   pass 1  h = x + residual in fp32, kept in registers (kCache > 0) -- the only read of x/residual
//           patched rows: gate statistics (h·ĉ, ‖h‖²) and z_r = h·down_r + bias_r, reduced over the
//           row; z goes to shared memory, the gate decision stays in registers
//   pass 2  h' = h + g·(Σ_r z_r·up_r + shift), rounded to x's dtype, written once to residual_out;
//           row sums for the norm are taken from the rounded values (the norm reads residual_out)
//   pass 3  out = norm(h')·(weight + offset) (+ bias), written once
// A thread owns the same elements in every pass, so out/residual_out may alias x/residual: no
// element is written before its owner has read it, and no thread reads another's elements.
//
// Only CUDA headers here (no torch): the CI compile check builds this with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../patch_math.h"
#include "launch_plan.h"
#include "params.h"

#if defined(FASTPATCH_CUDA_EMULATE)
// Host build for tests: CUDA threads as fibers (emulation.h), shared memory as block-wide statics.
#include "emulation.h"
#define FP_SHARED static
#define FP_DYNAMIC_SMEM(name) float* name = ::fastpatch_emu::dynamic_smem()
#else
#define FP_SHARED __shared__
#define FP_DYNAMIC_SMEM(name) extern __shared__ float name[]
#endif

namespace fastpatch {
namespace cuda {

// ---- element conversion and packed 16-byte access ------------------------------------------------
// Explicit intrinsics: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and friends.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename E>
__device__ __forceinline__ E from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// N elements read or written as one access (two 16-byte accesses for 8 fp32 values).
template <typename E, int N>
struct alignas(N * sizeof(E) >= 16 ? 16 : N * sizeof(E)) Pack {
  E v[N];
};

template <typename E, int N>
__device__ __forceinline__ void load_pack(const void* base, int64_t elem, float (&o)[N]) {
  const Pack<E, N> pk = *reinterpret_cast<const Pack<E, N>*>(static_cast<const E*>(base) + elem);
#pragma unroll
  for (int i = 0; i < N; ++i) o[i] = to_float(pk.v[i]);
}

// Bank and norm-affine tensors are fp32 or x's dtype T (the binding converts anything else): a
// uniform branch per access instead of doubling the kernel instantiations.
template <typename T, int N>
__device__ __forceinline__ void load_param(const void* base, bool is_f32, int64_t elem, float (&o)[N]) {
  if (is_f32) load_pack<float, N>(base, elem, o);
  else load_pack<T, N>(base, elem, o);
}

// Store v rounded to E and hand back the rounded values (the norm must see what was stored).
template <typename E, int N>
__device__ __forceinline__ void store_rounded(void* base, int64_t elem, float (&v)[N]) {
  Pack<E, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    pk.v[i] = from_float<E>(v[i]);
    v[i] = to_float(pk.v[i]);
  }
  *reinterpret_cast<Pack<E, N>*>(static_cast<E*>(base) + elem) = pk;
}

// ---- reductions over one row's threads -----------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums K values over the row's threads; every thread gets the totals. A warp per row needs only
// shuffles. A block per row goes through `red` ([warps][K] floats) and ends with a barrier so the
// next call may reuse it. Fixed order: results are deterministic.
template <bool kBlock, int K>
__device__ __forceinline__ void row_sum(float (&v)[K], float* red) {
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = warp_sum(v[i]);
  if constexpr (kBlock) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int warps = blockDim.x / kWarpSize;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < K; ++i) red[warp * K + i] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = warp_sum(lane < warps ? red[lane * K + i] : 0.f);
    __syncthreads();
  }
}

// Vectors per thread cached in registers (0: streaming). Mirrors block_cache_vecs() in
// launch_plan.h as a constant expression (a host constexpr function is not callable here).
template <int kLayout, int kVec>
struct CacheVecs {
  static constexpr int value = kLayout == kWarpPerRow    ? kWarpCacheVecs
                               : kLayout == kBlockPerRow ? (kVec == 1 ? kScalarCacheVecs : kCacheFloats / kVec)
                                                         : 0;
};

// ---- the kernel ----------------------------------------------------------------------------------
//
// T: activation type. kVec: elements per access (16 bytes of T, or 1 when rows are not aligned).
// kLayout: Layout. kPatch: a bank is given; false compiles the plain fused add + norm with no
// index read, no patch branch and no extra reduction.
template <typename T, int kVec, int kLayout, bool kPatch>
__global__ void __launch_bounds__(kMaxBlockThreads, 1)
    fused_add_norm_kernel(const FusedAddNormParams p) {
  constexpr bool kBlock = kLayout != kWarpPerRow;
  constexpr int kCache = CacheVecs<kLayout, kVec>::value;
  constexpr int kSlots = kCache > 0 ? kCache : 1;
  static_assert(kVec * sizeof(T) <= 16 || kVec == 1, "one 16-byte access of T per vector");
  FP_SHARED float red[kBlock ? (kMaxBlockThreads / kWarpSize) * kRankChunk : 1];
  FP_DYNAMIC_SMEM(z_smem);  // [rows_per_block][rank]: low-rank coefficients per row

  const int D = p.hidden;
  const int nvec = D / kVec;
  int lane, row_threads, group;
  int64_t row;
  if constexpr (kBlock) {
    group = 0;
    lane = threadIdx.x;
    row_threads = blockDim.x;
    row = blockIdx.x;
  } else {
    group = threadIdx.x / kWarpSize;
    lane = threadIdx.x % kWarpSize;
    row_threads = kWarpSize;
    row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + group;
    if (row >= p.rows) return;  // whole warp leaves; warp rows never use block barriers
  }
  const int64_t row_elem = row * D;
  // Streaming rows loop at run time; cached rows unroll over a compile-time count.
  const int stream_iters = (nvec + row_threads - 1) / row_threads;
  const bool weight_f32 = p.weight_dtype == kF32;
  const bool norm_bias_f32 = p.norm_bias_dtype == kF32;

  auto load_h = [&](int v, float (&o)[kVec]) {
    load_pack<T, kVec>(p.x, row_elem + static_cast<int64_t>(v) * kVec, o);
    if (p.residual != nullptr) {
      float r[kVec];
      load_pack<T, kVec>(p.residual, row_elem + static_cast<int64_t>(v) * kVec, r);
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] += r[i];
    }
  };

  // Pass 1: the row's only read of x and residual (cached layouts).
  float h[kSlots][kVec];
  if constexpr (kCache > 0) {
#pragma unroll
    for (int it = 0; it < kCache; ++it) {
      const int v = lane + it * row_threads;
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[it][i] = 0.f;
      if (v < nvec) load_h(v, h[it]);
    }
  }
  // h of the it-th vector this thread owns: from the cache, or re-read when streaming.
  auto row_h = [&](int it, int v, float (&o)[kVec]) {
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = h[it][i];
    } else {
      load_h(v, o);
    }
  };

  // Patch decision and low-rank coefficients (patched kernels only).
  bool fires = false;
  int k = 0;
  int rank = 0;
  bool bank_f32 = true;
  if constexpr (kPatch) {
    int64_t k64 = 0;
    if (p.index != nullptr) {
      k64 = p.index_is_64 ? static_cast<const int64_t*>(p.index)[row]
                          : static_cast<int64_t>(static_cast<const int32_t*>(p.index)[row]);
    }
    // Out-of-range ids mean "no patch", never an out-of-bounds read.
    if (k64 >= 0 && k64 < p.num_patches) {
      k = static_cast<int>(k64);
      rank = p.rank;
      bank_f32 = p.bank_dtype == kF32;
      const int mode = p.gate_mode[k];
      const bool gated = p.gate_dir != nullptr && mode != kGateNone;
      const int n_gate = gated ? 2 : 0;  // items 0, 1: h·ĉ and ‖h‖²; then the rank dots
      const int items = n_gate + rank;
      float proj = 0.f, sumsq = 0.f;
      for (int base = 0; base < items; base += kRankChunk) {
        float acc[kRankChunk];
#pragma unroll
        for (int s = 0; s < kRankChunk; ++s) acc[s] = 0.f;
        // acc += h·dir for one item over one vector: dir is ĉ, h itself (‖h‖²) or a down row.
        auto accumulate = [&](int item, int64_t col, const float (&hv)[kVec], float& a) {
          float dv[kVec];
          if (gated && item == 1) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) dv[i] = hv[i];
          } else if (gated && item == 0) {
            load_param<T, kVec>(p.gate_dir, bank_f32, static_cast<int64_t>(k) * D + col, dv);
          } else {
            const int64_t r = static_cast<int64_t>(k) * rank + (item - n_gate);
            load_param<T, kVec>(p.down, bank_f32, r * D + col, dv);
          }
#pragma unroll
          for (int i = 0; i < kVec; ++i) a = fmaf(hv[i], dv[i], a);
        };
        if constexpr (kCache > 0) {
          // Item-major over the cached row: one direction vector live at a time (registers).
#pragma unroll
          for (int s = 0; s < kRankChunk; ++s) {
            if (base + s >= items) break;
#pragma unroll
            for (int it = 0; it < kCache; ++it) {
              const int v = lane + it * row_threads;
              if (v < nvec) accumulate(base + s, static_cast<int64_t>(v) * kVec, h[it], acc[s]);
            }
          }
        } else {
          // Element-major when streaming: x and residual are re-read once per chunk, not per item.
          for (int v = lane; v < nvec; v += row_threads) {
            float hv[kVec];
            load_h(v, hv);
#pragma unroll
            for (int s = 0; s < kRankChunk; ++s) {
              if (base + s >= items) break;
              accumulate(base + s, static_cast<int64_t>(v) * kVec, hv, acc[s]);
            }
          }
        }
        row_sum<kBlock, kRankChunk>(acc, red);
#pragma unroll
        for (int s = 0; s < kRankChunk; ++s) {
          const int item = base + s;
          if (item >= items) break;
          if (gated && item == 0) {
            proj = acc[s];
          } else if (gated && item == 1) {
            sumsq = acc[s];
          } else if (lane == 0) {
            const int r = item - n_gate;
            float b[1];
            load_param<T, 1>(p.down_bias, bank_f32, static_cast<int64_t>(k) * rank + r, b);
            float z = acc[s] + b[0];
            // Per-component activation: one compare + select against the level t (-inf identity,
            // 0 ReLU, max(θ, 0) JumpReLU); identity banks pass null and skip it (a uniform branch).
            if (p.act_threshold != nullptr) {
              z = z > p.act_threshold[static_cast<int64_t>(k) * rank + r] ? z : 0.f;
            }
            z_smem[group * rank + r] = z;
          }
        }
      }
      fires = gated ? gate_fires(mode, proj, sumsq, p.gate_threshold[k]) : true;
      if (fires && p.fire_counts != nullptr && lane == 0) atomicAdd(p.fire_counts + k, 1);
      if (rank > 0) {  // z written by lane 0 is read by every thread of the row
        if constexpr (kBlock) __syncthreads();
        else __syncwarp();
      }
    }
  }

  // Pass 2: h' = h + g·δ, rounded to T, written once; norm sums over the rounded values.
  float stats[2] = {0.f, 0.f};  // Σh', Σh'²
#pragma unroll
  for (int it = 0; it < (kCache > 0 ? kCache : 1); ++it) {
    for (int sit = it; sit < (kCache > 0 ? it + 1 : stream_iters); ++sit) {
      const int v = lane + sit * row_threads;
      if (v >= nvec) break;
      const int64_t col = static_cast<int64_t>(v) * kVec;
      float hv[kVec];
      row_h(it, v, hv);
      if constexpr (kPatch) {
        if (fires) {
          float delta[kVec];
          if (p.shift != nullptr) {
            load_param<T, kVec>(p.shift, bank_f32, static_cast<int64_t>(k) * D + col, delta);
          } else {
#pragma unroll
            for (int i = 0; i < kVec; ++i) delta[i] = 0.f;
          }
          // Not unrolled: keeps one up row in flight per thread (registers, not ILP, bound these).
#pragma unroll 1
          for (int r = 0; r < rank; ++r) {
            const float zr = z_smem[group * rank + r];
            float u[kVec];
            load_param<T, kVec>(p.up, bank_f32, (static_cast<int64_t>(k) * rank + r) * D + col, u);
#pragma unroll
            for (int i = 0; i < kVec; ++i) delta[i] = fmaf(zr, u[i], delta[i]);
          }
#pragma unroll
          for (int i = 0; i < kVec; ++i) hv[i] += delta[i];
        }
      }
      store_rounded<T, kVec>(p.residual_out, row_elem + col, hv);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        stats[0] += hv[i];
        stats[1] = fmaf(hv[i], hv[i], stats[1]);
      }
      if constexpr (kCache > 0) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) h[it][i] = hv[i];
      }
    }
  }
  row_sum<kBlock, 2>(stats, red);

  // The norm input: h' as stored (cache), or read back from residual_out when streaming (this
  // thread's own writes, so no barrier is needed).
  auto row_h_out = [&](int it, int v, float (&o)[kVec]) {
    if constexpr (kCache > 0) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = h[it][i];
    } else {
      load_pack<T, kVec>(p.residual_out, row_elem + static_cast<int64_t>(v) * kVec, o);
    }
  };

  float mean = 0.f, inv;
  if (p.norm_kind == kNormLayer) {
    // Two-pass variance (Σ(h' − mean)²): keeps its precision when |mean| ≫ std.
    mean = stats[0] / static_cast<float>(D);
    float centred[1] = {0.f};
#pragma unroll
    for (int it = 0; it < (kCache > 0 ? kCache : 1); ++it) {
      for (int sit = it; sit < (kCache > 0 ? it + 1 : stream_iters); ++sit) {
        const int v = lane + sit * row_threads;
        if (v >= nvec) break;
        float hv[kVec];
        row_h_out(it, v, hv);
#pragma unroll
        for (int i = 0; i < kVec; ++i) centred[0] = fmaf(hv[i] - mean, hv[i] - mean, centred[0]);
      }
    }
    row_sum<kBlock, 1>(centred, red);
    inv = layer_inv(centred[0], D, p.eps);
  } else {
    inv = rms_inv(stats[1], D, p.eps);
  }

  // Pass 3: out = (h' − mean)·inv·(weight + offset) (+ bias), written once.
#pragma unroll
  for (int it = 0; it < (kCache > 0 ? kCache : 1); ++it) {
    for (int sit = it; sit < (kCache > 0 ? it + 1 : stream_iters); ++sit) {
      const int v = lane + sit * row_threads;
      if (v >= nvec) break;
      const int64_t col = static_cast<int64_t>(v) * kVec;
      float hv[kVec];
      row_h_out(it, v, hv);
      float scale[kVec];
      if (p.weight != nullptr) {
        load_param<T, kVec>(p.weight, weight_f32, col, scale);
#pragma unroll
        for (int i = 0; i < kVec; ++i) scale[i] += p.weight_offset;
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) scale[i] = 1.f + p.weight_offset;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) hv[i] = (hv[i] - mean) * inv * scale[i];
      if (p.norm_bias != nullptr) {
        float b[kVec];
        load_param<T, kVec>(p.norm_bias, norm_bias_f32, col, b);
#pragma unroll
        for (int i = 0; i < kVec; ++i) hv[i] += b[i];
      }
      store_rounded<T, kVec>(p.out, row_elem + col, hv);
    }
  }
}

// ---- launcher for one activation type (instantiated in fused_add_norm_<type>.cu) -----------------

using KernelFn = void (*)(FusedAddNormParams);

template <typename T, int kVec, bool kPatch>
KernelFn pick_layout(int layout) {
  switch (layout) {
    case kWarpPerRow: return fused_add_norm_kernel<T, kVec, kWarpPerRow, kPatch>;
    case kBlockPerRow: return fused_add_norm_kernel<T, kVec, kBlockPerRow, kPatch>;
    default: return fused_add_norm_kernel<T, kVec, kBlockStreaming, kPatch>;
  }
}

// The instantiation a plan runs (the host emulator launches the same one).
template <typename T>
KernelFn select_kernel(const LaunchPlan& plan, bool patched) {
  constexpr int kFullVec = 16 / sizeof(T);
  if (plan.vec == kFullVec) {
    return patched ? pick_layout<T, kFullVec, true>(plan.layout) : pick_layout<T, kFullVec, false>(plan.layout);
  }
  return patched ? pick_layout<T, 1, true>(plan.layout) : pick_layout<T, 1, false>(plan.layout);
}

#if !defined(FASTPATCH_CUDA_EMULATE)
// Launch only: no allocation, no host synchronisation (safe inside CUDA-graph capture).
template <typename T>
cudaError_t launch_typed(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  const KernelFn fn = select_kernel<T>(plan, p.num_patches > 0);
  fn<<<dim3(static_cast<unsigned>(plan.blocks)), dim3(plan.threads), static_cast<size_t>(plan.smem_bytes),
       stream>>>(p);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace fastpatch
