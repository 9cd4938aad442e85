// Vec: the float vector of the instruction set this file is compiled for, with just the
// operations the kernels of this folder use. Every .cpp here is compiled once per instruction set
// (setup.py: default, avx2 and avx512 on x86; default and neon on aarch64), with CPU_CAPABILITY
// naming it and CPU_CAPABILITY_<NAME> defined; the kernels are written once over Vec.
//
// Include no ATen or c10 header in this folder: an inline function of theirs compiled here with
// AVX-512 could be the copy the linker keeps for every file, and run on a CPU without it.
// Everything below has internal linkage for the same reason.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../cell_units.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#elif defined(CPU_CAPABILITY_NEON)
#include <arm_neon.h>
#endif

// Under AddressSanitizer the partial loads and stores go element by element: ASan does not see
// the lanes a masked vector instruction touches, and a tail is where an over-read would hide.
#if defined(__SANITIZE_ADDRESS__)
#define LSTM_FUSED_SCALAR_TAILS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LSTM_FUSED_SCALAR_TAILS 1
#endif
#endif

// Compiler-specific spellings live here, with the instruction sets: the kernels use only these.
#if defined(_MSC_VER)
#define LSTM_FUSED_ALWAYS_INLINE __forceinline
#else
#define LSTM_FUSED_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kCapabilityName = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kCapabilityName = "avx2";
#elif defined(CPU_CAPABILITY_NEON)
constexpr const char* kCapabilityName = "neon";
#else
constexpr const char* kCapabilityName = "default";
#endif

// Lanes [0, count) of a vector: the last, partial vector of a row.
struct Tail {
  int64_t count;
};

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Horizontal sums of 8 lanes, for both x86 paths (AVX-512 folds its 16 lanes to 8 first).
inline float sum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void store_sums8(float* out, __m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
}
#endif

#if defined(CPU_CAPABILITY_AVX2)

struct Vec {
  static constexpr int64_t kWidth = 8;
  static constexpr int kRegisters = 16;
  __m256 v;
  Vec() = default;
  Vec(__m256 lanes) : v(lanes) {}
  Vec(float broadcast) : v(_mm256_set1_ps(broadcast)) {}
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
inline Vec operator-(Vec a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
// 2^n for integral n in [-126, 127]: n + 127 is the exponent field of a float.
inline Vec power_of_two(Vec n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23));
}
// 1 / x to at least 12 bits.
inline Vec reciprocal_estimate(Vec x) { return _mm256_rcp_ps(x.v); }
// x limited to [lo, hi]; NaN stays NaN (min and max return their second operand on NaN).
inline Vec clamp(Vec x, float lo, float hi) { return _mm256_max_ps(_mm256_set1_ps(lo), _mm256_min_ps(_mm256_set1_ps(hi), x.v)); }
// Makes v a register value: without it GCC folds a vector used by two FMAs into both as a memory
// operand, loading it twice, and a dot-product loop becomes load-bound.
inline void keep_in_register(Vec& x) { asm("" : "+x"(x.v)); }

inline float sum(Vec x) { return sum8(x.v); }
// The horizontal sums of a, b, c, d into out[0..4).
inline void store_sums(float* out, Vec a, Vec b, Vec c, Vec d) { store_sums8(out, a.v, b.v, c.v, d.v); }

#ifndef LSTM_FUSED_SCALAR_TAILS
struct Mask {
  __m256i lanes;
  explicit Mask(Tail tail)
      : lanes(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(tail.count, 0, 8))),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))) {}
};
inline Vec load(const float* p, const Mask& m) { return _mm256_maskload_ps(p, m.lanes); }
inline void store(float* p, Vec x, const Mask& m) { _mm256_maskstore_ps(p, m.lanes, x.v); }
#endif

#elif defined(CPU_CAPABILITY_AVX512)

struct Vec {
  static constexpr int64_t kWidth = 16;
  static constexpr int kRegisters = 32;
  __m512 v;
  Vec() = default;
  Vec(__m512 lanes) : v(lanes) {}
  Vec(float broadcast) : v(_mm512_set1_ps(broadcast)) {}
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
inline Vec operator-(Vec a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)));
}
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Vec power_of_two(Vec n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23));
}
inline Vec reciprocal_estimate(Vec x) { return _mm512_rcp14_ps(x.v); }
inline Vec clamp(Vec x, float lo, float hi) { return _mm512_max_ps(_mm512_set1_ps(lo), _mm512_min_ps(_mm512_set1_ps(hi), x.v)); }
inline void keep_in_register(Vec& x) { asm("" : "+v"(x.v)); }

// The two halves added: 8 lanes.
inline __m256 fold(__m512 x) {
  return _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
}

inline float sum(Vec x) { return sum8(fold(x.v)); }
inline void store_sums(float* out, Vec a, Vec b, Vec c, Vec d) {
  store_sums8(out, fold(a.v), fold(b.v), fold(c.v), fold(d.v));
}

#ifndef LSTM_FUSED_SCALAR_TAILS
struct Mask {
  __mmask16 lanes;
  explicit Mask(Tail tail)
      : lanes(static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(tail.count, 0, 16)) - 1)) {}
};
inline Vec load(const float* p, const Mask& m) { return _mm512_maskz_loadu_ps(m.lanes, p); }
inline void store(float* p, Vec x, const Mask& m) { _mm512_mask_storeu_ps(p, m.lanes, x.v); }
#endif

#elif defined(CPU_CAPABILITY_NEON)

struct Vec {
  static constexpr int64_t kWidth = 4;
  static constexpr int kRegisters = 32;
  float32x4_t v;
  Vec() = default;
  Vec(float32x4_t lanes) : v(lanes) {}
  Vec(float broadcast) : v(vdupq_n_f32(broadcast)) {}
  static Vec load(const float* p) { return vld1q_f32(p); }
  static Vec broadcast(const float* p) { return vld1q_dup_f32(p); }
  void store(float* p) const { vst1q_f32(p, v); }
};
inline Vec operator+(Vec a, Vec b) { return vaddq_f32(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return vsubq_f32(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return vmulq_f32(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return vdivq_f32(a.v, b.v); }
inline Vec operator-(Vec a) { return vnegq_f32(a.v); }
inline Vec fma(Vec a, Vec b, Vec c) { return vfmaq_f32(c.v, a.v, b.v); }
inline Vec power_of_two(Vec n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.v), vdupq_n_s32(127)), 23));
}
// vrecpe's 8 bits and one of NEON's own refinement steps: 16.
inline Vec reciprocal_estimate(Vec x) {
  const float32x4_t estimate = vrecpeq_f32(x.v);
  return vmulq_f32(estimate, vrecpsq_f32(x.v, estimate));
}
inline Vec clamp(Vec x, float lo, float hi) { return vmaxq_f32(vdupq_n_f32(lo), vminq_f32(vdupq_n_f32(hi), x.v)); }  // NaN kept
inline void keep_in_register(Vec& x) { asm("" : "+w"(x.v)); }
inline float sum(Vec x) { return vaddvq_f32(x.v); }
inline void store_sums(float* out, Vec a, Vec b, Vec c, Vec d) {
  const float32x4_t ab = vpaddq_f32(a.v, b.v);
  const float32x4_t cd = vpaddq_f32(c.v, d.v);
  vst1q_f32(out, vpaddq_f32(ab, cd));
}

#else  // default: plain C++ the compiler vectorises for the baseline (SSE2 on x86-64)

struct Vec {
  static constexpr int64_t kWidth = 4;
  static constexpr int kRegisters = 16;
  float v[kWidth];
  Vec() = default;
  Vec(float broadcast) {
    for (float& x : v) x = broadcast;
  }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static Vec broadcast(const float* p) { return Vec(*p); }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
};
template <typename Op>
inline Vec lanewise(Vec a, Vec b, Op op) {
  Vec r;
  for (int64_t i = 0; i < Vec::kWidth; ++i) r.v[i] = op(a.v[i], b.v[i]);
  return r;
}
inline Vec operator+(Vec a, Vec b) { return lanewise(a, b, [](float x, float y) { return x + y; }); }
inline Vec operator-(Vec a, Vec b) { return lanewise(a, b, [](float x, float y) { return x - y; }); }
inline Vec operator*(Vec a, Vec b) { return lanewise(a, b, [](float x, float y) { return x * y; }); }
inline Vec operator/(Vec a, Vec b) { return lanewise(a, b, [](float x, float y) { return x / y; }); }
inline Vec operator-(Vec a) { return lanewise(a, a, [](float x, float) { return -x; }); }
inline Vec fma(Vec a, Vec b, Vec c) {
  Vec r;
  for (int64_t i = 0; i < Vec::kWidth; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
inline void keep_in_register(Vec&) {}
inline float sum(Vec x) {
  float s = 0.0f;
  for (float e : x.v) s += e;
  return s;
}
inline void store_sums(float* out, Vec a, Vec b, Vec c, Vec d) {
  out[0] = sum(a);
  out[1] = sum(b);
  out[2] = sum(c);
  out[3] = sum(d);
}

#endif

#if !(defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_NEON))
inline Vec power_of_two(Vec n) {
  Vec r;
  for (int64_t i = 0; i < Vec::kWidth; ++i) {
    // NaN has no integer: its lane's factor is left at 1, and the NaN it scales stays NaN.
    const uint32_t exponent = n.v[i] == n.v[i] ? static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) : 127u;
    const uint32_t bits = exponent << 23;
    std::memcpy(&r.v[i], &bits, sizeof(bits));
  }
  return r;
}
inline Vec reciprocal_estimate(Vec x) { return Vec(1.0f) / x; }
inline Vec clamp(Vec x, float lo, float hi) {
  Vec r;
  for (int64_t i = 0; i < Vec::kWidth; ++i) r.v[i] = x.v[i] < lo ? lo : (x.v[i] > hi ? hi : x.v[i]);  // NaN kept
  return r;
}
#endif

// exp and tanh, written once over Vec for every path and inlined into the loops that call them.
// They replace calls into Sleef (ATen's vector math): its 3.5-ulp tanh cost 5 times its exp and
// took a tenth of lf.LSTM's forward at B = 64, H = 128 (AMD EPYC Zen 5, one thread). Both reduce
// x = n ln 2 + r with |r| <= ln 2 / 2 and take e^r - 1 from its Taylor series to r^7 (relative
// error under 2e-8 there), so neither loses digits near 0: tanh(x) = u / (2 + u) with
// u = e^(2x) - 1 keeps tanh's relative accuracy at tiny x, where 1 - 2 / (e^(2x) + 1) would not.
// NaN stays NaN; e^x overflows to inf and underflows to 0 as float does; tanh(+-inf) is +-1.
struct ReducedExponent {
  Vec n;            // an integer
  Vec expm1_of_r;   // e^r - 1
};
// a * b + c rounded to the nearest integer, for |a * b + c| < 2^22: adding 1.5 * 2^23 leaves no
// fraction bits.
inline Vec round_fma(Vec a, Vec b, Vec c) {
  constexpr float kRoundingShift = 12582912.0f;
  return fma(a, b, c + Vec(kRoundingShift)) - Vec(kRoundingShift);
}
constexpr float inverse_factorial(int k) {
  float factorial = 1.0f;
  for (int i = 2; i <= k; ++i) factorial *= static_cast<float>(i);
  return 1.0f / factorial;
}
// e^r - 1 to r^kDegree: 7 for float32 (above); 5 for the 16-bit dtypes' sigmoid (below).
template <int kDegree = 7>
inline ReducedExponent reduce_exponent(Vec x) {
  // ln 2 in two parts, the first short enough that n times it is exact.
  const Vec n = round_fma(x, Vec(1.44269504088896341f), Vec(0.0f));
  const Vec r = fma(n, Vec(2.12194440e-4f), fma(n, Vec(-0.693359375f), x));
  // (e^r - 1 - r) / r^2 = 1/2! + r/3! + ... + r^(kDegree - 2)/kDegree!, by Horner.
  Vec p(inverse_factorial(kDegree));
  for (int k = kDegree - 1; k >= 2; --k) {
    p = fma(p, r, Vec(inverse_factorial(k)));
  }
  return {n, fma(p * r, r, r)};
}
inline Vec exp_(Vec x) {
  // Past [-104, 89] e^x is 0 or inf in float; within, n lies in [-150, 128] and 2^n is applied
  // as two normal factors, so the products round to denormals and overflow as e^x would.
  const ReducedExponent e = reduce_exponent(clamp(x, -104.0f, 89.0f));
  const Vec half = round_fma(e.n, Vec(0.5f), Vec(0.0f));
  return (e.expm1_of_r + Vec(1.0f)) * power_of_two(half) * power_of_two(e.n - half);
}
inline Vec tanh_(Vec x) {
  // tanh(+-10) is +-1 in float; n then lies in [-29, 29].
  const ReducedExponent e = reduce_exponent(clamp(x, -10.0f, 10.0f) * Vec(2.0f));
  const Vec scale = power_of_two(e.n);
  const Vec u = fma(scale, e.expm1_of_r, scale - Vec(1.0f));  // e^(2x) - 1
  return u / (Vec(2.0f) + u);
}

#if defined(LSTM_FUSED_SCALAR_TAILS) || !(defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512))
// A partial vector through a zeroed buffer: the element-wise copies touch exactly the lanes asked.
struct Mask {
  int64_t count;
  explicit Mask(Tail tail) : count(std::clamp<int64_t>(tail.count, 0, Vec::kWidth)) {}
};
inline Vec load(const float* p, const Mask& m) {
  float lanes[Vec::kWidth] = {};
  for (int64_t i = 0; i < m.count; ++i) lanes[i] = p[i];
  return Vec::load(lanes);
}
inline void store(float* p, Vec x, const Mask& m) {
  float lanes[Vec::kWidth];
  x.store(lanes);
  for (int64_t i = 0; i < m.count; ++i) p[i] = lanes[i];
}
#endif

// bfloat16 and float16 to and from float vectors, rounding to nearest even as c10::BFloat16 and
// c10::Half do (bfloat16 NaN becomes 0x7FC0, as there). The portable path has none: its reduced
// dtypes stay with the scalar loop of lstm_cell.cpp.
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kConvertsReducedFloats = true;
inline Vec load_widened(const BFloat16Bits* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline void store_narrowed(BFloat16Bits* p, Vec x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  const __m256i rounded = _mm256_blendv_epi8(_mm256_srli_epi32(_mm256_add_epi32(bits, bias), 16), _mm256_set1_epi32(0x7FC0), nan);
  // packus narrows within each 128-bit half; the permute puts the two halves' results together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline Vec load_widened(const HalfBits* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store_narrowed(HalfBits* p, Vec x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}
#elif defined(CPU_CAPABILITY_AVX512)
constexpr bool kConvertsReducedFloats = true;
inline Vec load_widened(const BFloat16Bits* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline void store_narrowed(BFloat16Bits* p, Vec x) {
  const __m512i bits = _mm512_castps_si512(x.v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF));
  const __mmask16 nan = _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
  const __m512i rounded = _mm512_mask_mov_epi32(_mm512_srli_epi32(_mm512_add_epi32(bits, bias), 16), nan, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
inline Vec load_widened(const HalfBits* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store_narrowed(HalfBits* p, Vec x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}
#elif defined(CPU_CAPABILITY_NEON)
constexpr bool kConvertsReducedFloats = true;
inline Vec load_widened(const BFloat16Bits* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(&p->bits), 16));
}
inline void store_narrowed(BFloat16Bits* p, Vec x) {
  const uint32x4_t bits = vreinterpretq_u32_f32(x.v);
  const uint32x4_t bias = vaddq_u32(vandq_u32(vshrq_n_u32(bits, 16), vdupq_n_u32(1)), vdupq_n_u32(0x7FFF));
  const uint32x4_t rounded = vshrq_n_u32(vaddq_u32(bits, bias), 16);
  const uint32x4_t is_number = vceqq_f32(x.v, x.v);
  vst1_u16(&p->bits, vmovn_u32(vbslq_u32(is_number, rounded, vdupq_n_u32(0x7FC0))));
}
inline Vec load_widened(const HalfBits* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(&p->bits))); }
inline void store_narrowed(HalfBits* p, Vec x) { vst1_u16(&p->bits, vreinterpret_u16_f16(vcvt_f16_f32(x.v))); }
#else
constexpr bool kConvertsReducedFloats = false;
#endif
inline Vec load_widened(const float* p) { return Vec::load(p); }
inline void store_narrowed(float* p, Vec x) { x.store(p); }

// A 16-bit weight's panels (pair_products.h) hold the reduction index in pairs: a block of
// 2 * Vec::kWidth values per pair, lanes' even and odd indices. bfloat16 interleaves them (lane l
// at 2l, 2l + 1: the layout AVX512-BF16's vdpbf16ps reads, and one shift and one mask widen it);
// float16 keeps the even indices' vector before the odd ones' (F16C and NEON widen whole vectors).
inline int64_t pair_slot(const BFloat16Bits*, int64_t lane, int64_t parity) { return 2 * lane + parity; }
inline int64_t pair_slot(const HalfBits*, int64_t lane, int64_t parity) { return parity * Vec::kWidth + lane; }

// One block of pairs widened to float: even, odd = the lanes' weights at indices 2p and 2p + 1.
#if defined(CPU_CAPABILITY_AVX2)
inline void widen_pairs(const BFloat16Bits* p, Vec& even, Vec& odd) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(CPU_CAPABILITY_AVX512)
inline void widen_pairs(const BFloat16Bits* p, Vec& even, Vec& odd) {
  const __m512i bits = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(CPU_CAPABILITY_NEON)
inline void widen_pairs(const BFloat16Bits* p, Vec& even, Vec& odd) {
  const uint32x4_t bits = vreinterpretq_u32_u16(vld1q_u16(&p->bits));
  even = vreinterpretq_f32_u32(vshlq_n_u32(bits, 16));
  odd = vreinterpretq_f32_u32(vandq_u32(bits, vdupq_n_u32(0xFFFF0000u)));
}
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_NEON)
inline void widen_pairs(const HalfBits* p, Vec& even, Vec& odd) {
  even = load_widened(p);
  odd = load_widened(p + Vec::kWidth);
}
#endif

// A square block of 32-bit words transposed: to[j * kWidth + lane] = word j of row `lane`, for
// kWidth rows `row_bytes` apart (the weight panels' packing: a float, or a bfloat16 pair, per
// word). Whole vectors in registers, where a word at a time took a tenth of a short lf.LSTM call.
// Bits are moved, never computed on, so any word (a NaN's payload too) arrives as it was.
#if defined(CPU_CAPABILITY_AVX2)
inline void transpose_words(const std::byte* rows, int64_t row_bytes, std::byte* to) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(rows + i * row_bytes));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // per 128 bits: a0 b0 a1 b1
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 8; i += 4) {  // rows i..i+3, word j (low 128 bits) and j + 4 (high)
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  float* out = reinterpret_cast<float*>(to);
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(out + j * 8, _mm256_permute2f128_ps(r[j], r[j + 4], 0x20));
    _mm256_storeu_ps(out + (j + 4) * 8, _mm256_permute2f128_ps(r[j], r[j + 4], 0x31));
  }
}
#elif defined(CPU_CAPABILITY_AVX512)
inline void transpose_words(const std::byte* rows, int64_t row_bytes, std::byte* to) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows + i * row_bytes);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);  // per 128 bits: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);  // a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // rows i..i+3: words j, j + 4, j + 8, j + 12 in the four 128 bits
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  float* out = reinterpret_cast<float*>(to);
  for (int j = 0; j < 4; ++j) {
    // 128-bit blocks 0 and 2 (0x88), 1 and 3 (0xDD) of rows 0-7, then of rows 8-15.
    const __m512 low_even = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
    const __m512 low_odd = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xDD);
    const __m512 high_even = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
    const __m512 high_odd = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xDD);
    _mm512_storeu_ps(out + j * 16, _mm512_shuffle_f32x4(low_even, high_even, 0x88));
    _mm512_storeu_ps(out + (j + 8) * 16, _mm512_shuffle_f32x4(low_even, high_even, 0xDD));
    _mm512_storeu_ps(out + (j + 4) * 16, _mm512_shuffle_f32x4(low_odd, high_odd, 0x88));
    _mm512_storeu_ps(out + (j + 12) * 16, _mm512_shuffle_f32x4(low_odd, high_odd, 0xDD));
  }
}
#elif defined(CPU_CAPABILITY_NEON)
inline void transpose_words(const std::byte* rows, int64_t row_bytes, std::byte* to) {
  const auto row = [&](int i) { return vld1q_u32(reinterpret_cast<const uint32_t*>(rows + i * row_bytes)); };
  const uint32x4x2_t ab = vtrnq_u32(row(0), row(1));  // a0 b0 a2 b2, a1 b1 a3 b3
  const uint32x4x2_t cd = vtrnq_u32(row(2), row(3));
  uint32_t* out = reinterpret_cast<uint32_t*>(to);
  vst1q_u32(out, vcombine_u32(vget_low_u32(ab.val[0]), vget_low_u32(cd.val[0])));
  vst1q_u32(out + 4, vcombine_u32(vget_low_u32(ab.val[1]), vget_low_u32(cd.val[1])));
  vst1q_u32(out + 8, vcombine_u32(vget_high_u32(ab.val[0]), vget_high_u32(cd.val[0])));
  vst1q_u32(out + 12, vcombine_u32(vget_high_u32(ab.val[1]), vget_high_u32(cd.val[1])));
}
#else
inline void transpose_words(const std::byte* rows, int64_t row_bytes, std::byte* to) {
  for (int64_t lane = 0; lane < Vec::kWidth; ++lane) {
    for (int64_t j = 0; j < Vec::kWidth; ++j) {
      std::memcpy(to + (j * Vec::kWidth + lane) * 4, rows + lane * row_bytes + j * 4, 4);
    }
  }
}
#endif

// The arithmetic of values stored in bfloat16 or float16: Vec's, with the activations only as
// exact as those dtypes keep (8 and 11 bits): a rational function within 4e-7 of tanh, and
// reciprocals by estimate and one Newton step (24 bits) instead of divisions (with Sleef's tanh
// and the divisions, the cell math took about as long as the step's bfloat16 products at B = 64,
// H = 128 on an AMD EPYC Zen 4). float32 storage keeps Vec's functions, within 2.5 ulps: there the
// backward reads 1 - tanh^2 and sigma (1 - sigma) near saturation, where one ulp of the activation
// is a large share of the derivative, and must agree with nn's.
struct ReducedVec {
  Vec v;
  ReducedVec() = default;
  ReducedVec(Vec x) : v(x) {}
  ReducedVec(float broadcast) : v(broadcast) {}
  explicit operator Vec() const { return v; }
};
inline ReducedVec operator+(ReducedVec a, ReducedVec b) { return a.v + b.v; }
inline ReducedVec operator-(ReducedVec a, ReducedVec b) { return a.v - b.v; }
inline ReducedVec operator*(ReducedVec a, ReducedVec b) { return a.v * b.v; }
inline ReducedVec operator-(ReducedVec a) { return -a.v; }
inline ReducedVec fma(ReducedVec a, ReducedVec b, ReducedVec c) { return fma(a.v, b.v, c.v); }
inline Vec reciprocal(Vec x) {
  const Vec estimate = reciprocal_estimate(x);
  return estimate * fma(-x, estimate, Vec(2.0f));
}
inline ReducedVec operator/(ReducedVec a, ReducedVec b) { return a.v * reciprocal(b.v); }
inline ReducedVec exp_(ReducedVec x) { return exp_(x.v); }
// tanh as an odd degree-13 over even degree-6 rational function of x clamped to [-9, 9] (the fit
// Eigen and ONNX Runtime's MLAS use; 3.3 float32 ulps at most).
inline ReducedVec tanh_(ReducedVec x) {
  const Vec clamped = clamp(x.v, -9.0f, 9.0f);
  const Vec square = clamped * clamped;
  Vec numerator = fma(square, Vec(-2.76076847742355e-16f), Vec(2.00018790482477e-13f));
  numerator = fma(square, numerator, Vec(-8.60467152213735e-11f));
  numerator = fma(square, numerator, Vec(5.12229709037114e-08f));
  numerator = fma(square, numerator, Vec(1.48572235717979e-05f));
  numerator = fma(square, numerator, Vec(6.37261928875436e-04f));
  numerator = fma(square, numerator, Vec(4.89352455891786e-03f));
  Vec denominator = fma(square, Vec(1.19825839466702e-06f), Vec(1.18534705686654e-04f));
  denominator = fma(square, denominator, Vec(2.26843463243900e-03f));
  denominator = fma(square, denominator, Vec(4.89352518554385e-03f));
  return clamped * numerator * reciprocal(denominator);
}
// sigma(x) = 1 / (1 + e^-x), e^-x through a degree-5 polynomial (2e-6 relative) and one scale 2^n,
// -x clamped to [-87, 88] where e^-x is a normal float (sigma is then 1, or under 1e-38 where 0
// is exact), where math::sigmoid over Vec's exp_ (degree 7, two scales for float32's denormals)
// and a division made the pointwise pass 36% of lf.LSTM's bfloat16 forward at B = 64, H = 128
// (Intel Xeon, AMX products, 1 thread): 27% with this, and the call 4% faster.
inline ReducedVec sigmoid(ReducedVec x) {
  const ReducedExponent e = reduce_exponent<5>(clamp(-x.v, -87.0f, 88.0f));
  return reciprocal(Vec(1.0f) + (e.expm1_of_r + Vec(1.0f)) * power_of_two(e.n));
}

// The lanes policy cell_units.h's loops run with: Vec::kWidth units at a time, stored as Storage
// (float, BFloat16Bits or HalfBits) and computed in float (ReducedVec's activations for the 16-bit
// dtypes).
template <typename Storage>
struct VecLanesOf {
  using storage = Storage;
  using value = std::conditional_t<std::is_same_v<Storage, float>, Vec, ReducedVec>;
  static constexpr int64_t width = Vec::kWidth;
  static value load(const storage* p) { return load_widened(p); }
  static void store(storage* p, value v) { store_narrowed(p, Vec(v)); }
};
using VecLanes = VecLanesOf<float>;

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
