// Host-only checks of what the CUDA kernels depend on, built with g++ by tests/kernels/test_cuda_compile.py
// (no GPU, no CUDA headers): the launch plan (layout, vector width, block size, shared memory)
// and the shared patch maths (csrc/patch_math.h) the kernels call for gates and norm statistics.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../patch_math.h"
#include "launch_plan.h"
#include "params.h"

using namespace fastpatch;
using namespace fastpatch::cuda;

static int failures = 0;
static int checks = 0;
#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++checks;                                                         \
    if (!(cond)) {                                                    \
      ++failures;                                                     \
      std::printf("FAIL %s:%d: %s -- ", __FILE__, __LINE__, #cond);   \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

// 512-byte aligned fake device addresses, like the CUDA caching allocator's.
static const void* addr(uintptr_t a) { return reinterpret_cast<const void*>(a); }

static FusedAddNormParams problem(int64_t rows, int hidden, int dtype, int rank, bool bank) {
  FusedAddNormParams p;
  p.rows = rows;
  p.hidden = hidden;
  p.x_dtype = dtype;
  p.x = addr(0x10000);
  p.residual = addr(0x20000);
  p.out = const_cast<void*>(addr(0x30000));
  p.residual_out = const_cast<void*>(addr(0x40000));
  p.weight = addr(0x50000);
  p.weight_dtype = kF32;
  if (bank) {
    p.num_patches = 3;
    p.rank = rank;
    p.bank_dtype = kF32;
    p.shift = addr(0x60000);
    if (rank > 0) {
      p.down = addr(0x70000);
      p.up = addr(0x80000);
    }
  }
  return p;
}

// Replays the kernel's element ownership: vector v of a row belongs to thread (v mod row_threads)
// at iteration v / row_threads; cached layouts must need no more iterations than they cache.
static void check_coverage(const FusedAddNormParams& p, const LaunchPlan& plan) {
  const int nvec = p.hidden / plan.vec;
  const int row_threads = plan.layout == kWarpPerRow ? kWarpSize : plan.threads;
  const int iters = (nvec + row_threads - 1) / row_threads;
  if (plan.layout == kWarpPerRow) CHECK(iters <= kWarpCacheVecs, "warp iters %d for D=%d", iters, p.hidden);
  if (plan.layout == kBlockPerRow) {
    CHECK(iters <= block_cache_vecs(plan.vec), "block iters %d > cache for D=%d", iters, p.hidden);
  }
  std::vector<int> owner(nvec, 0);
  for (int lane = 0; lane < row_threads; ++lane) {
    for (int it = 0; it < iters; ++it) {
      const int v = lane + it * row_threads;
      if (v < nvec) ++owner[v];
    }
  }
  for (int v = 0; v < nvec; ++v) CHECK(owner[v] == 1, "D=%d vector %d owned %d times", p.hidden, v, owner[v]);
}

static void test_plans() {
  const int dtypes[] = {kF32, kBF16, kF16};
  const int64_t rows_list[] = {1, 3, 8, 64, 257, 100000};
  std::vector<int> hiddens = {1, 2, 3, 7, 8, 63, 64, 65, 127, 128, 255, 256, 512, 576, 768, 1024, 1025, 2048,
                              4096, 4097, 5120, 8192, 8193, 12288, 16384, 16392, 65536, 131073};
  for (int dtype : dtypes) {
    for (int64_t rows : rows_list) {
      for (int hidden : hiddens) {
        for (int rank : {0, 4, 64}) {
          const FusedAddNormParams p = problem(rows, hidden, dtype, rank, rank > 0 || hidden % 2);
          const LaunchPlan plan = plan_launch(p);
          const int full = 16 / dtype_size(dtype);
          CHECK(plan.ok, "plan not ok D=%d rank=%d", hidden, rank);
          CHECK(plan.vec == (hidden % full == 0 ? full : 1), "vec %d for D=%d dtype %d", plan.vec, hidden, dtype);
          CHECK(plan.threads % kWarpSize == 0 && plan.threads >= kWarpSize && plan.threads <= kMaxBlockThreads,
                "threads %d", plan.threads);
          CHECK(plan.blocks * plan.rows_per_block >= rows && (plan.blocks - 1) * plan.rows_per_block < rows,
                "blocks %lld x %d rows for %lld rows", (long long)plan.blocks, plan.rows_per_block, (long long)rows);
          if (plan.layout == kWarpPerRow) {
            CHECK(plan.threads == plan.rows_per_block * kWarpSize, "warp layout threads");
            CHECK(plan.rows_per_block <= rows || rows < 1, "more warps than rows");
          } else {
            CHECK(plan.rows_per_block == 1, "block layouts take one row per block");
          }
          const int64_t z = p.num_patches > 0 ? int64_t(plan.rows_per_block) * p.rank * 4 : 0;
          CHECK(plan.smem_bytes == z, "smem %lld, expected %lld", (long long)plan.smem_bytes, (long long)z);
          check_coverage(p, plan);
        }
      }
    }
  }
  // Spot checks of the layout choice.
  CHECK(plan_launch(problem(64, 1, kF32, 0, false)).layout == kWarpPerRow, "D=1 is a warp row");
  CHECK(plan_launch(problem(64, 768, kBF16, 0, false)).layout == kWarpPerRow, "bf16 D=768: 96 vectors, warp");
  CHECK(plan_launch(problem(64, 4096, kBF16, 0, false)).layout == kBlockPerRow, "bf16 D=4096: block");
  CHECK(plan_launch(problem(64, 4097, kF32, 0, false)).vec == 1, "odd D is scalar");
  CHECK(plan_launch(problem(64, 4097, kF32, 0, false)).layout == kBlockPerRow, "4097 fits the scalar cache");
  CHECK(plan_launch(problem(4, 8193, kF32, 0, false)).layout == kBlockStreaming, "8193 scalar streams");
  CHECK(plan_launch(problem(4, 8192, kBF16, 0, false)).layout == kBlockPerRow, "bf16 8192 is cached");
  CHECK(plan_launch(problem(4, 16384, kBF16, 0, false)).layout == kBlockStreaming, "bf16 16384 streams");
  CHECK(plan_launch(problem(3, 64, kF32, 0, false)).rows_per_block == 3, "no idle warps for 3 rows");

  // Misaligned pointers (a view at an odd element offset) fall back to scalar accesses.
  FusedAddNormParams p = problem(64, 4096, kBF16, 4, true);
  p.x = addr(0x10000 + 2);
  CHECK(plan_launch(p).vec == 1, "misaligned x -> scalar");
  p = problem(64, 4096, kBF16, 4, true);
  p.down = addr(0x70000 + 8);
  CHECK(plan_launch(p).vec == 1, "misaligned bank -> scalar");
  p = problem(64, 4096, kBF16, 4, true);
  p.weight = addr(0x50000 + 16);  // fp32 weight with 8-wide bf16 vectors: 16-byte accesses suffice
  CHECK(plan_launch(p).vec == 8, "16-byte aligned fp32 weight keeps vectors");

  // Large ranks: the warp layout halves its rows until z fits; absurd ranks are refused.
  p = problem(1000, 64, kF32, 4096, true);
  LaunchPlan plan = plan_launch(p);
  CHECK(plan.ok && plan.smem_bytes <= kMaxDynamicSmem && plan.rows_per_block == 2, "rank 4096: %d rows",
        plan.rows_per_block);
  p = problem(10, 4096, kF32, 20000, true);
  CHECK(!plan_launch(p).ok, "rank 20000 needs too much shared memory");
}

static void test_patch_math() {
  // Gates: mode semantics, strict comparisons, zero rows (cosine 0).
  CHECK(gate_fires(kGateNone, 0.f, 0.f, 1e9f), "no gate always fires");
  CHECK(gate_fires(kGateCosineAbove, 3.f, 25.f, 0.5f), "cos 0.6 > 0.5");
  CHECK(!gate_fires(kGateCosineAbove, 2.f, 25.f, 0.5f), "cos 0.4 !> 0.5");
  CHECK(gate_fires(kGateCosineBelow, 2.f, 25.f, 0.5f), "cos 0.4 < 0.5");
  CHECK(!gate_fires(kGateCosineBelow, 3.f, 25.f, 0.5f), "cos 0.6 !< 0.5");
  CHECK(gate_fires(kGateProjectionAbove, 3.f, 1e6f, 2.5f), "proj 3 > 2.5");
  CHECK(!gate_fires(kGateProjectionAbove, 2.5f, 1e6f, 2.5f), "strict: 2.5 !> 2.5");
  CHECK(gate_fires(kGateProjectionBelow, -1.f, 1.f, 0.f), "proj -1 < 0");
  CHECK(!gate_fires(kGateCosineAbove, 0.f, 0.f, 0.f), "zero row: cos 0 !> 0");
  CHECK(gate_fires(kGateCosineBelow, 0.f, 0.f, 0.1f), "zero row: cos 0 < 0.1");
  // Norm statistics.
  CHECK(std::fabs(rms_inv(4.f * 4, 4, 0.f) - 0.5f) < 1e-7f, "rms of [2,2,2,2] is 2");
  CHECK(std::fabs(rms_inv(0.f, 8, 1e-6f) - 1000.f) < 1e-2f, "eps keeps a zero row finite");
  CHECK(std::fabs(layer_inv(8.f, 2, 0.f) - 0.5f) < 1e-7f, "var 4 -> 1/2");
}

int main() {
  test_plans();
  test_patch_math();
  std::printf("%d checks, %d failures\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
