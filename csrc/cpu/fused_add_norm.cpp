// CPU kernel of fastpatch.fused_add_norm: residual add + activation patch + RMS/LayerNorm in one
// pass over each row. Semantics: fastpatch/core/reference.py. Gate decisions and norm statistics go
// through csrc/patch_math.h, the same helpers the CUDA kernels use. The op registration and the
// Python bindings are in csrc/cpu/torch_bindings.cpp (declarations: csrc/cpu/ops.h).
//
// Per row (D elements, fp32 maths whatever the storage dtype):
//   unpatched row: x + residual -> round to x dtype -> residual_out, norm statistics accumulated on
//                  the way (one pass over the inputs);
//   patched row:   x + residual -> fp32 row buffer, gate statistics on the way; then if the gate
//                  fires z = h·downᵀ + bias (R dots over the buffer) and h + z·up + shift is
//                  rounded, stored to residual_out and accumulated (second pass, over the buffer);
//   then out = norm(residual_out row)·(weight + offset) (+ bias), reading the row back from
//   residual_out (it was just written: cache-resident; exactly the rounded values).
// Inputs of a row are read in full before its outputs are written, and every row only touches
// its own slice, so out/residual_out may alias x/residual.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../patch_math.h"
#include "ops.h"

namespace fastpatch {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
using Full = std::true_type;   // a whole vector of lanes
using Tail = std::false_type;  // the last, partial chunk of a row

// ----------------------------------------------------------------------------------------------
// Row I/O: a storage dtype T seen as fp32 vectors. Tail loads zero-fill the unused lanes, so sums
// and dot products over a tail chunk need no masking.

// Reduced-precision I/O is written with intrinsics where torch compiled at::vec for AVX512 or
// AVX2: at::vec converts bf16/fp16 two vectors at a time (convert_from_float(a, b)), so storing one
// vector of rounded values cost a double conversion plus a round trip back to fp32, which made
// bf16 rows compute-bound at a third of fp32's bandwidth. Here one vector is rounded in the fp32
// bit domain (round to nearest even, exactly c10::BFloat16's rule, NaN -> 0x7fc0), stored with one
// narrowing move, and the rounded fp32 values fall out of the same bits. Tails use masked loads
// and stores instead of scalar loops.
#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// fp32 lanes rounded to bf16, kept as fp32 bit patterns (low 16 bits zero).
inline __m512i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  return _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0x7fc00000), r);
}

template <typename T>
inline Vec widen(__m256i h) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  } else {
    return Vec(_mm512_cvtph_ps(h));
  }
}

template <typename T>
inline Vec load_reduced(const T* p, int64_t n, bool full) {
  const __m256i h = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                         : _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return widen<T>(h);
}

// Round v to T, store n (or all) lanes, return the rounded values in fp32.
template <typename T>
inline Vec store_reduced(T* p, const Vec& v, int64_t n, bool full) {
  __m256i h;
  Vec rounded;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i r = round_to_bf16_bits(v);
    h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
    rounded = Vec(_mm512_castsi512_ps(r));
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    rounded = Vec(_mm512_cvtph_ps(h));
  }
  if (full) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  else _mm256_mask_storeu_epi16(p, tail_mask(n), h);
  return rounded;
}
#define FASTPATCH_REDUCED_SIMD 1
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256i round_to_bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  const __m256 ordered = _mm256_cmp_ps(v, v, _CMP_ORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                                              _mm256_castsi256_ps(r), ordered));
}

template <typename T>
inline Vec widen(__m128i h) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  } else {
    return Vec(_mm256_cvtph_ps(h));
  }
}

template <typename T>
inline Vec load_reduced(const T* p, int64_t n, bool full) {
  __m128i h;
  if (full) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {  // AVX2 has no 16-bit masked load: at most 7 elements through a zeroed copy
    alignas(16) uint16_t tmp[8] = {};
    std::memcpy(tmp, p, n * sizeof(T));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return widen<T>(h);
}

template <typename T>
inline Vec store_reduced(T* p, const Vec& v, int64_t n, bool full) {
  __m128i h;
  Vec rounded;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i r = round_to_bf16_bits(v);
    const __m256i hi = _mm256_srli_epi32(r, 16);
    h = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    rounded = Vec(_mm256_castsi256_ps(r));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    rounded = Vec(_mm256_cvtph_ps(h));
  }
  if (full) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(p, tmp, n * sizeof(T));
  }
  return rounded;
}
#define FASTPATCH_REDUCED_SIMD 1
#endif

template <typename T>
inline Vec load_full(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
#ifdef FASTPATCH_REDUCED_SIMD
    return load_reduced<T>(p, kLanes, true);
#else
    Vec v;
    at::vec::load_to_float<T>(p, v);
    return v;
#endif
  }
}

template <typename T>
inline Vec load_tail(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
#ifdef FASTPATCH_REDUCED_SIMD
    return load_reduced<T>(p, n, false);
#else
    alignas(64) float tmp[kLanes] = {};
    for (int64_t l = 0; l < n; ++l) tmp[l] = static_cast<float>(p[l]);
    return Vec::loadu(tmp);
#endif
  }
}

template <typename Chunk, typename T>
inline Vec load(const T* p, int64_t n) {
  if constexpr (Chunk::value) return load_full(p);
  else return load_tail(p, n);
}

template <typename Chunk>
inline void store_f32(float* p, const Vec& v, int64_t n) {
  if constexpr (Chunk::value) v.store(p);
  else v.store(p, n);
}

// Store v rounded to T and return the rounded values in fp32: what the norm must read, since it
// normalises residual_out as stored, not the unrounded sum.
template <typename Chunk, typename T>
inline Vec store_rounded(T* p, const Vec& v, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    store_f32<Chunk>(p, v, n);
    return v;
  } else {
#ifdef FASTPATCH_REDUCED_SIMD
    return store_reduced<T>(p, v, n, Chunk::value);
#else
    if constexpr (Chunk::value) {
      auto packed = at::vec::convert_from_float<T>(v, v);  // round to nearest even, as torch does
      // Only the low half is ours; Vectorized<T>::store(p, count) would bounce through a stack copy.
      static_assert(sizeof(packed) == 2 * kLanes * sizeof(T), "Vectorized<T> holds 2x float lanes");
      std::memcpy(p, &packed, kLanes * sizeof(T));
      return std::get<0>(at::vec::convert_to_float<T>(packed));
    } else {
      alignas(64) float tmp[kLanes];
      v.store(tmp);
      for (int64_t l = 0; l < kLanes; ++l) {
        const T r = static_cast<T>(l < n ? tmp[l] : 0.f);
        if (l < n) p[l] = r;
        tmp[l] = static_cast<float>(r);
      }
      return Vec::loadu(tmp);
    }
#endif
  }
}

// Calls body(Full{}, j) for each whole vector of a row and body(Tail{}, j) for the remainder.
template <typename Body>
inline void for_each_chunk(int64_t D, Body&& body) {
  int64_t j = 0;
  for (; j + kLanes <= D; j += kLanes) body(Full{}, j);
  if (j < D) body(Tail{}, j);
}

inline float hsum(const Vec& v) {
  alignas(64) float tmp[kLanes];
  v.store(tmp);
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += tmp[l];
  return s;
}

// ----------------------------------------------------------------------------------------------
// One call's arguments as raw pointers (validated by the op wrapper below).

struct Problem {
  int64_t rows = 0, hidden = 0;
  const void* x = nullptr;
  const void* residual = nullptr;  // null: h = x
  const void* weight = nullptr;    // null: scale 1 (+ offset)
  const void* norm_bias = nullptr;
  float eps = 0.f, weight_offset = 0.f;
  int norm_kind = kNormRms;
  void* out = nullptr;
  void* residual_out = nullptr;
  // Patch bank; has_bank false means no patching at all.
  bool has_bank = false;
  int64_t num_patches = 0, rank = 0;
  const void* down = nullptr;       // [P, R, D], null when R == 0
  const void* down_bias = nullptr;  // [P, R]
  const void* up = nullptr;         // [P, R, D]
  const void* shift = nullptr;      // [P, D], null when no patch has a shift
  const void* gate_dir = nullptr;   // [P, D], null when no patch is gated
  const float* gate_threshold = nullptr;
  const int32_t* gate_mode = nullptr;
  const float* act_threshold = nullptr;  // [P, R] fp32 levels, null when every component is identity
  const void* index = nullptr;  // null with a bank: patch 0 on every row
  bool index_is_64 = false;
  int32_t* fire_counts = nullptr;
};

// The patch a row asks for, or -1. Out-of-range entries mean "no patch", never a wild read.
inline int64_t patch_of_row(const Problem& p, int64_t row) {
  if (!p.has_bank) return -1;
  if (p.index == nullptr) return 0;
  const int64_t k = p.index_is_64 ? static_cast<const int64_t*>(p.index)[row]
                                  : static_cast<const int32_t*>(p.index)[row];
  return (k >= 0 && k < p.num_patches) ? k : -1;
}

// ----------------------------------------------------------------------------------------------
// Passes over one row.

// Unpatched row: residual_out = round(x + residual), buf = that in fp32, with Σ and Σ² for the norm.
// With a shift (an ungated rank-0 patch: a steer) h + shift goes the same single pass.
template <typename T, typename B, bool kResidual, bool kShift>
inline void add_round_store(const T* x, const T* res, const B* shift, T* res_out,
                            int64_t D, float& sum, float& sumsq) {
  Vec s(0.f), q(0.f);
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    Vec h = load<C>(x + j, n);
    if constexpr (kResidual) h = h + load<C>(res + j, n);
    if constexpr (kShift) h = h + load<C>(shift + j, n);
    const Vec r = store_rounded<C>(res_out + j, h, n);
    s = s + r;
    q = at::vec::fmadd(r, r, q);
  });
  sum = hsum(s);
  sumsq = hsum(q);
}

// Patched row, first pass: buf = x + residual (unrounded fp32); with a gate also h·ĉ and ‖h‖².
template <typename T, typename B, bool kResidual, bool kGate>
inline void add_to_buffer(const T* x, const T* res, const B* gate_dir, float* buf, int64_t D,
                          float& proj, float& sumsq) {
  Vec pr(0.f), q(0.f);
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    Vec h = load<C>(x + j, n);
    if constexpr (kResidual) h = h + load<C>(res + j, n);
    store_f32<C>(buf + j, h, n);
    if constexpr (kGate) {
      pr = at::vec::fmadd(h, load<C>(gate_dir + j, n), pr);
      q = at::vec::fmadd(h, h, q);
    }
  });
  proj = hsum(pr);
  sumsq = hsum(q);
}

// z[r] = buf·down[r] + bias[r] for r < R, four dots per sweep so each buffer load feeds four FMAs.
template <typename B>
inline void down_project(const float* buf, const B* down, const B* bias, int64_t R, int64_t D,
                         float* z) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const B* d0 = down + r * D;
    const B* d1 = d0 + D;
    const B* d2 = d1 + D;
    const B* d3 = d2 + D;
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for_each_chunk(D, [&](auto chunk, int64_t j) {
      using C = decltype(chunk);
      const int64_t n = D - j;
      const Vec h = load<C>(buf + j, n);
      a0 = at::vec::fmadd(h, load<C>(d0 + j, n), a0);
      a1 = at::vec::fmadd(h, load<C>(d1 + j, n), a1);
      a2 = at::vec::fmadd(h, load<C>(d2 + j, n), a2);
      a3 = at::vec::fmadd(h, load<C>(d3 + j, n), a3);
    });
    z[r] = hsum(a0) + static_cast<float>(bias[r]);
    z[r + 1] = hsum(a1) + static_cast<float>(bias[r + 1]);
    z[r + 2] = hsum(a2) + static_cast<float>(bias[r + 2]);
    z[r + 3] = hsum(a3) + static_cast<float>(bias[r + 3]);
  }
  for (; r < R; ++r) {
    const B* d = down + r * D;
    Vec a(0.f);
    for_each_chunk(D, [&](auto chunk, int64_t j) {
      using C = decltype(chunk);
      const int64_t n = D - j;
      a = at::vec::fmadd(load<C>(buf + j, n), load<C>(d + j, n), a);
    });
    z[r] = hsum(a) + static_cast<float>(bias[r]);
  }
}

// Patched row, second pass: h' = buf + Σ z[r]·up[r] + shift (R may be 0, shift may be null),
// rounded into residual_out and back into buf, with Σ and Σ² for the norm. With R == 0 and no
// shift this is the "gate did not fire" pass.
template <typename T, typename B>
inline void finish_patched(const float* buf, const float* z, const B* up, int64_t R, const B* shift,
                           T* res_out, int64_t D, float& sum, float& sumsq) {
  Vec s(0.f), q(0.f);
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    Vec h = load<C>(buf + j, n);
    if (shift != nullptr) h = h + load<C>(shift + j, n);
    for (int64_t r = 0; r < R; ++r) h = at::vec::fmadd(Vec(z[r]), load<C>(up + r * D + j, n), h);
    const Vec rounded = store_rounded<C>(res_out + j, h, n);
    s = s + rounded;
    q = at::vec::fmadd(rounded, rounded, q);
  });
  sum = hsum(s);
  sumsq = hsum(q);
}

// Σ(buf − mean)² for LayerNorm: the two-pass form, which keeps its precision when |mean| ≫ std.
template <typename T>
inline float centred_sumsq(const T* row, float mean, int64_t D) {
  Vec q(0.f);
  const Vec m(mean);
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    Vec d = load<C>(row + j, n) - m;
    if constexpr (!C::value) d = Vec::set(Vec(0.f), d, n);  // zero-filled lanes would add mean² each
    q = at::vec::fmadd(d, d, q);
  });
  return hsum(q);
}

// out = (row − mean)·inv·(weight + offset) (+ bias), rounded to T.
template <typename T, typename W, bool kWeight, bool kBias>
inline void write_normed(const T* row, const W* weight, const W* bias, float offset,
                         float mean, float inv, T* out, int64_t D) {
  const Vec m(mean), s(inv), off(offset), unit_scale(inv * (1.f + offset));
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    const Vec centred = load<C>(row + j, n) - m;
    Vec y;
    if constexpr (kWeight) y = centred * s * (load<C>(weight + j, n) + off);
    else y = centred * unit_scale;
    if constexpr (kBias) y = y + load<C>(bias + j, n);
    store_rounded<C>(out + j, y, n);
  });
}

template <typename T, typename W>
inline void write_normed_any(const Problem& p, const T* row, float mean, float inv, T* out) {
  const W* w = static_cast<const W*>(p.weight);
  const W* b = static_cast<const W*>(p.norm_bias);
  const int64_t D = p.hidden;
  if (w && b) write_normed<T, W, true, true>(row, w, b, p.weight_offset, mean, inv, out, D);
  else if (w) write_normed<T, W, true, false>(row, w, b, p.weight_offset, mean, inv, out, D);
  else if (b) write_normed<T, W, false, true>(row, w, b, p.weight_offset, mean, inv, out, D);
  else write_normed<T, W, false, false>(row, w, b, p.weight_offset, mean, inv, out, D);
}

// Low-rank patches over a block of NB rows that use the same patch: each down/up chunk is loaded
// once for all NB rows (the bank, 2·R·D values, is what a low-rank patch reads most; per row it
// would be streamed from L2 again and again). z is [NB, R].

template <typename B, int NB>
inline void down_project_block(float* const* bufs, const B* down, const B* bias, int64_t R,
                               int64_t D, float* z) {
  for (int64_t r = 0; r < R; ++r) {
    const B* d = down + r * D;
    Vec acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = Vec(0.f);
    for_each_chunk(D, [&](auto chunk, int64_t j) {
      using C = decltype(chunk);
      const int64_t n = D - j;
      const Vec dj = load<C>(d + j, n);
      for (int b = 0; b < NB; ++b) acc[b] = at::vec::fmadd(load<C>(bufs[b] + j, n), dj, acc[b]);
    });
    for (int b = 0; b < NB; ++b) z[b * R + r] = hsum(acc[b]) + static_cast<float>(bias[r]);
  }
}

template <typename T, typename B, int NB>
inline void finish_block(const float* const* bufs, const float* z, const B* up, int64_t R, const B* shift,
                         T* const* res_outs, int64_t D, float* sums, float* sumsqs) {
  Vec s[NB], q[NB];
  for (int b = 0; b < NB; ++b) s[b] = q[b] = Vec(0.f);
  for_each_chunk(D, [&](auto chunk, int64_t j) {
    using C = decltype(chunk);
    const int64_t n = D - j;
    const Vec sh = shift != nullptr ? load<C>(shift + j, n) : Vec(0.f);
    Vec h[NB];
    for (int b = 0; b < NB; ++b) h[b] = load<C>(bufs[b] + j, n) + sh;
    for (int64_t r = 0; r < R; ++r) {
      const Vec u = load<C>(up + r * D + j, n);
      for (int b = 0; b < NB; ++b) h[b] = at::vec::fmadd(Vec(z[b * R + r]), u, h[b]);
    }
    for (int b = 0; b < NB; ++b) {
      const Vec rounded = store_rounded<C>(res_outs[b] + j, h[b], n);
      s[b] = s[b] + rounded;
      q[b] = at::vec::fmadd(rounded, rounded, q[b]);
    }
  });
  for (int b = 0; b < NB; ++b) {
    sums[b] = hsum(s[b]);
    sumsqs[b] = hsum(q[b]);
  }
}

// ----------------------------------------------------------------------------------------------
// Rows, end to end. T: x dtype; B: bank dtype (float or T); W: norm weight/bias dtype.

// Rows handled together so that low-rank rows sharing a patch share its bank loads.
constexpr int kBlockRows = 8;

// Per-thread scratch, reused across calls so a decode step allocates nothing.
struct Scratch {
  std::vector<float> rows;  // kBlockRows fp32 row buffers of `hidden` floats
  std::vector<float> z;     // kBlockRows × rank
  void fit(int64_t hidden, int64_t rank) {
    if (static_cast<int64_t>(rows.size()) < kBlockRows * hidden) rows.resize(kBlockRows * hidden);
    if (static_cast<int64_t>(z.size()) < kBlockRows * rank) z.resize(kBlockRows * rank);
  }
};

template <typename T, typename W>
inline void normalize_row(const Problem& p, int64_t row, float sum, float sumsq) {
  // The row as stored in residual_out (already rounded to T): the norm reads it back from there
  // rather than from an fp32 copy, one store less per element (the pass is store-bound).
  const T* src = static_cast<const T*>(p.residual_out) + row * p.hidden;
  const int64_t D = p.hidden;
  float mean = 0.f, inv;
  if (p.norm_kind == kNormLayer) {
    mean = sum / static_cast<float>(D);
    inv = layer_inv(centred_sumsq(src, mean, D), static_cast<int>(D), p.eps);
  } else {
    inv = rms_inv(sumsq, static_cast<int>(D), p.eps);
  }
  write_normed_any<T, W>(p, src, mean, inv, static_cast<T*>(p.out) + row * D);
}

template <typename T, typename B, typename W, int NB>
void lowrank_block(const Problem& p, int64_t k, const int64_t* rows, float* const* bufs, float* z) {
  const int64_t D = p.hidden, R = p.rank;
  const B* down = static_cast<const B*>(p.down) + k * R * D;
  const B* bias = static_cast<const B*>(p.down_bias) + k * R;
  const B* up = static_cast<const B*>(p.up) + k * R * D;
  const B* shift = p.shift ? static_cast<const B*>(p.shift) + k * D : nullptr;
  if constexpr (NB == 1) {
    down_project<B>(bufs[0], down, bias, R, D, z);  // four dots per sweep beats one
  } else {
    down_project_block<B, NB>(bufs, down, bias, R, D, z);
  }
  if (p.act_threshold) {
    // Per-component activation (fastpatch.core.bank.PatchBank.act_threshold): φ(z) = z if z > t
    // else 0, one compare + select per component (t = -inf identity, 0 ReLU, max(θ, 0) JumpReLU).
    // Identity banks pass null and never enter this loop.
    const float* t = p.act_threshold + k * R;
    for (int b = 0; b < NB; ++b) {
      for (int64_t r = 0; r < R; ++r) z[b * R + r] = z[b * R + r] > t[r] ? z[b * R + r] : 0.f;
    }
  }
  T* res_outs[NB];
  float sums[NB], sumsqs[NB];
  for (int b = 0; b < NB; ++b) res_outs[b] = static_cast<T*>(p.residual_out) + rows[b] * D;
  finish_block<T, B, NB>(bufs, z, up, R, shift, res_outs, D, sums, sumsqs);
  for (int b = 0; b < NB; ++b) normalize_row<T, W>(p, rows[b], sums[b], sumsqs[b]);
}

// Rows [begin, end) in blocks of kBlockRows. Within a block every row is added (and gated) into its
// own buffer; rows without a low-rank part finish at once, low-rank rows are then finished per
// patch, in sub-blocks of 8/4/2/1 rows.
template <typename T, typename B, typename W, bool kResidual>
void process_rows(const Problem& p, int64_t begin, int64_t end, Scratch& scratch) {
  const int64_t D = p.hidden;
  const int64_t R = p.down ? p.rank : 0;
  for (int64_t first = begin; first < end; first += kBlockRows) {
    const int nrows = static_cast<int>(std::min<int64_t>(kBlockRows, end - first));
    int64_t pending_rows[kBlockRows], pending_patch[kBlockRows];
    int npending = 0;
    for (int b = 0; b < nrows; ++b) {
      const int64_t row = first + b;
      float* buf = scratch.rows.data() + b * D;
      const T* x = static_cast<const T*>(p.x) + row * D;
      const T* res = kResidual ? static_cast<const T*>(p.residual) + row * D : nullptr;
      T* res_out = static_cast<T*>(p.residual_out) + row * D;
      float sum = 0.f, sumsq = 0.f;  // of the rounded residual_out row
      const int64_t k = patch_of_row(p, row);
      if (k < 0) {
        add_round_store<T, B, kResidual, false>(x, res, nullptr, res_out, D, sum, sumsq);
        normalize_row<T, W>(p, row, sum, sumsq);
        continue;
      }
      const int mode = p.gate_dir ? p.gate_mode[k] : kGateNone;
      if (mode == kGateNone && R == 0) {
        // Always fires and needs no dot product: one pass, like an unpatched row.
        if (p.fire_counts) __atomic_fetch_add(p.fire_counts + k, 1, __ATOMIC_RELAXED);
        if (p.shift) {
          const B* shift = static_cast<const B*>(p.shift) + k * D;
          add_round_store<T, B, kResidual, true>(x, res, shift, res_out, D, sum, sumsq);
        } else {
          add_round_store<T, B, kResidual, false>(x, res, nullptr, res_out, D, sum, sumsq);
        }
        normalize_row<T, W>(p, row, sum, sumsq);
        continue;
      }
      float proj = 0.f, h_sumsq = 0.f;
      if (mode != kGateNone) {
        const B* dir = static_cast<const B*>(p.gate_dir) + k * D;
        add_to_buffer<T, B, kResidual, true>(x, res, dir, buf, D, proj, h_sumsq);
      } else {
        add_to_buffer<T, B, kResidual, false>(x, res, nullptr, buf, D, proj, h_sumsq);
      }
      const bool fires = gate_fires(mode, proj, h_sumsq, p.gate_threshold ? p.gate_threshold[k] : 0.f);
      if (fires && p.fire_counts) __atomic_fetch_add(p.fire_counts + k, 1, __ATOMIC_RELAXED);
      if (fires && R > 0) {
        pending_rows[npending] = row;
        pending_patch[npending] = k;
        ++npending;
        continue;
      }
      const B* shift = (fires && p.shift) ? static_cast<const B*>(p.shift) + k * D : nullptr;
      finish_patched<T, B>(buf, nullptr, static_cast<const B*>(nullptr), 0, shift, res_out, D, sum,
                           sumsq);
      normalize_row<T, W>(p, row, sum, sumsq);
    }
    // Low-rank rows, grouped by patch.
    bool done[kBlockRows] = {};
    for (int a = 0; a < npending; ++a) {
      if (done[a]) continue;
      const int64_t k = pending_patch[a];
      int64_t rows[kBlockRows];
      float* bufs[kBlockRows];
      int m = 0;
      for (int c = a; c < npending; ++c) {
        if (done[c] || pending_patch[c] != k) continue;
        done[c] = true;
        rows[m] = pending_rows[c];
        bufs[m] = scratch.rows.data() + (pending_rows[c] - first) * D;
        ++m;
      }
      float* z = scratch.z.data();
      int at = 0;
      for (; m - at >= 8; at += 8) lowrank_block<T, B, W, 8>(p, k, rows + at, bufs + at, z);
      if (m - at >= 4) { lowrank_block<T, B, W, 4>(p, k, rows + at, bufs + at, z); at += 4; }
      if (m - at >= 2) { lowrank_block<T, B, W, 2>(p, k, rows + at, bufs + at, z); at += 2; }
      if (m - at >= 1) { lowrank_block<T, B, W, 1>(p, k, rows + at, bufs + at, z); at += 1; }
    }
  }
}

// Rows per task: enough work (~32K element-operations) that a task outweighs waking a thread, so a
// decode step's handful of rows runs inline on the calling thread.
inline int64_t grain_rows(const Problem& p) {
  const int64_t per_row = p.hidden * (1 + (p.has_bank && p.down ? p.rank : 0));
  return std::max<int64_t>(1, (int64_t{32768} + per_row - 1) / per_row);
}

template <typename T, typename B, typename W>
void run_rows(const Problem& p) {
  at::parallel_for(0, p.rows, grain_rows(p), [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;
    scratch.fit(p.hidden, p.rank);
    if (p.residual) process_rows<T, B, W, true>(p, begin, end, scratch);
    else process_rows<T, B, W, false>(p, begin, end, scratch);
  });
}

// ----------------------------------------------------------------------------------------------
// The op: checks (cheap; fastpatch.kernels.checks.check_inputs did the thorough ones), dtype dispatch.

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

void check_param(const std::optional<at::Tensor>& t, const char* name, int64_t numel) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t->numel() == numel, name, " has ", t->numel(), " elements, expected ", numel);
}

// A float parameter in fp32 or in `same` (x's dtype); anything else goes to fp32 (a slow path for
// unusual mixes, e.g. an fp16 bank with bf16 activations).
std::optional<at::Tensor> as_float_or(const std::optional<at::Tensor>& t, at::ScalarType same,
                                      bool to_float) {
  if (!t.has_value()) return t;
  if (to_float && t->scalar_type() != at::kFloat) return t->to(at::kFloat);
  return t;
}

template <typename T>
void dispatch_param_dtypes(const Problem& p, bool bank_f32, bool weight_f32) {
  if constexpr (std::is_same_v<T, float>) {
    run_rows<float, float, float>(p);
  } else {
    if (bank_f32 && weight_f32) run_rows<T, float, float>(p);
    else if (bank_f32) run_rows<T, float, T>(p);
    else if (weight_f32) run_rows<T, T, float>(p);
    else run_rows<T, T, T>(p);
  }
}

}  // namespace

void fused_add_norm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& norm_bias_in,
    double eps, int64_t norm_kind, double weight_offset,
    const std::optional<at::Tensor>& down_in, const std::optional<at::Tensor>& down_bias_in,
    const std::optional<at::Tensor>& up_in, const std::optional<at::Tensor>& shift_in,
    const std::optional<at::Tensor>& gate_dir_in, const std::optional<at::Tensor>& gate_threshold,
    const std::optional<at::Tensor>& gate_mode, const std::optional<at::Tensor>& act_threshold,
    const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& fire_counts, const at::Tensor& out,
    const at::Tensor& residual_out) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [rows, hidden]");
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "x must be float32, bfloat16 or float16");
  TORCH_CHECK(norm_kind == kNormRms || norm_kind == kNormLayer, "norm_kind must be 0 or 1");
  const int64_t N = x.size(0), D = x.size(1);
  for (const at::Tensor* t : {&out, &residual_out}) {
    TORCH_CHECK(t->sizes() == x.sizes() && t->scalar_type() == dt && t->is_contiguous() &&
                    t->device().is_cpu(),
                "out and residual_out must be contiguous CPU tensors shaped like x, in x's dtype");
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == dt,
                "residual must match x in shape and dtype");
    check_param(residual, "residual", N * D);
  }

  // Norm affine: both in fp32 or both in x's dtype.
  const bool weight_f32 = (weight_in.has_value() && weight_in->scalar_type() == at::kFloat) ||
                          (norm_bias_in.has_value() && norm_bias_in->scalar_type() == at::kFloat) ||
                          dt == at::kFloat;
  for (const auto* t : {&weight_in, &norm_bias_in}) {
    TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == at::kFloat || (*t)->scalar_type() == dt,
                "weight and bias must be float32 or x's dtype");
  }
  const auto weight = as_float_or(weight_in, dt, weight_f32);
  const auto norm_bias = as_float_or(norm_bias_in, dt, weight_f32);
  check_param(weight, "weight", D);
  check_param(norm_bias, "bias", D);

  Problem p;
  p.rows = N;
  p.hidden = D;
  p.x = x.data_ptr();
  p.residual = ptr_or_null(residual);
  p.weight = ptr_or_null(weight);
  p.norm_bias = ptr_or_null(norm_bias);
  p.eps = static_cast<float>(eps);
  p.weight_offset = static_cast<float>(weight_offset);
  p.norm_kind = static_cast<int>(norm_kind);
  p.out = out.data_ptr();
  p.residual_out = residual_out.data_ptr();

  // The bank: gate_mode (one int32 per patch) is always given with a bank and fixes P.
  bool bank_f32 = true;
  std::optional<at::Tensor> down, down_bias, up, shift, gate_dir;
  if (gate_mode.has_value()) {
    TORCH_CHECK(gate_mode->scalar_type() == at::kInt && gate_mode->dim() == 1,
                "gate_mode must be int32 [P]");
    const int64_t P = gate_mode->numel();
    TORCH_CHECK(P > 0, "a bank needs at least one patch");
    int64_t R = 0;
    if (down_in.has_value()) {
      TORCH_CHECK(down_in->dim() == 3 && down_in->size(0) == P && down_in->size(2) == D,
                  "down must be [P, R, hidden]");
      R = down_in->size(1);
      TORCH_CHECK(up_in.has_value() && down_bias_in.has_value(), "down needs up and down_bias");
    }
    // Bank parameters are all in one dtype (PatchBank guarantees it): fp32 or x's dtype.
    at::ScalarType bank_dt = at::kFloat;
    for (const auto* t : {&down_in, &down_bias_in, &up_in, &shift_in, &gate_dir_in}) {
      if (t->has_value()) bank_dt = (*t)->scalar_type();
    }
    bank_f32 = bank_dt == at::kFloat || bank_dt != dt;
    const bool convert = bank_dt != at::kFloat && bank_dt != dt;
    down = as_float_or(down_in, dt, convert);
    down_bias = as_float_or(down_bias_in, dt, convert);
    up = as_float_or(up_in, dt, convert);
    shift = as_float_or(shift_in, dt, convert);
    gate_dir = as_float_or(gate_dir_in, dt, convert);
    const at::ScalarType want = bank_f32 ? at::kFloat : dt;
    for (const auto* t : {&down, &down_bias, &up, &shift, &gate_dir}) {
      TORCH_CHECK(!t->has_value() || (*t)->scalar_type() == want,
                  "bank tensors must share one dtype");
    }
    check_param(down, "down", P * R * D);
    check_param(down_bias, "down_bias", P * R);
    check_param(up, "up", P * R * D);
    check_param(shift, "shift", P * D);
    check_param(gate_dir, "gate_dir", P * D);
    check_param(gate_mode, "gate_mode", P);
    if (gate_dir.has_value()) {
      TORCH_CHECK(gate_threshold.has_value() && gate_threshold->scalar_type() == at::kFloat,
                  "a gated bank needs float32 gate_threshold");
      check_param(gate_threshold, "gate_threshold", P);
    }
    if (act_threshold.has_value()) {
      TORCH_CHECK(act_threshold->scalar_type() == at::kFloat, "act_threshold must be float32 [P, R]");
      check_param(act_threshold, "act_threshold", P * R);
    }
    if (index.has_value()) {
      TORCH_CHECK(index->scalar_type() == at::kInt || index->scalar_type() == at::kLong,
                  "index must be int32 or int64");
      check_param(index, "index", N);
    }
    if (fire_counts.has_value()) {
      TORCH_CHECK(fire_counts->scalar_type() == at::kInt, "fire_counts must be int32");
      check_param(fire_counts, "fire_counts", P);
    }
    p.has_bank = true;
    p.num_patches = P;
    p.rank = R;
    p.down = R > 0 ? ptr_or_null(down) : nullptr;
    p.down_bias = R > 0 ? ptr_or_null(down_bias) : nullptr;
    p.up = R > 0 ? ptr_or_null(up) : nullptr;
    p.shift = ptr_or_null(shift);
    p.gate_dir = ptr_or_null(gate_dir);
    p.gate_threshold = gate_threshold.has_value() ? gate_threshold->data_ptr<float>() : nullptr;
    p.gate_mode = gate_mode->data_ptr<int32_t>();
    p.act_threshold = (R > 0 && act_threshold.has_value()) ? act_threshold->data_ptr<float>() : nullptr;
    p.index = ptr_or_null(index);
    p.index_is_64 = index.has_value() && index->scalar_type() == at::kLong;
    p.fire_counts = fire_counts.has_value() ? fire_counts->data_ptr<int32_t>() : nullptr;
  } else {
    TORCH_CHECK(!down_in.has_value() && !up_in.has_value() && !shift_in.has_value() &&
                    !gate_dir_in.has_value() && !act_threshold.has_value() && !index.has_value() &&
                    !fire_counts.has_value(),
                "bank tensors, index and fire_counts need gate_mode (it marks a bank)");
  }
  if (N == 0) return;

  switch (dt) {
    case at::kFloat: dispatch_param_dtypes<float>(p, bank_f32, weight_f32); break;
    case at::kBFloat16: dispatch_param_dtypes<c10::BFloat16>(p, bank_f32, weight_f32); break;
    case at::kHalf: dispatch_param_dtypes<c10::Half>(p, bank_f32, weight_f32); break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
}


// True when every entry of a contiguous CPU int32/int64 index lies in [-1, num_patches): the
// per-call index check of Plan::run below. One pass, no
// allocation: ~0.1 µs for a decode batch where torch's min()/max() cost two ops and two syncs.
// Anything it cannot scan (wrong dtype or device, non-contiguous) answers false.
bool index_in_range(const at::Tensor& index, int64_t num_patches) {
  if (!index.device().is_cpu() || !index.is_contiguous()) return false;
  const int64_t n = index.numel();
  auto scan = [&](auto* v) {
    bool ok = true;  // no early exit: a branch-free loop vectorises
    for (int64_t i = 0; i < n; ++i) ok &= (v[i] >= -1) & (v[i] < num_patches);
    return ok;
  };
  if (index.scalar_type() == at::kInt) return scan(index.data_ptr<int32_t>());
  if (index.scalar_type() == at::kLong) return scan(index.data_ptr<int64_t>());
  return false;
}

// Whether at::parallel_for in this build can use more than one thread (it needs OpenMP).
bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fastpatch
