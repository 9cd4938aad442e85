// The LSTM cell's pointwise math: one definition, shared by the CPU loops and the CUDA kernels.
//
// Everything here is scalar and templated on the compute type (float for float/half/bfloat16
// storage, double for double), so the float64 gradchecks on the CPU exercise exactly the
// formulas the GPU runs. No ATen, no device code beyond the qualifiers.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LSTM_FUSED_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LSTM_FUSED_HOST_DEVICE inline
#endif

namespace lstm_fused {
namespace math {

// Explicit float/double overloads: a generic std:: call would be silently evaluated in float on
// some device paths (extension-cpp's LLTM lost float64 gradcheck that way).
//
// float on the host does not call libm: glibc's expf/tanhf are scalar calls the compiler cannot
// vectorise, and cost ~20 ns a unit against the ~1 ns of a vectorised loop. The branch-free
// Cephes-style approximations below (within ~2 ulp of libm) let GCC vectorise the CPU kernels'
// loops. double keeps libm everywhere, so float64 gradchecks use exact functions; the GPU keeps
// CUDA's own expf/tanhf.
#if !defined(__CUDA_ARCH__)
namespace detail {

inline float bits_to_float(unsigned int bits) {
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float exp_cephes(float x) {
  // Clamped to the finite range; comparisons are false for NaN, so NaN passes through.
  x = x > 88.3762626647949f ? 88.3762626647949f : x;
  x = x < -87.3365447505531f ? -87.3365447505531f : x;
  // x = n ln2 + r with |r| <= ln2 / 2; ln2 split in two so n * ln2 stays exact.
  float n = static_cast<float>(static_cast<int>(x * 1.44269504088896341f + 0.5f));
  n = n > x * 1.44269504088896341f + 0.5f ? n - 1.0f : n;  // floor, without SSE4.1
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n assembled in the exponent bits; unsigned so a NaN's garbage n is not undefined behaviour.
  return p * bits_to_float((static_cast<unsigned int>(static_cast<int>(n)) + 127u) << 23);
}

inline float tanh_cephes(float x) {
  const float ax = x < 0.0f ? -x : x;
  // Small |x|: odd polynomial, free of the cancellation in 1 - 2 / (e^2x + 1).
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float big_magnitude = 1.0f - 2.0f / (exp_cephes(2.0f * ax) + 1.0f);
  const float big = x < 0.0f ? -big_magnitude : big_magnitude;
  return ax < 0.625f ? small : big;
}

}  // namespace detail
#endif

LSTM_FUSED_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return detail::exp_cephes(x);
#endif
}
LSTM_FUSED_HOST_DEVICE double exp_(double x) { return exp(x); }
LSTM_FUSED_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  return detail::tanh_cephes(x);
#endif
}
LSTM_FUSED_HOST_DEVICE double tanh_(double x) { return tanh(x); }

// 1 / (1 + e^-x): saturates to exactly 0 or 1 without overflow traps, and lets NaN through.
template <typename T>
LSTM_FUSED_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Activated gates of one hidden unit, in PyTorch's order i, f, g, o.
template <typename T>
struct Gates {
  T input;   // i = sigmoid
  T forget;  // f = sigmoid
  T cell;    // g = tanh (the candidate cell state)
  T output;  // o = sigmoid
};

template <typename T>
struct CellForward {
  Gates<T> gates;
  T cell_state;    // c1 = f * c0 + i * g
  T hidden_state;  // h1 = o * tanh(c1)
};

template <typename T>
LSTM_FUSED_HOST_DEVICE CellForward<T> cell_forward(Gates<T> preactivation, T cell_state_prev) {
  CellForward<T> out;
  out.gates.input = sigmoid(preactivation.input);
  out.gates.forget = sigmoid(preactivation.forget);
  out.gates.cell = tanh_(preactivation.cell);
  out.gates.output = sigmoid(preactivation.output);
  out.cell_state = out.gates.forget * cell_state_prev + out.gates.input * out.gates.cell;
  out.hidden_state = out.gates.output * tanh_(out.cell_state);
  return out;
}

template <typename T>
struct CellBackward {
  Gates<T> grad_preactivation;
  T grad_cell_state_prev;
};

// Gradients of one unit's step. Only the activated gates, c0 and c1 are needed: the derivatives
// of sigmoid and tanh are written in terms of their outputs, and tanh(c1) is recomputed rather
// than stored. grad_gates is the gradient flowing into the activated gates when a caller used
// them (gate introspection); it is zero otherwise.
template <typename T>
LSTM_FUSED_HOST_DEVICE CellBackward<T> cell_backward(
    Gates<T> gates,
    T cell_state_prev,
    T cell_state,
    T grad_hidden,
    T grad_cell,
    Gates<T> grad_gates) {
  const T tanh_cell = tanh_(cell_state);
  // The cell state receives gradient directly and through h1 = o * tanh(c1).
  const T grad_cell_total = grad_cell + grad_hidden * gates.output * (T(1) - tanh_cell * tanh_cell);
  const T grad_i = grad_cell_total * gates.cell + grad_gates.input;
  const T grad_f = grad_cell_total * cell_state_prev + grad_gates.forget;
  const T grad_g = grad_cell_total * gates.input + grad_gates.cell;
  const T grad_o = grad_hidden * tanh_cell + grad_gates.output;

  CellBackward<T> out;
  out.grad_preactivation.input = grad_i * gates.input * (T(1) - gates.input);
  out.grad_preactivation.forget = grad_f * gates.forget * (T(1) - gates.forget);
  out.grad_preactivation.cell = grad_g * (T(1) - gates.cell * gates.cell);
  out.grad_preactivation.output = grad_o * gates.output * (T(1) - gates.output);
  out.grad_cell_state_prev = grad_cell_total * gates.forget;
  return out;
}

}  // namespace math
}  // namespace lstm_fused
