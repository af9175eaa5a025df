// Kernel instantiations for __nv_bfloat16 activations (one file per type so builds run in parallel).
#include "kernels.cuh"
#include "launch.h"

namespace fastpatch {
namespace cuda {

cudaError_t launch_bf16(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  return launch_typed<__nv_bfloat16>(p, plan, stream);
}

}  // namespace cuda
}  // namespace fastpatch
