// Arguments of one fused add + patch + norm launch as raw pointers and sizes. Plain C++ (no CUDA
// or torch headers) so that the torch binding, the launchers and the host-side plan test share it.
#pragma once

#include <cstdint>

namespace fastpatch {
namespace cuda {

// Element types of the float tensors. The kernels are templated on the activation type; the
// bank and the norm affine may be fp32 or another float type and are read through a runtime
// switch (a block-uniform branch), which keeps the number of kernel instantiations small.
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

struct FusedAddNormParams {
  // Activations: [rows, hidden], contiguous, all in x_dtype. out / residual_out may alias x or
  // residual: every row is read in full before any of it is written.
  int64_t rows = 0;
  int hidden = 0;
  int x_dtype = kF32;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: h = x
  void* out = nullptr;
  void* residual_out = nullptr;

  // Norm: out = norm(residual_out)·(weight + weight_offset) (+ norm_bias for LayerNorm).
  int norm_kind = 0;  // fastpatch::kNormRms / kNormLayer
  float eps = 1e-6f;
  float weight_offset = 0.f;
  const void* weight = nullptr;  // null: weight = 1
  int weight_dtype = kF32;
  const void* norm_bias = nullptr;  // null: no bias
  int norm_bias_dtype = kF32;

  // Patch bank (num_patches == 0: no bank, the unpatched kernel runs). Parts that no patch uses
  // are null: down/down_bias/up when rank == 0, shift when every shift is zero, gate_dir and
  // gate_threshold when no patch is gated. gate_mode is always set with a bank.
  int num_patches = 0;
  int rank = 0;
  int bank_dtype = kF32;
  const void* down = nullptr;       // [P, R, D]
  const void* down_bias = nullptr;  // [P, R]
  const void* up = nullptr;         // [P, R, D]
  const void* shift = nullptr;      // [P, D]
  const void* gate_dir = nullptr;   // [P, D]
  const float* gate_threshold = nullptr;  // [P]
  const int32_t* gate_mode = nullptr;     // [P]
  // [P, R] fp32 activation levels t (fastpatch.core.bank.PatchBank.act_threshold): φ(z) = z if z > t
  // else 0. Null when every component is the identity (and when rank == 0).
  const float* act_threshold = nullptr;
  const void* index = nullptr;  // [rows] int32/int64, -1 = none; null with a bank = patch 0
  bool index_is_64 = false;
  int32_t* fire_counts = nullptr;  // [P] or null
};

}  // namespace cuda
}  // namespace fastpatch
