// The CUDA ops of the regularised LSTM step (issue 16): regularised_pointwise_ and
// regularised_gate_grads_, whose schemas, and the sequence loop that calls them once a step, are
// csrc/regularised.cpp's. Argument checks of the outputs, device guard, the dtype dispatch; the
// kernels and their launches are regularised_kernels.cuh's, which the tests also run under the
// CUDA emulation (tests/test_emulated_cuda_regularised.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "regularised_kernels.cuh"

namespace lstm_fused {
namespace {

void check_contiguous_outputs(std::initializer_list<const at::Tensor*> outputs, const char* op) {
  for (const at::Tensor* t : outputs) {
    TORCH_CHECK(t->is_contiguous(), "lstm_fused::", op, ": outputs must be contiguous");
  }
}

void regularised_pointwise_cuda(
    at::Tensor& input_part, at::Tensor& hidden_part, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    at::Tensor& gates, at::Tensor& hy, at::Tensor& cy, at::Tensor& normalized_cell, at::Tensor& layer_norm_rstd) {
  check_contiguous_outputs(
      {&input_part, &hidden_part, &gates, &hy, &cy, &normalized_cell, &layer_norm_rstd}, "regularised_pointwise_");
  const c10::cuda::CUDAGuard device_guard(gates.device());
  const int64_t batch = gates.size(0), hidden_size = hy.size(1);
  if (batch == 0 || hidden_size == 0) {
    return;
  }
  const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous();
  const at::Tensor bias_c = contiguous_or_undefined(bias), ln_ih = contiguous_or_undefined(layer_norm_ih);
  const at::Tensor ln_hh = contiguous_or_undefined(layer_norm_hh);
  const at::Tensor ln_cell_weight = contiguous_or_undefined(layer_norm_cell_weight);
  const at::Tensor ln_cell_bias = contiguous_or_undefined(layer_norm_cell_bias);
  const at::Tensor zc = contiguous_or_undefined(zoneout_cell_mask), zh = contiguous_or_undefined(zoneout_hidden_mask);
  const bool layer_norm = ln_ih.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "regularised_pointwise_cuda", [&] {
    const cuda::RegularisedForwardPointers<scalar_t> p{
        input_part.mutable_data_ptr<scalar_t>(), hidden_part.mutable_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(bias_c), data_or_null<scalar_t>(ln_ih), data_or_null<scalar_t>(ln_hh),
        data_or_null<scalar_t>(ln_cell_weight), data_or_null<scalar_t>(ln_cell_bias), hx_c.const_data_ptr<scalar_t>(),
        cx_c.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(zc), data_or_null<scalar_t>(zh),
        gates.mutable_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
        layer_norm ? normalized_cell.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? layer_norm_rstd.mutable_data_ptr<scalar_t>() : nullptr};
    cuda::launch_regularised_pointwise<scalar_t>(
        p, batch, hidden_size, zoneout_cell, zoneout_hidden, at::cuda::getCurrentCUDAStream());
  });
}

void regularised_gate_grads_cuda(
    at::Tensor& grad_hy, at::Tensor& grad_cy, const std::optional<at::Tensor>& grad_gates, const at::Tensor& gates,
    const at::Tensor& cx, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, at::Tensor& grad_preactivation, at::Tensor& grad_input_part,
    at::Tensor& grad_hidden_part, at::Tensor& grad_normalized_cell) {
  check_contiguous_outputs(
      {&grad_hy, &grad_cy, &grad_preactivation, &grad_input_part, &grad_hidden_part, &grad_normalized_cell},
      "regularised_gate_grads_");
  const c10::cuda::CUDAGuard device_guard(gates.device());
  const int64_t batch = gates.size(0), hidden_size = cx.size(1);
  if (batch == 0 || hidden_size == 0) {
    return;
  }
  const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates), gates_c = gates.contiguous();
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor ln_ih = contiguous_or_undefined(layer_norm_ih), ln_hh = contiguous_or_undefined(layer_norm_hh);
  const at::Tensor ln_cell_weight = contiguous_or_undefined(layer_norm_cell_weight);
  const at::Tensor ln_cell_bias = contiguous_or_undefined(layer_norm_cell_bias);
  const bool layer_norm = ln_ih.defined();
  const auto saved = [&](const at::Tensor& t) { return layer_norm ? t.contiguous() : at::Tensor(); };
  const at::Tensor input_part_c = saved(input_part), hidden_part_c = saved(hidden_part);
  const at::Tensor normalized_cell_c = saved(normalized_cell), rstd_c = saved(layer_norm_rstd);
  const at::Tensor zc = contiguous_or_undefined(zoneout_cell_mask), zh = contiguous_or_undefined(zoneout_hidden_mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "regularised_gate_grads_cuda", [&] {
    const cuda::RegularisedBackwardPointers<scalar_t> p{
        grad_hy.mutable_data_ptr<scalar_t>(), grad_cy.mutable_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(grad_gates_c), gates_c.const_data_ptr<scalar_t>(), cx_c.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(ln_ih), data_or_null<scalar_t>(ln_hh), data_or_null<scalar_t>(ln_cell_weight),
        data_or_null<scalar_t>(ln_cell_bias), data_or_null<scalar_t>(input_part_c),
        data_or_null<scalar_t>(hidden_part_c), data_or_null<scalar_t>(normalized_cell_c),
        data_or_null<scalar_t>(rstd_c), data_or_null<scalar_t>(zc), data_or_null<scalar_t>(zh),
        grad_preactivation.mutable_data_ptr<scalar_t>(),
        layer_norm ? grad_input_part.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? grad_hidden_part.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? grad_normalized_cell.mutable_data_ptr<scalar_t>() : nullptr};
    cuda::launch_regularised_gate_grads<scalar_t>(
        p, batch, hidden_size, zoneout_cell, zoneout_hidden, at::cuda::getCurrentCUDAStream());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("regularised_pointwise_", &regularised_pointwise_cuda);
  m.impl("regularised_gate_grads_", &regularised_gate_grads_cuda);
}

}  // namespace lstm_fused
