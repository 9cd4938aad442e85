// The library products around the persistent sequence kernels (cell_kernels.cuh), in ATen, so that
// lstm_cell.cu and the tests' emulated build run the same host side: the input projection of all
// steps before the forward's launch, and after the backward's launch the products that need no
// recurrence. Device-independent: it runs on whatever device holds the tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace lstm_fused {
namespace cuda {

// [T, B, I] -> [T, B, 4H]: x W_ih^T + bias_ih + bias_hh, contiguous. Both biases ride on the one
// GEMM, so the kernel adds a single term per gate.
inline at::Tensor project_inputs(
    const at::Tensor& input,
    const at::Tensor& weight_ih,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const at::Tensor rows = input.reshape({steps * batch, input.size(2)});
  at::Tensor projected;
  if (bias_ih.has_value() || bias_hh.has_value()) {
    const at::Tensor bias =
        bias_ih.has_value() && bias_hh.has_value() ? *bias_ih + *bias_hh : (bias_ih.has_value() ? *bias_ih : *bias_hh);
    projected = at::addmm(bias, rows, weight_ih.t());
  } else {
    projected = at::mm(rows, weight_ih.t());
  }
  return projected.view({steps, batch, -1}).contiguous();
}

struct SequenceGrads {
  at::Tensor input;
  at::Tensor hx;
  at::Tensor weight_ih;
  at::Tensor weight_hh;
  at::Tensor bias;  // of bias_ih and of bias_hh alike
};

// From dG [T, B, 4H], the gate pre-activation gradients of every step.
inline SequenceGrads sequence_products(
    const at::Tensor& grad_preactivation,
    const at::Tensor& input,   // [T, B, I]
    const at::Tensor& hx,      // [B, H]
    const at::Tensor& output,  // [T, B, H]
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    bool reverse) {
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const at::Tensor grads = grad_preactivation.reshape({steps * batch, -1});
  // The state each step multiplied by W_hh: the forward's previous step's h, hx for its first.
  const at::Tensor previous = reverse ? at::cat({output.narrow(0, 1, steps - 1), hx.unsqueeze(0)})
                                      : at::cat({hx.unsqueeze(0), output.narrow(0, 0, steps - 1)});
  const int64_t first = reverse ? steps - 1 : 0;
  SequenceGrads out;
  out.input = at::mm(grads, weight_ih).view({steps, batch, -1});
  out.hx = at::mm(grad_preactivation[first], weight_hh);
  out.weight_ih = at::mm(grads.t(), input.reshape({steps * batch, -1}));
  out.weight_hh = at::mm(grads.t(), previous.reshape({steps * batch, -1}));
  out.bias = grads.sum(0);
  return out;
}

}  // namespace cuda
}  // namespace lstm_fused
