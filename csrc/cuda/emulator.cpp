// The CUDA kernels of kernels.cuh built for the host and run under emulation.h, as a C shared
// library for tests (tests/kernels/test_cuda_compile.py loads it with ctypes and fills the params struct
// from CPU tensors). Same plan (launch_plan.h), same instantiation (select_kernel), same source.
#define FASTPATCH_CUDA_EMULATE 1
#include "kernels.cuh"

using namespace fastpatch::cuda;

extern "C" {

// For the caller's check that its mirror of the struct has the same layout.
unsigned long fastpatch_emu_params_size() { return sizeof(FusedAddNormParams); }

// Plans like launch_fused_add_norm() and runs the chosen kernel on the host. Returns the layout
// (>= 0) or -1 if the plan is refused. `plan_out` (5 ints): layout, vec, threads, rows/block, smem.
int fastpatch_emu_run(const FusedAddNormParams* p, int* plan_out) {
  if (p->rows == 0) return 0;
  const LaunchPlan plan = plan_launch(*p);
  if (plan_out != nullptr) {
    plan_out[0] = plan.layout;
    plan_out[1] = plan.vec;
    plan_out[2] = plan.threads;
    plan_out[3] = plan.rows_per_block;
    plan_out[4] = static_cast<int>(plan.smem_bytes);
  }
  if (!plan.ok) return -1;
  const bool patched = p->num_patches > 0;
  KernelFn fn;
  switch (p->x_dtype) {
    case kF32: fn = select_kernel<float>(plan, patched); break;
    case kBF16: fn = select_kernel<__nv_bfloat16>(plan, patched); break;
    case kF16: fn = select_kernel<__half>(plan, patched); break;
    default: return -1;
  }
  fastpatch_emu::launch(fn, plan.blocks, plan.threads, plan.smem_bytes, *p);
  return plan.layout;
}

}  // extern "C"
