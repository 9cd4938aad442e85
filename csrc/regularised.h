// The regularised LSTM layer (layer normalisation, zoneout, recurrent dropout; issue 16): what
// regularised.cpp (the ops and the fused loop) and autograd.cpp (its autograd and the
// differentiable composite) share.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace lstm_fused {

// The arguments of regularised_sequence_forward that are tensors, in schema order; an absent
// optional one is an undefined tensor.
enum RegularisedArg : size_t {
  kInput, kBatchSizes, kHx, kCx, kWeightIh, kWeightHh, kBiasIh, kBiasHh,
  kLayerNormIh, kLayerNormHh, kLayerNormCellWeight, kLayerNormCellBias,
  kRecurrentDropoutMask, kZoneoutCellMask, kZoneoutHiddenMask, kNumRegularisedArgs
};

// Shapes, dtypes and devices of regularised_sequence_forward's arguments, raising naming the
// argument; returns the batch sizes.
std::vector<int64_t> check_regularised_args(const std::vector<at::Tensor>& args);

// regularised_sequence_forward from differentiable ATen ops, outputs in the op's order (output,
// hy, cy, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd). For double
// backward, the torch.func transforms, forward-mode AD and every device or dtype without a fused
// kernel (the CPU's float16 and bfloat16; devices other than the CPU and CUDA). Defined in autograd.cpp.
std::vector<at::Tensor> regularised_sequence_composite(
    const std::vector<at::Tensor>& args, double zoneout_cell, double zoneout_hidden, bool reverse);

// Whether the fused loop runs these tensors: the CPU's kernels (float32, float64) or CUDA's
// (float32, float64, float16, bfloat16).
bool regularised_has_fused_kernel(const at::Tensor& input);

}  // namespace lstm_fused
