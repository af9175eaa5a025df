// Kernel instantiations for __half activations (one file per type so builds run in parallel).
#include "kernels.cuh"
#include "launch.h"

namespace fastpatch {
namespace cuda {

cudaError_t launch_f16(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  return launch_typed<__half>(p, plan, stream);
}

}  // namespace cuda
}  // namespace fastpatch
