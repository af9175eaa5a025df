// Entry point of the CUDA kernels for the torch binding: raw pointers in, one launch on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include "launch_plan.h"
#include "params.h"

namespace fastpatch {
namespace cuda {

// Per activation type (fused_add_norm_{f32,bf16,f16}.cu, compiled in parallel).
cudaError_t launch_f32(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream);
cudaError_t launch_bf16(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream);
cudaError_t launch_f16(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream);

// Plans and enqueues the fused add + patch + norm on `stream`. No allocation, no synchronisation.
// cudaErrorInvalidValue when the bank's rank needs more shared memory than a block gets without
// opt-in (rank > 12288) or the grid is too large.
inline cudaError_t launch_fused_add_norm(const FusedAddNormParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const LaunchPlan plan = plan_launch(p);
  if (!plan.ok || plan.blocks > 0x7fffffff) return cudaErrorInvalidValue;
  switch (p.x_dtype) {
    case kF32: return launch_f32(p, plan, stream);
    case kBF16: return launch_bf16(p, plan, stream);
    case kF16: return launch_f16(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fastpatch
