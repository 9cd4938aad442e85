// The sequence ops' device-independent loop (sequence.cpp), for a device's own kernels of those
// ops to fall back to on the shapes they do not take (csrc/cuda/sequence.cu). Device code may call
// this; this never calls device code.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace lstm_fused {

// output, hy, cy, cell_states, gates: sequence_forward's outputs.
using SequenceForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// output, hy, cy: sequence_inference's (sequence_forward's without what only backward reads).
using SequenceInferenceOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr:
// sequence_backward's.
using SequenceBackwardOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The ops' CompositeExplicitAutograd kernels, with the ops' arguments (ops.cpp's schemas).
SequenceForwardOutputs sequence_forward_loop(
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    const std::optional<at::Tensor>& weight_hr);

SequenceBackwardOutputs sequence_backward_loop(
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_cell_states,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const at::Tensor& output,
    const at::Tensor& cell_states,
    const at::Tensor& gates,
    bool reverse,
    std::array<bool, 6> output_mask,
    const std::optional<at::Tensor>& weight_hr);

}  // namespace lstm_fused
