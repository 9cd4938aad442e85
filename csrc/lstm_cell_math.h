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
// some device paths (extension-cpp's LLTM lost float64 gradcheck that way). The CPU's vectorised
// paths instantiate the templates below with a vector type whose exp_/tanh_ are found by
// argument-dependent lookup (csrc/cpu/kernels/vec.h).
LSTM_FUSED_HOST_DEVICE float exp_(float x) { return expf(x); }
LSTM_FUSED_HOST_DEVICE double exp_(double x) { return exp(x); }
LSTM_FUSED_HOST_DEVICE float tanh_(float x) { return tanhf(x); }
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
