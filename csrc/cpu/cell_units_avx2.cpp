// The float pointwise loops, 8 units at a time with AVX2 and Sleef's vector exp/tanh (exported by
// libtorch_cpu, the library ATen's own vectorised math uses; 1-ulp accurate). The AVX2 variants
// are called directly: Sleef's own dispatching entry point costs an indirect call per vector. Compiled for
// AVX2+FMA by the pragma; called only after have_avx2() said yes. This file includes no ATen or
// c10 header, so no shared inline function is ever compiled here with instructions another file
// could pick up on a CPU without them.
#pragma GCC target("avx2,fma")

#include <immintrin.h>

#include "cell_units.h"

extern "C" {
__m256 Sleef_expf8_u10avx2(__m256);
__m256 Sleef_tanhf8_u10avx2(__m256);
}

namespace lstm_fused {
namespace cpu {
namespace {

// Eight floats that the cell-math templates treat like a scalar: arithmetic operators, and the
// exp_/tanh_ they call found by argument-dependent lookup. (Free functions rather than in-class
// friends: GCC does not apply the target pragma to friends defined inside a class.)
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
inline Float8 tanh_(Float8 x) { return Sleef_tanhf8_u10avx2(x.v); }

struct Float8Lanes {
  using storage = float;
  using value = Float8;
  static constexpr int64_t width = 8;
  static value load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, value v) { _mm256_storeu_ps(p, v.v); }
};

}  // namespace

bool have_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

int64_t forward_units_avx2(
    bool has_bias,
    GateRows<float> gates,
    GateRows<const float> bias,
    const float* cell_prev,
    float* cell_next,
    float* hidden_next,
    int64_t first,
    int64_t end) {
  if (!have_avx2()) {
    return first;
  }
  return has_bias ? forward_units<Float8Lanes, true>(gates, bias, cell_prev, cell_next, hidden_next, first, end)
                  : forward_units<Float8Lanes, false>(gates, bias, cell_prev, cell_next, hidden_next, first, end);
}

int64_t backward_units_avx2(
    GateRows<const float> gates,
    GateRows<const float> grad_gates,
    const float* cell_prev,
    const float* cell_next,
    const float* grad_hidden,
    const float* grad_cell,
    GateRows<float> grad_preactivation,
    float* grad_cell_prev,
    int64_t first,
    int64_t end) {
  if (!have_avx2()) {
    return first;
  }
  const auto loop = backward_units_for<Float8Lanes>(grad_hidden != nullptr, grad_cell != nullptr, grad_gates.input != nullptr);
  return loop(gates, grad_gates, cell_prev, cell_next, grad_hidden, grad_cell, grad_preactivation, grad_cell_prev, first, end);
}

}  // namespace cpu
}  // namespace lstm_fused
