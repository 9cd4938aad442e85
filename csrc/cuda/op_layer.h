// The host side of the CUDA ops that the GPU build (lstm_cell.cu, sequence.cu) and the tests'
// emulated build (tests/emulated_cuda/emulated_ops.cpp) share: which path a call takes, and for the
// sequence ops the whole op (eligibility, the input projection, allocation, the launches, the
// fallback to the loop), so that the choice and the launches CI runs under the emulation are the
// GPU's. What differs between the two builds is a `Device` (below): how many blocks of a
// cooperative launch can be co-resident, the stream, the argument checks and the loop (the
// library's, which the emulated build reaches through the dispatcher), output allocation, and the
// backward's closing products.
//
// Include after cell_kernels.cuh's prerequisites (the emulation's builtins, or the CUDA runtime).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cell_kernels.cuh"

namespace lstm_fused {
namespace cuda {

inline ForwardDtype forward_dtype(at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    return ForwardDtype::kReduced;
  }
  return dtype == at::kDouble ? ForwardDtype::kDouble : ForwardDtype::kFloat;
}

// ------------------------------------------------------------------------------------------------
// The sequence ops on the persistent kernels
// ------------------------------------------------------------------------------------------------
//
// A Device provides:
//   using Guard = ...;  (constructed from a device: CUDAGuard on the GPU)
//   std::vector<int64_t> check_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh,
//                                           bias_ih, bias_hh) const;  (ops.h's checks; the sizes)
//   ForwardOutputs forward_loop(<sequence_forward's arguments>) const;
//   BackwardOutputs backward_loop(<sequence_backward's arguments>) const;
//     (the device-independent loop of csrc/sequence.cpp, for every call the persistent path refuses)
//   template <typename scalar_t> CooperativeLimits forward_limits(const SequencePlan& wanted) const;
//   template <typename scalar_t> CooperativeLimits backward_limits(const SequencePlan& wanted) const;
//     (for the kernel `wanted` would launch: the shared memory a block may have, and how many
//     blocks of it at wanted.shared_bytes can be alive together; 0 blocks where the device cannot
//     launch cooperatively)
//   cudaStream_t stream() const;
//   at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) const;
//   SequenceProducts products(const at::Tensor& grad_preactivation, const at::Tensor& input,
//                             const at::Tensor& hidden, const at::Tensor& weight_ih,
//                             const std::array<bool, 6>& output_mask) const;
//     (G W_ih, G^T input, G^T hidden, column sums of G, each where the mask asks, else empty)

struct CooperativeLimits {
  size_t max_shared_bytes;
  int64_t max_blocks;
};

struct SequenceProducts {
  at::Tensor input;
  at::Tensor weight_ih;
  at::Tensor weight_hh;
  at::Tensor bias;
};

// Which kernel a sequence call ran: the tests read it to know that the path they meant to cover ran.
enum class SequencePath : int64_t { kLoop = 0, kPersistent = 1, kPersistentTensorCores = 2 };

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The persistent kernels index a padded [T, B, ...] batch: every step holds every sequence.
// (Packed sequences of different lengths take the loop, whose steps shrink as sequences end.)
inline bool every_step_full(at::IntArrayRef batch_sizes, int64_t batch) {
  for (const int64_t rows : batch_sizes) {
    if (rows != batch) {
      return false;
    }
  }
  return true;
}

// [T * B, I] -> [T * B, 4H]: x W_ih^T + bias_ih + bias_hh, contiguous. Both biases ride on the one
// GEMM, so the kernel adds a single term per gate.
inline at::Tensor project_inputs(
    const at::Tensor& input,
    const at::Tensor& weight_ih,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  if (!bias_ih.has_value() && !bias_hh.has_value()) {
    return at::mm(input, weight_ih.t()).contiguous();
  }
  const at::Tensor bias =
      bias_ih.has_value() && bias_hh.has_value() ? *bias_ih + *bias_hh : (bias_ih.has_value() ? *bias_ih : *bias_hh);
  return at::addmm(bias, input, weight_ih.t()).contiguous();
}

// sequence_forward over a padded batch in one cooperative launch, or nullopt where the shape, dtype
// or device does not allow it (the caller then runs the loop). The outputs are the loop's, in its
// layout ([T * B, ...] rows of a padded batch are [T, B, ...]): output, hy, cy, cell_states and the
// activated gates, so sequence_backward (either path) reads what it expects. With a weight_hr
// (proj_size P > 0) output and hy are the projected states [.., P], and the kernel projects each
// step in place (one more grid barrier per step; W_hr's rows resident in shared memory, counted in
// the plan's shared bytes and so in the occupancy check). Without keep_states (sequence_inference:
// neither backward nor lf.LSTM's return_states will read them) no gates are written and
// cell_states holds two steps ([2 * B, H], step t in slot t % 2); the outputs' cell_states and gates
// are then not the loop's and only output, hy and cy are returned to the caller.
// The caller has checked the arguments (check_sequence_forward_args) and excluded autocast.
template <typename Device>
std::optional<ForwardOutputs> persistent_sequence_forward(
    const Device& device,
    const at::Tensor& input,
    at::IntArrayRef batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    bool allow_tf32,
    const std::optional<at::Tensor>& weight_hr,
    SequencePath* path,
    bool keep_states = true) {
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const int64_t batch = hx.size(0);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);  // proj_size with a projection, else hidden_size
  const int64_t projection_size = weight_hr.has_value() ? output_size : 0;
  *path = SequencePath::kLoop;
  if (steps == 0 || batch == 0 || hidden_size == 0 || !every_step_full(batch_sizes, batch)) {
    return std::nullopt;
  }
  std::optional<ForwardOutputs> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_sequence_persistent", [&] {
    const SequencePlan wanted =
        plan_persistent_sequence<scalar_t>(batch, hidden_size, projection_size, allow_tf32, SIZE_MAX, INT64_MAX);
    const CooperativeLimits limits = device.template forward_limits<scalar_t>(wanted);
    const SequencePlan plan = plan_persistent_sequence<scalar_t>(
        batch, hidden_size, projection_size, allow_tf32, limits.max_shared_bytes, limits.max_blocks);
    if (!plan.fits) {
      return;
    }
    const auto options = input.options();
    const int64_t rows = steps * batch;
    const at::Tensor projected = project_inputs(input, weight_ih, bias_ih, bias_hh);
    at::Tensor output = device.new_output({rows, output_size}, options);
    at::Tensor cell_states = device.new_output({keep_states ? rows : 2 * batch, hidden_size}, options);
    at::Tensor gates = keep_states ? device.new_output({rows, 4 * hidden_size}, options) : at::Tensor();
    at::Tensor hy = device.new_output({batch, output_size}, options);
    at::Tensor cy = device.new_output({batch, hidden_size}, options);
    // o * tanh(c) of the step being visited, between the cell update and the projection.
    at::Tensor unprojected = weight_hr.has_value() ? device.new_output({batch, hidden_size}, options) : at::Tensor();
    const at::Tensor weight_hh_c = weight_hh.contiguous();
    const at::Tensor weight_hr_c = weight_hr.has_value() ? weight_hr->contiguous() : at::Tensor();
    const at::Tensor hx_c = hx.contiguous();
    const at::Tensor cx_c = cx.contiguous();
    const SequencePointers<scalar_t> pointers{
        projected.const_data_ptr<scalar_t>(), weight_hh_c.const_data_ptr<scalar_t>(), hx_c.const_data_ptr<scalar_t>(),
        cx_c.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), cell_states.mutable_data_ptr<scalar_t>(),
        gates.defined() ? gates.mutable_data_ptr<scalar_t>() : nullptr, hy.mutable_data_ptr<scalar_t>(),
        cy.mutable_data_ptr<scalar_t>(), weight_hr_c.defined() ? weight_hr_c.const_data_ptr<scalar_t>() : nullptr,
        unprojected.defined() ? unprojected.mutable_data_ptr<scalar_t>() : nullptr};
    launch_persistent_sequence<scalar_t>(
        pointers, SequenceShape{steps, batch, hidden_size, reverse, output_size, keep_states ? 0 : 2}, plan,
        device.stream());
    *path = plan.tensor_cores ? SequencePath::kPersistentTensorCores : SequencePath::kPersistent;
    result = ForwardOutputs{output, hy, cy, cell_states, gates};
  });
  return result;
}

// sequence_backward for a padded batch: the recurrence of the gradients in one cooperative launch,
// then the products that need no recurrence (with a projection, grad_weight_hr among them: one
// product over all rows, as the loop's); nullopt where the persistent backward does not apply
// (then the loop runs). The kernel takes no gradient of cell_states or gates (return_states'
// outputs); a call with them takes the loop. The caller has checked the arguments.
template <typename Device>
std::optional<BackwardOutputs> persistent_sequence_backward(
    const Device& device,
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_cell_states,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& input,
    at::IntArrayRef batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const at::Tensor& output,
    const at::Tensor& cell_states,
    const at::Tensor& gates,
    bool reverse,
    const std::array<bool, 6>& output_mask,
    const std::optional<at::Tensor>& weight_hr,
    SequencePath* path) {
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const int64_t batch = hx.size(0);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);
  const int64_t projection_size = weight_hr.has_value() ? output_size : 0;
  *path = SequencePath::kLoop;
  if (steps == 0 || batch == 0 || hidden_size == 0 || !every_step_full(batch_sizes, batch) ||
      grad_cell_states.has_value() || grad_gates.has_value()) {
    return std::nullopt;
  }
  const auto options = input.options();
  at::Tensor grad_preactivation;
  at::Tensor grad_cx;
  at::Tensor grad_hidden;  // with a projection: every step's gradient of its projected h
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_sequence_backward", [&] {
    const SequencePlan wanted =
        plan_persistent_sequence_backward<scalar_t>(hidden_size, projection_size, SIZE_MAX, INT64_MAX);
    const CooperativeLimits limits = device.template backward_limits<scalar_t>(wanted);
    const SequencePlan plan = plan_persistent_sequence_backward<scalar_t>(
        hidden_size, projection_size, limits.max_shared_bytes, limits.max_blocks);
    if (!plan.fits) {
      return;
    }
    // Every step's dG, kept whatever the mask: the kernel reads the step visited before from it.
    grad_preactivation = device.new_output({steps * batch, 4 * hidden_size}, options);
    grad_cx = device.new_output({batch, hidden_size}, options);
    if (weight_hr.has_value()) {
      grad_hidden = device.new_output({steps * batch, output_size}, options);
    }
    const auto dense = [](const std::optional<at::Tensor>& t) { return t.has_value() ? t->contiguous() : at::Tensor(); };
    const at::Tensor grad_output_c = dense(grad_output);
    const at::Tensor grad_hy_c = dense(grad_hy);
    const at::Tensor grad_cy_c = dense(grad_cy);
    const at::Tensor weight_hh_c = weight_hh.contiguous();
    const at::Tensor weight_hr_c = weight_hr.has_value() ? weight_hr->contiguous() : at::Tensor();
    const at::Tensor cx_c = cx.contiguous();
    const at::Tensor cell_states_c = cell_states.contiguous();
    const at::Tensor gates_c = gates.contiguous();
    const auto pointer_or_null = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
    const SequenceBackwardPointers<scalar_t> pointers{
        pointer_or_null(grad_output_c), pointer_or_null(grad_hy_c), pointer_or_null(grad_cy_c),
        weight_hh_c.const_data_ptr<scalar_t>(), cx_c.const_data_ptr<scalar_t>(), cell_states_c.const_data_ptr<scalar_t>(),
        gates_c.const_data_ptr<scalar_t>(), grad_preactivation.mutable_data_ptr<scalar_t>(),
        grad_cx.mutable_data_ptr<scalar_t>(), pointer_or_null(weight_hr_c),
        grad_hidden.defined() ? grad_hidden.mutable_data_ptr<scalar_t>() : nullptr};
    launch_persistent_sequence_backward<scalar_t>(
        pointers, SequenceShape{steps, batch, hidden_size, reverse, output_size}, plan, device.stream());
    *path = SequencePath::kPersistent;
  });
  if (*path == SequencePath::kLoop) {
    return std::nullopt;
  }
  // The state each step multiplied by W_hh: the previous visited step's h, hx for the first.
  at::Tensor previous;
  if (output_mask[4]) {
    const at::Tensor by_step = output.reshape({steps, batch, output_size});
    previous = (reverse ? at::cat({by_step.narrow(0, 1, steps - 1), hx.unsqueeze(0)})
                        : at::cat({hx.unsqueeze(0), by_step.narrow(0, 0, steps - 1)}))
                   .reshape({steps * batch, output_size});
  }
  const SequenceProducts products = device.products(grad_preactivation, input, previous, weight_ih, output_mask);
  const auto empty = [&] { return at::empty({0}, options); };
  // h_0's gradient: the forward's first visited step's dG through W_hh.
  const int64_t first = reverse ? steps - 1 : 0;
  return BackwardOutputs{
      products.input,
      output_mask[1] ? at::mm(grad_preactivation.narrow(0, first * batch, batch), weight_hh) : empty(),
      output_mask[2] ? grad_cx : empty(),
      products.weight_ih,
      products.weight_hh,
      products.bias,
      // grad_weight_hr = sum over rows of grad_h^T (o * tanh(c)), u recomputed from the saved gates
      // and cell states as the loop does (hidden_before_projection), one product (cuBLAS on the GPU).
      weight_hr.has_value()
          ? at::mm(grad_hidden.t(), gates.narrow(1, 3 * hidden_size, hidden_size) * cell_states.tanh())
          : empty(),
  };
}

// The sequence_forward op: the persistent kernel where it applies (with or without a projection),
// else the loop. *path says which ran. Without keep_states (sequence_inference), the persistent
// kernel writes no gates and two steps of c, and only output, hy and cy are the loop's.
template <typename Device>
ForwardOutputs sequence_forward_op(
    const Device& device,
    SequencePath* path,
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    bool allow_tf32,
    const std::optional<at::Tensor>& weight_hr,
    bool keep_states = true) {
  // Checked before the guard: the checks name a tensor on the wrong device.
  const std::vector<int64_t> sizes =
      device.check_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  *path = SequencePath::kLoop;
  {
    const typename Device::Guard guard(input.device());
    // Autocast must not recast the products of an op whose dtype was fixed by its caller.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    if (auto outputs = persistent_sequence_forward(
            device, input, sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, allow_tf32, weight_hr,
            path, keep_states)) {
      return *std::move(outputs);
    }
  }
  return device.forward_loop(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
}

// The sequence_inference op: sequence_forward_op's output, hy and cy, without keeping the states.
template <typename Device, typename... Args>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_inference_op(const Device& device, Args&&... args) {
  auto [output, hy, cy, cell_states, gates] =
      sequence_forward_op(device, std::forward<Args>(args)..., /*keep_states=*/false);
  return {output, hy, cy};
}

// The sequence_backward op, as sequence_forward_op.
template <typename Device>
BackwardOutputs sequence_backward_op(
    const Device& device,
    SequencePath* path,
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
    const std::optional<at::Tensor>& weight_hr) {
  *path = SequencePath::kLoop;
  {
    // The persistent path reads the saved tensors and gradients as the forward wrote them; any
    // other shape goes to the loop, whose checks name the argument that is wrong.
    const std::vector<int64_t> sizes =
        device.check_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr);
    const int64_t rows = input.size(0);
    const int64_t hidden_size = weight_hh.size(0) / 4;
    const int64_t output_size = weight_hh.size(1);
    const auto same = [&](const at::Tensor& t, at::IntArrayRef sizes) {
      return t.sizes() == sizes && t.device() == input.device() && t.scalar_type() == input.scalar_type();
    };
    const auto absent_or_same = [&](const std::optional<at::Tensor>& t, at::IntArrayRef sizes) {
      return !t.has_value() || same(*t, sizes);
    };
    const bool as_saved = same(output, {rows, output_size}) && same(cell_states, {rows, hidden_size}) &&
        same(gates, {rows, 4 * hidden_size}) && absent_or_same(grad_output, {rows, output_size}) &&
        absent_or_same(grad_hy, hx.sizes()) && absent_or_same(grad_cy, cx.sizes());
    if (as_saved) {
      const typename Device::Guard guard(input.device());
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      if (auto grads = persistent_sequence_backward(
              device, grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, sizes, hx, cx, weight_ih,
              weight_hh, output, cell_states, gates, reverse, output_mask, weight_hr, path)) {
        return *std::move(grads);
      }
    }
  }
  return device.backward_loop(
      grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih, weight_hh,
      output, cell_states, gates, reverse, output_mask, weight_hr);
}

}  // namespace cuda
}  // namespace lstm_fused
