// Torch binding of the CUDA kernels: argument checks, raw pointers, the current stream, one launch.
// Built only where a CUDA torch exists (fastpatch/kernels/backends/cuda.py); the kernels and launchers
// (kernels.cuh, launch.h) need no torch headers. c10/cuda headers only: ATen/cuda/CUDAContext.h
// pulls cuSPARSE/cuBLAS headers we have no use for.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "../patch_math.h"
#include "launch.h"

namespace fastpatch {
namespace cuda {
namespace {

using OptTensor = std::optional<at::Tensor>;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "fastpatch cuda: unsupported float dtype ", t);
  }
  return kF32;  // unreachable
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void check_on(const OptTensor& t, const char* name, const at::Device& dev, int64_t numel) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == dev, name, " must be on ", dev, ", got ", t->device());
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
}

// Bank and norm-affine tensors are read as fp32 or as x's dtype; any other float dtype (an fp16
// bank with bf16 activations) is converted to fp32 here -- an allocation, so a slow path.
OptTensor as_supported(const OptTensor& t, at::ScalarType x_dtype) {
  if (!t.has_value() || t->scalar_type() == at::kFloat || t->scalar_type() == x_dtype) return t;
  return t->to(at::kFloat);
}

void fused_add_norm_cuda(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight_in,
                         const OptTensor& norm_bias_in, double eps, int64_t norm_kind, double weight_offset,
                         const OptTensor& down_in, const OptTensor& down_bias_in, const OptTensor& up_in,
                         const OptTensor& shift_in, const OptTensor& gate_dir_in,
                         const OptTensor& gate_threshold, const OptTensor& gate_mode,
                         const OptTensor& act_threshold, const OptTensor& index, const OptTensor& fire_counts, const at::Tensor& out, const at::Tensor& residual_out) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  const at::ScalarType dt = x.scalar_type();
  const at::Device dev = x.device();
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(D > 0 && D <= (int64_t{1} << 30), "hidden size must be in [1, 2^30], got ", D);
  TORCH_CHECK(norm_kind == kNormRms || norm_kind == kNormLayer, "norm_kind must be 0 (rms) or 1 (layer)");
  for (const at::Tensor* t : {&out, &residual_out}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == dt && t->is_contiguous() && t->device() == dev,
                "out and residual_out must be contiguous tensors shaped like x, in x's dtype, on x's device");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == dt,
                "residual must match x in shape and dtype");
    check_on(residual, "residual", dev, N * D);
  }
  const OptTensor weight = as_supported(weight_in, dt), norm_bias = as_supported(norm_bias_in, dt);
  check_on(weight, "weight", dev, D);
  check_on(norm_bias, "bias", dev, D);

  FusedAddNormParams p;
  p.rows = N;
  p.hidden = static_cast<int>(D);
  p.x_dtype = dtype_code(dt);
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.out = out.data_ptr();
  p.residual_out = residual_out.data_ptr();
  p.norm_kind = static_cast<int>(norm_kind);
  p.eps = static_cast<float>(eps);
  p.weight_offset = static_cast<float>(weight_offset);
  p.weight = ptr_or_null(weight);
  p.weight_dtype = weight.has_value() ? dtype_code(weight->scalar_type()) : kF32;
  p.norm_bias = ptr_or_null(norm_bias);
  p.norm_bias_dtype = norm_bias.has_value() ? dtype_code(norm_bias->scalar_type()) : kF32;

  // Kept alive until the launch is enqueued (the caching allocator orders reuse on the stream).
  OptTensor down, down_bias, up, shift, gate_dir;
  if (gate_mode.has_value()) {  // gate_mode marks a bank
    TORCH_CHECK(gate_mode->scalar_type() == at::kInt && gate_mode->dim() == 1, "gate_mode must be int32 [P]");
    const int64_t P = gate_mode->numel();
    TORCH_CHECK(P > 0 && P < (int64_t{1} << 31), "a bank needs 1 to 2^31-1 patches");
    int64_t R = 0;
    if (down_in.has_value()) {
      TORCH_CHECK(down_in->dim() == 3 && down_in->size(0) == P && down_in->size(2) == D,
                  "down must be [P, R, hidden]");
      R = down_in->size(1);
      TORCH_CHECK(up_in.has_value() && down_bias_in.has_value(), "down needs up and down_bias");
    }
    // One dtype for the whole bank (PatchBank guarantees it): fp32, x's dtype, or converted.
    at::ScalarType bank_dt = at::kFloat;
    for (const OptTensor* t : {&down_in, &down_bias_in, &up_in, &shift_in, &gate_dir_in}) {
      if (t->has_value()) bank_dt = (*t)->scalar_type();
    }
    const bool convert = bank_dt != at::kFloat && bank_dt != dt;
    auto take = [&](const OptTensor& t) { return convert ? as_supported(t, at::kFloat) : t; };
    down = R > 0 ? take(down_in) : OptTensor();
    down_bias = R > 0 ? take(down_bias_in) : OptTensor();
    up = R > 0 ? take(up_in) : OptTensor();
    shift = take(shift_in);
    gate_dir = take(gate_dir_in);
    const at::ScalarType want = convert ? at::kFloat : bank_dt;
    for (const OptTensor* t : {&down, &down_bias, &up, &shift, &gate_dir}) {
      TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == want, "bank tensors must share one dtype");
    }
    check_on(down, "down", dev, P * R * D);
    check_on(down_bias, "down_bias", dev, P * R);
    check_on(up, "up", dev, P * R * D);
    check_on(shift, "shift", dev, P * D);
    check_on(gate_dir, "gate_dir", dev, P * D);
    check_on(gate_mode, "gate_mode", dev, P);
    if (gate_dir.has_value()) {
      TORCH_CHECK(gate_threshold.has_value() && gate_threshold->scalar_type() == at::kFloat,
                  "a gated bank needs float32 gate_threshold");
      check_on(gate_threshold, "gate_threshold", dev, P);
    }
    if (act_threshold.has_value()) {
      TORCH_CHECK(act_threshold->scalar_type() == at::kFloat, "act_threshold must be float32 [P, R]");
      check_on(act_threshold, "act_threshold", dev, P * R);
    }
    if (index.has_value()) {
      TORCH_CHECK(index->scalar_type() == at::kInt || index->scalar_type() == at::kLong,
                  "index must be int32 or int64");
      check_on(index, "index", dev, N);
    }
    if (fire_counts.has_value()) {
      TORCH_CHECK(fire_counts->scalar_type() == at::kInt, "fire_counts must be int32");
      check_on(fire_counts, "fire_counts", dev, P);
    }
    p.num_patches = static_cast<int>(P);
    p.rank = static_cast<int>(R);
    p.bank_dtype = dtype_code(want);
    p.down = ptr_or_null(down);
    p.down_bias = ptr_or_null(down_bias);
    p.up = ptr_or_null(up);
    p.shift = ptr_or_null(shift);
    p.gate_dir = ptr_or_null(gate_dir);
    p.gate_threshold = gate_dir.has_value() ? gate_threshold->data_ptr<float>() : nullptr;
    p.gate_mode = gate_mode->data_ptr<int32_t>();
    p.act_threshold = (R > 0 && act_threshold.has_value()) ? act_threshold->data_ptr<float>() : nullptr;
    p.index = ptr_or_null(index);
    p.index_is_64 = index.has_value() && index->scalar_type() == at::kLong;
    p.fire_counts = fire_counts.has_value() ? fire_counts->data_ptr<int32_t>() : nullptr;
  } else {
    TORCH_CHECK(!down_in.has_value() && !up_in.has_value() && !shift_in.has_value() && !gate_dir_in.has_value() &&
                    !act_threshold.has_value() && !index.has_value() && !fire_counts.has_value(),
                "bank tensors, index and fire_counts need gate_mode (it marks a bank)");
  }
  if (N == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  const cudaError_t err = launch_fused_add_norm(p, c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "fastpatch cuda: kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (bank rank too large for shared memory?)" : "");
}

}  // namespace
}  // namespace cuda
}  // namespace fastpatch

// The kernel as a plain Python function, registered with no dispatcher key: the one op
// torch.ops.fastpatch.fused_add_norm (schema and fake: fastpatch/kernels/backends/library.py) has one
// CUDA implementation, which picks this kernel or the Triton ones per shape
// (fastpatch/kernels/backends/__init__.py) and calls this function (pybind11, ~0.5 µs). Absent parts are
// None; gate_mode marks a bank. Writes in place into out, residual_out and fire_counts, which may alias
// x / residual (the kernel reads a row in full before writing it).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_add_norm", &fastpatch::cuda::fused_add_norm_cuda, "fused add + patch + norm (CUDA)");
}
