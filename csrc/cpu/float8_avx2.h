// Eight floats that the cell-math templates of cell_units.h treat like a scalar, and the lane
// policies the AVX2 files run those templates with. Include only from a file compiled for AVX2+FMA
// (its #pragma GCC target before any include) that includes no ATen or c10 header; see
// cell_units_avx2.cpp. Everything here has internal linkage, so a function compiled with AVX2
// never stands in for another file's copy of it.
#pragma once

#include <immintrin.h>

#include "cell_units.h"

extern "C" {
__m256 Sleef_expf8_u10avx2(__m256);
__m256 Sleef_tanhf8_u35avx2(__m256);
}

namespace lstm_fused {
namespace cpu {
namespace {

// Arithmetic operators, and the exp_/tanh_ the cell math calls, found by argument-dependent
// lookup. (Free functions rather than in-class friends: GCC does not apply the target pragma to
// friends defined inside a class.)
struct Float8 {
  __m256 v;
  Float8() = default;
  Float8(__m256 lanes) : v(lanes) {}
  Float8(float broadcast) : v(_mm256_set1_ps(broadcast)) {}
};
inline Float8 operator+(Float8 a, Float8 b) { return _mm256_add_ps(a.v, b.v); }
inline Float8 operator-(Float8 a, Float8 b) { return _mm256_sub_ps(a.v, b.v); }
inline Float8 operator*(Float8 a, Float8 b) { return _mm256_mul_ps(a.v, b.v); }
inline Float8 operator/(Float8 a, Float8 b) { return _mm256_div_ps(a.v, b.v); }
inline Float8 operator-(Float8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline Float8 exp_(Float8 x) { return Sleef_expf8_u10avx2(x.v); }
// Sleef's 3.5-ulp tanh: half the time of its 1-ulp one (about 11 against 22 ns a vector here),
// which took as long as the recurrent product itself at hidden 128; exp keeps the 1-ulp variant
// (6 ns). Both are far inside float32's tolerance against nn.LSTMCell (1e-5 relative).
inline Float8 tanh_(Float8 x) { return Sleef_tanhf8_u35avx2(x.v); }

struct Float8Lanes {
  using storage = float;
  using value = Float8;
  static constexpr int64_t width = 8;
  static value load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, value v) { _mm256_storeu_ps(p, v.v); }
};

}  // namespace
}  // namespace cpu
}  // namespace lstm_fused
