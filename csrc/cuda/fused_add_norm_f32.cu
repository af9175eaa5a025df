// Kernel instantiations for float activations (one file per type so builds run in parallel).
#include "kernels.cuh"
#include "launch.h"

namespace fastpatch {
namespace cuda {

cudaError_t launch_f32(const FusedAddNormParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  return launch_typed<float>(p, plan, stream);
}

}  // namespace cuda
}  // namespace fastpatch
