// The regularised LSTM step's per-unit math (layer normalisation, zoneout; issue 16): one
// definition, shared by the CPU kernels (csrc/cpu/regularised_cell.cpp) and the CUDA kernels
// (csrc/cuda/regularised_kernels.cuh), as lstm_cell_math.h is for the plain cell. The row
// reductions of layer norm are the callers' (a loop on the CPU, a block reduction on the GPU);
// what they feed and what follows them is here. Scalar, templated on the compute type (float for
// float/half/bfloat16 storage, double for double).
#pragma once

#include "lstm_cell_math.h"

namespace lstm_fused {
namespace math {

// Layer norm's epsilon, inside the square root with the biased variance (torch's LayerNorm).
constexpr double kLayerNormEpsilon = 1e-5;

// Explicit overloads, for lstm_cell_math.h's reason (a generic call may run in float).
LSTM_FUSED_HOST_DEVICE float sqrt_(float x) { return sqrtf(x); }
LSTM_FUSED_HOST_DEVICE double sqrt_(double x) { return sqrt(x); }

// 1 / sqrt(variance + eps) from the sum of squared deviations over n values.
template <typename T>
LSTM_FUSED_HOST_DEVICE T layer_norm_rstd(T sum_squared_deviations, T n) {
  return T(1) / sqrt_(sum_squared_deviations / n + T(kLayerNormEpsilon));
}

// The gradient of LN(x; gamma) with respect to x for one element: rstd * (dy - mean(dy) -
// x_hat * mean(dy * x_hat)), dy = grad * gamma; the two means are over the row.
template <typename T>
LSTM_FUSED_HOST_DEVICE T layer_norm_input_grad(T rstd, T dy, T mean_dy, T x_hat, T mean_dy_x_hat) {
  return rstd * (dy - mean_dy - x_hat * mean_dy_x_hat);
}

// The kept share of zoneout: d * previous + (1 - d) * fresh, d the mask element (training) or the
// probability (evaluation).
template <typename T>
LSTM_FUSED_HOST_DEVICE T zoneout(T d, T previous, T fresh) {
  return d * previous + (T(1) - d) * fresh;
}

// A unit's activated gates and c-tilde = f c_{t-1} + i g, the new cell state before zoneout.
template <typename T>
struct RegularisedActivation {
  Gates<T> gates;
  T cell_tilde;
};

// c-tilde from activated gates (backward recomputes it without layer norm, which keeps no copy).
template <typename T>
LSTM_FUSED_HOST_DEVICE T cell_tilde(Gates<T> activated, T cell_prev) {
  return activated.forget * cell_prev + activated.input * activated.cell;
}

template <typename T>
LSTM_FUSED_HOST_DEVICE RegularisedActivation<T> regularised_activation(Gates<T> preactivation, T cell_prev) {
  RegularisedActivation<T> out;
  out.gates.input = sigmoid(preactivation.input);
  out.gates.forget = sigmoid(preactivation.forget);
  out.gates.cell = tanh_(preactivation.cell);
  out.gates.output = sigmoid(preactivation.output);
  out.cell_tilde = cell_tilde(out.gates, cell_prev);
  return out;
}

// Backward, first half of a unit: through h_t = d_h h_{t-1} + (1 - d_h) o tanh(n) (n = LN(c~) or
// c~), from grad_h (the gradient of h_t) and grad_gate_output (the activated o's own, 0 without).
template <typename T>
struct RegularisedHiddenBackward {
  T grad_hidden_prev;       // d_h * grad_h: h_{t-1}'s share through zoneout
  T grad_output_preact;     // the o gate's pre-activation gradient
  T grad_normalized;        // the gradient of n, before LN(c~)'s backward
};

template <typename T>
LSTM_FUSED_HOST_DEVICE RegularisedHiddenBackward<T> regularised_hidden_backward(
    T output_gate, T tanh_normalized, T d_h, T grad_h, T grad_gate_output) {
  const T grad_h_new = (T(1) - d_h) * grad_h;
  const T grad_o = grad_h_new * tanh_normalized + grad_gate_output;
  RegularisedHiddenBackward<T> out;
  out.grad_hidden_prev = d_h * grad_h;
  out.grad_output_preact = grad_o * output_gate * (T(1) - output_gate);
  out.grad_normalized = grad_h_new * output_gate * (T(1) - tanh_normalized * tanh_normalized);
  return out;
}

// Backward, second half: grad_cell_tilde_from_h is c~'s gradient through h (after LN(c~)'s
// backward with layer norm), grad_c the gradient of c_t = d_c c_{t-1} + (1 - d_c) c~.
template <typename T>
struct RegularisedCellBackward {
  T grad_cell_prev;
  T grad_input_preact;
  T grad_forget_preact;
  T grad_cell_preact;
};

template <typename T>
LSTM_FUSED_HOST_DEVICE RegularisedCellBackward<T> regularised_cell_backward(
    Gates<T> gates, T cell_prev, T d_c, T grad_cell_tilde_from_h, T grad_c, T grad_gate_input, T grad_gate_forget,
    T grad_gate_cell) {
  const T grad_cell_tilde = grad_cell_tilde_from_h + (T(1) - d_c) * grad_c;
  const T grad_i = grad_cell_tilde * gates.cell + grad_gate_input;
  const T grad_f = grad_cell_tilde * cell_prev + grad_gate_forget;
  const T grad_g = grad_cell_tilde * gates.input + grad_gate_cell;
  RegularisedCellBackward<T> out;
  out.grad_cell_prev = d_c * grad_c + gates.forget * grad_cell_tilde;
  out.grad_input_preact = grad_i * gates.input * (T(1) - gates.input);
  out.grad_forget_preact = grad_f * gates.forget * (T(1) - gates.forget);
  out.grad_cell_preact = grad_g * (T(1) - gates.cell * gates.cell);
  return out;
}

}  // namespace math
}  // namespace lstm_fused
