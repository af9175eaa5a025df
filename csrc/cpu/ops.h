// The CPU kernel's entry points (csrc/cpu/fused_add_norm.cpp), for the bindings in
// csrc/cpu/torch_bindings.cpp: the kernel knows nothing of the dispatcher or of Python.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastpatch {
namespace cpu {

// The op fastpatch::fused_add_norm on CPU tensors (its schema: fastpatch/kernels/backends/library.py).
// Checks what it reads (sizes, dtypes, contiguity) and writes out, residual_out and fire_counts.
void fused_add_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& norm_bias,
    double eps, int64_t norm_kind, double weight_offset,
    const std::optional<at::Tensor>& down, const std::optional<at::Tensor>& down_bias,
    const std::optional<at::Tensor>& up, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& gate_dir, const std::optional<at::Tensor>& gate_threshold,
    const std::optional<at::Tensor>& gate_mode, const std::optional<at::Tensor>& act_threshold,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& fire_counts, const at::Tensor& out,
    const at::Tensor& residual_out);

// True when every entry of a contiguous CPU int32/int64 index lies in [-1, num_patches).
bool index_in_range(const at::Tensor& index, int64_t num_patches);

// Whether at::parallel_for in this build can use more than one thread (it needs OpenMP).
bool built_with_openmp();

}  // namespace cpu
}  // namespace fastpatch
