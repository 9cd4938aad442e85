// What the device kernels share with the op registration: argument checks and output allocation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

#include "cpu/small_batch.h"

namespace lstm_fused {

// A packed sequence's steps in the order the recurrence visits them (last step first when
// reverse), each with its rows' offset, the rows carried over from the step visited before and
// the rows that end there (csrc/cpu/small_batch.h's RecurrenceStep). Defined in sequence.cpp.
std::vector<cpu::RecurrenceStep> visiting_order(const std::vector<int64_t>& batch_sizes, bool reverse);

// The state a step starts from: the previous visited step's rows for the sequences that continue,
// the initial state for those that begin here. A view except where both meet (reverse direction,
// at a step where the batch grows), which needs one small concatenation. (sequence.cpp)
at::Tensor previous_rows(const at::Tensor& states, const at::Tensor& initial, const cpu::RecurrenceStep& step);

// Backpropagation through time, at the step being visited: rows [0, step.batch) of grad_hidden and
// grad_cell, which hold what the step after it passed back, become all that reaches the step's h
// and c: a sequence's last step starts from grad_hy, grad_cy (zero where absent), and every step
// adds its rows of grad_output and grad_cell_states. (sequence.cpp)
void add_incoming_grads(
    const cpu::RecurrenceStep& step,
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_cell_states,
    at::Tensor& grad_hidden,
    at::Tensor& grad_cell);

// Allocates a kernel output. When the test hook `_set_poison_outputs(True)` is on, the memory is
// NaN-filled first, so an element a kernel forgets to write fails the comparison tests.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// An optional argument as the kernels read it: contiguous, or undefined when absent (an unused
// output's gradient, a missing bias)...
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t);

// ...and its data, null when undefined.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// Shapes, dtypes and devices of cell_forward's arguments; raises naming the argument,
// what was expected and what was given.
void check_cell_forward_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh);

// sequence_forward's arguments: those of the cell, plus batch_sizes (1-D int64 on the CPU,
// non-increasing, summing to input's rows), states of batch_sizes[0] rows and the optional
// projection weight_hr [proj_size, hidden_size] (then weight_hh and hx have proj_size columns).
// Returns the batch sizes.
std::vector<int64_t> check_sequence_forward_args(
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr);

// cell_pointwise_ writes in place: gates and the outputs must be contiguous and of the shapes
// [batch, 4 * hidden] and [batch, hidden].
void check_cell_pointwise_args(
    const at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& hy,
    const at::Tensor& cy);

void check_cell_gate_grads_args(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates);

// The device ops, called through the dispatcher: code built on them (the cell's backward, the
// sequence loop) runs on whichever device holds the tensors, CPU or CUDA.
void dispatch_cell_pointwise_(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy);

std::tuple<at::Tensor, at::Tensor> dispatch_cell_gate_grads(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates);

// The products of a backward that the cell and the sequence share, from the gate pre-activation
// gradients G (a row per batch row, or per step and batch row): grad_input = G W_ih,
// grad_weight_ih = G^T input, grad_weight_hh = G^T hidden (hidden: the states those rows
// multiplied by W_hh, read only when output_mask[4]), grad_bias = the column sums of G. Each only
// where output_mask (the backward ops': input, hx, cx, weight_ih, weight_hh, bias) asks for it,
// else an empty tensor.
struct InputAndWeightGrads {
  at::Tensor input;
  at::Tensor weight_ih;
  at::Tensor weight_hh;
  at::Tensor bias;
};
InputAndWeightGrads input_and_weight_grads(
    const at::Tensor& grad_preactivation,
    const at::Tensor& input,
    const at::Tensor& hidden,
    const at::Tensor& weight_ih,
    const std::array<bool, 6>& output_mask);

// cell_backward from device ops and library products alone: the kernel of every device but the
// CPU, and the CPU's above the small-batch path.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward_composite(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    std::array<bool, 6> output_mask);

}  // namespace lstm_fused
