// Per-row maths shared by the C++ CPU kernels and the CUDA kernels (host and device), so the
// CPU tests exercise the exact code the GPU runs for gate decisions and norm statistics.
// Semantics are defined by fastpatch/core/reference.py; keep the two in step.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FP_HD __host__ __device__ __forceinline__
#else
#define FP_HD inline
#endif

namespace fastpatch {

// Mirrors fastpatch.core.patches.GATE_*.
enum GateMode : int {
  kGateNone = 0,
  kGateCosineAbove = 1,
  kGateCosineBelow = 2,
  kGateProjectionAbove = 3,
  kGateProjectionBelow = 4,
};

enum NormKind : int { kNormRms = 0, kNormLayer = 1 };

// Does the gate let the patch act on a row? `proj` = h·ĉ (ĉ unit), `sumsq` = ‖h‖², both over
// the pre-patch row h. Cosine of a zero row is 0.
FP_HD bool gate_fires(int mode, float proj, float sumsq, float threshold) {
  if (mode == kGateNone) return true;
  const bool cosine = (mode == kGateCosineAbove || mode == kGateCosineBelow);
  float metric = proj;
  if (cosine) metric = sumsq > 0.f ? proj * (1.0f / sqrtf(sumsq)) : 0.f;
  const bool above = (mode == kGateCosineAbove || mode == kGateProjectionAbove);
  return above ? (metric > threshold) : (metric < threshold);
}

// 1/sqrt(mean(h²) + eps) for RMSNorm.
FP_HD float rms_inv(float sumsq, int hidden, float eps) {
  return 1.0f / sqrtf(sumsq / static_cast<float>(hidden) + eps);
}

// 1/sqrt(var + eps) for LayerNorm from a centred sum of squares Σ(h − mean)².
FP_HD float layer_inv(float centred_sumsq, int hidden, float eps) {
  return 1.0f / sqrtf(centred_sumsq / static_cast<float>(hidden) + eps);
}

}  // namespace fastpatch
