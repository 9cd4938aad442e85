// The step ops as compositions of ATen ops, for every device lstm_fused has no kernels for (MPS,
// XPU, a PrivateUse1 backend, ...): registered under CompositeExplicitAutograd, which a device's
// own kernel (CPU, CUDA; the fake one on meta) overrides. Not fused: one ATen op at a time, with
// nn.LSTMCell's results. The hand-written backward, cell_backward and the sequence ops (already
// composite over these) then run on such a device too.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace lstm_fused {
namespace {

// float for half and bfloat16, as the kernels compute: sigmoid in half underflows near -7.8.
at::Tensor in_compute_type(const at::Tensor& t) {
  return at::isReducedFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t;
}

// The activated gates and the new states from the pre-activations (bias already added).
std::tuple<at::Tensor, at::Tensor, at::Tensor> activate(const at::Tensor& preactivation, const at::Tensor& cx) {
  const auto chunks = in_compute_type(preactivation).chunk(4, 1);
  const at::Tensor input_gate = chunks[0].sigmoid();
  const at::Tensor forget_gate = chunks[1].sigmoid();
  const at::Tensor cell_gate = chunks[2].tanh();
  const at::Tensor output_gate = chunks[3].sigmoid();
  const at::Tensor cy = forget_gate * in_compute_type(cx) + input_gate * cell_gate;
  const at::Tensor hy = output_gate * cy.tanh();
  return {hy, cy, at::cat({input_gate, forget_gate, cell_gate, output_gate}, 1)};
}

void cell_pointwise_composite_(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy) {
  check_cell_pointwise_args(gates, cx, bias, hy, cy);
  const at::Tensor preactivation = bias.has_value() ? gates + *bias : gates;
  const auto [hidden, cell, activated] = activate(preactivation, cx);
  gates.copy_(activated);
  hy.copy_(hidden);
  cy.copy_(cell);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward_composite(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  at::Tensor preactivation = at::linear(input, weight_ih, bias_ih) + at::linear(hx, weight_hh, bias_hh);
  const auto [hy, cy, gates] = activate(preactivation, cx);
  return {hy.to(input.scalar_type()), cy.to(input.scalar_type()), gates.to(input.scalar_type())};
}

// lstm_cell_math.h's cell_backward, tensor-wide.
std::tuple<at::Tensor, at::Tensor> cell_gate_grads_composite(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  check_cell_gate_grads_args(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const auto chunks = in_compute_type(gates).chunk(4, 1);
  const at::Tensor &input_gate = chunks[0], &forget_gate = chunks[1], &cell_gate = chunks[2], &output_gate = chunks[3];
  const at::Tensor zero = at::zeros_like(chunks[0]);
  const auto given = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? in_compute_type(*t) : zero;
  };
  const at::Tensor grad_hidden = given(grad_hy);
  const std::vector<at::Tensor> grad_gate =
      grad_gates.has_value() && grad_gates->defined() ? in_compute_type(*grad_gates).chunk(4, 1)
                                                      : std::vector<at::Tensor>(4, zero);
  const at::Tensor tanh_cell = in_compute_type(cy).tanh();
  const at::Tensor grad_cell_total = given(grad_cy) + grad_hidden * output_gate * (1 - tanh_cell * tanh_cell);
  const at::Tensor grad_i = grad_cell_total * cell_gate + grad_gate[0];
  const at::Tensor grad_f = grad_cell_total * in_compute_type(cx) + grad_gate[1];
  const at::Tensor grad_g = grad_cell_total * input_gate + grad_gate[2];
  const at::Tensor grad_o = grad_hidden * tanh_cell + grad_gate[3];
  const at::Tensor grad_preactivation = at::cat(
      {grad_i * input_gate * (1 - input_gate), grad_f * forget_gate * (1 - forget_gate),
       grad_g * (1 - cell_gate * cell_gate), grad_o * output_gate * (1 - output_gate)},
      1);
  return {grad_preactivation.to(gates.scalar_type()), (grad_cell_total * forget_gate).to(gates.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("cell_forward", &cell_forward_composite);
  m.impl("cell_pointwise_", &cell_pointwise_composite_);
  m.impl("cell_gate_grads", &cell_gate_grads_composite);
}

}  // namespace lstm_fused
