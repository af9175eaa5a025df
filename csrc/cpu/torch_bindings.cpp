// Bindings of the CPU kernel (csrc/cpu/fused_add_norm.cpp, declared in csrc/cpu/ops.h), apart from
// the kernel as vLLM keeps them:
//   - the CPU implementation of the one op fastpatch::fused_add_norm. Its schema and fake impl are
//     defined once, in Python (fastpatch/kernels/backends/library.py), so that the op exists when this
//     JIT-built extension does not (no compiler: the fallback implementation is registered there);
//     the dispatcher takes an implementation registered before or after the definition;
//   - a Python module whose entry points call that op through the dispatcher from C++
//     (c10::Dispatcher, a typed handle): calling a dispatcher op from Python costs ~4 µs (boxing 20
//     arguments against the schema), a pybind11 call plus a C++ dispatch ~0.5 µs, and this op runs
//     twice per decoder layer per token. Eager calls thus reach the op's CPU kernel with no Python in
//     between; torch.compile traces the op itself (fastpatch/kernels/backends/cpp.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "ops.h"

namespace fastpatch {
namespace cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;
using OpSignature = void(const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, int64_t,
                         double, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const at::Tensor&, const at::Tensor&, std::optional<c10::string_view>);

// The op's CPU implementation: the kernel, for backend None or "cpp" (the only CPU kernel the op has;
// the reference and Triton-under-the-interpreter are called by name from Python, never through it).
void fused_add_norm_op(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                       const OptTensor& bias, double eps, int64_t norm_kind, double weight_offset,
                       const OptTensor& down, const OptTensor& down_bias, const OptTensor& up, const OptTensor& shift,
                       const OptTensor& gate_dir, const OptTensor& gate_threshold, const OptTensor& gate_mode,
                       const OptTensor& act_threshold, const OptTensor& index, const OptTensor& fire_counts,
                       const at::Tensor& out, const at::Tensor& residual_out, std::optional<c10::string_view> backend) {
  TORCH_CHECK(!backend.has_value() || *backend == "cpp", "fastpatch::fused_add_norm: backend '",
              backend.value_or(""), "' has no implementation for CPU tensors in the op (there it runs the cpp "
              "kernel); pass backend=None, or call fastpatch.fused_add_norm(..., backend=...) eagerly");
  fused_add_norm_cpu(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
                     gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out);
}

// The op through the dispatcher, from C++ (the handle is looked up once: the schema is defined by then,
// Python defines it before it loads this extension).
void call_op(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
             double eps, int64_t norm_kind, double weight_offset, const OptTensor& down, const OptTensor& down_bias,
             const OptTensor& up, const OptTensor& shift, const OptTensor& gate_dir, const OptTensor& gate_threshold,
             const OptTensor& gate_mode, const OptTensor& act_threshold, const OptTensor& index,
             const OptTensor& fire_counts, const at::Tensor& out, const at::Tensor& residual_out) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastpatch::fused_add_norm", "")
                             .typed<OpSignature>();
  op.call(x, residual, weight, bias, eps, norm_kind, weight_offset, down, down_bias, up, shift, gate_dir,
          gate_threshold, gate_mode, act_threshold, index, fire_counts, out, residual_out, std::nullopt);
}

// The public op's fast path (fastpatch/kernels/ops.py): the parts of a call that stay the same from
// call to call (norm weight and bias, eps, norm kind, offset, the bank's tensors), checked once in
// Python and held here, so a call passes 6 tensors instead of 19 (pybind11 converts each argument,
// ~25 ns apiece) and the per-call checks below run in C++. run() answers false for anything it does
// not take (another hidden size, shapes that differ from x's, an index out of range) and
// the kernel throws for anything inconsistent, both before any memory is touched; the caller then
// goes through the fully checked path, which reports the problem or handles it. The call itself goes
// through the dispatcher (call_op), from C++: the op's CPU kernel runs, with no Python in between.
class Plan {
 public:
  Plan(std::optional<at::Tensor> weight, std::optional<at::Tensor> bias, double eps, int64_t norm_kind,
       double weight_offset, std::optional<at::Tensor> down, std::optional<at::Tensor> down_bias,
       std::optional<at::Tensor> up, std::optional<at::Tensor> shift, std::optional<at::Tensor> gate_dir,
       std::optional<at::Tensor> gate_threshold, std::optional<at::Tensor> gate_mode,
       std::optional<at::Tensor> act_threshold, int64_t hidden)
      : weight_(std::move(weight)), bias_(std::move(bias)), eps_(eps), norm_kind_(norm_kind),
        weight_offset_(weight_offset), down_(std::move(down)), down_bias_(std::move(down_bias)),
        up_(std::move(up)), shift_(std::move(shift)), gate_dir_(std::move(gate_dir)),
        gate_threshold_(std::move(gate_threshold)), gate_mode_(std::move(gate_mode)),
        act_threshold_(std::move(act_threshold)), hidden_(hidden),
        num_patches_(gate_mode_.has_value() ? gate_mode_->numel() : 0) {}

  bool run(const at::Tensor& x, const std::optional<at::Tensor>& residual,
           const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& fire_counts,
           const at::Tensor& out, const at::Tensor& residual_out, bool check_index) const {
    const int64_t D = hidden_;
    if (x.dim() < 1 || x.size(-1) != D) return false;
    if (x.dim() == 2) {  // rows as they come (vLLM's [tokens, hidden]): no views to make
      if (index.has_value()) {
        if (index->dim() != 1) return false;
        if (check_index && !index_in_range(*index, num_patches_)) return false;
      }
      call_op(x, residual, weight_, bias_, eps_, norm_kind_, weight_offset_, down_, down_bias_,
                         up_, shift_, gate_dir_, gate_threshold_, gate_mode_, act_threshold_, index, fire_counts, out,
                         residual_out);
      return true;
    }
    // [..., D]: the public op's shape rules (every tensor shaped like x, index one entry per row as
    // [rows] or x's leading shape), then the same call on contiguous 2-D views.
    const auto sizes = x.sizes();
    for (const at::Tensor* t : {&x, &out, &residual_out}) {
      if (t->sizes() != sizes || !t->is_contiguous()) return false;
    }
    if (residual.has_value() && (residual->sizes() != sizes || !residual->is_contiguous())) return false;
    std::optional<at::Tensor> res2d, index1d;
    if (residual.has_value()) res2d = residual->view({-1, D});
    if (index.has_value()) {
      if (index->dim() != 1 && index->sizes() != sizes.slice(0, sizes.size() - 1)) return false;
      if (!index->is_contiguous()) return false;
      index1d = index->view({-1});
      if (check_index && !index_in_range(*index1d, num_patches_)) return false;
    }
    call_op(x.view({-1, D}), res2d, weight_, bias_, eps_, norm_kind_, weight_offset_, down_,
                       down_bias_, up_, shift_, gate_dir_, gate_threshold_, gate_mode_, act_threshold_, index1d,
                       fire_counts,
                       out.view({-1, D}), residual_out.view({-1, D}));
    return true;
  }

 private:
  std::optional<at::Tensor> weight_, bias_;
  double eps_;
  int64_t norm_kind_;
  double weight_offset_;
  std::optional<at::Tensor> down_, down_bias_, up_, shift_, gate_dir_, gate_threshold_, gate_mode_, act_threshold_;
  int64_t hidden_, num_patches_;
};

}  // namespace
}  // namespace cpu
}  // namespace fastpatch

TORCH_LIBRARY_IMPL(fastpatch, CPU, m) {
  m.impl("fused_add_norm", &fastpatch::cpu::fused_add_norm_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_add_norm", &fastpatch::cpu::call_op,
        "torch.ops.fastpatch.fused_add_norm (backend=None) through the dispatcher from C++: the eager entry");
  pybind11::class_<fastpatch::cpu::Plan>(m, "Plan")
      .def(pybind11::init<std::optional<at::Tensor>, std::optional<at::Tensor>, double, int64_t, double,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, std::optional<at::Tensor>, int64_t>())
      .def("run", &fastpatch::cpu::Plan::run);
  m.def("built_with_openmp", &fastpatch::cpu::built_with_openmp,
        "whether at::parallel_for in this build can run on several threads");
}
