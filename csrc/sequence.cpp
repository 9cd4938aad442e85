// One LSTM layer, one direction, over a whole sequence: the forward loop and backpropagation
// through time, in C++ so that no Python runs per step.
//
// The loop is built from dispatcher calls (matrix products through matmul.h, the cell's
// cell_pointwise_ and cell_gate_grads), registered as CompositeExplicitAutograd: the same loop
// drives the CPU kernels and the CUDA ones. On the CPU, float32 batches (of at most 64, or 256 on
// AVX-512) go instead to cpu/small_batch.h's fused recurrence and its backward, where a step makes
// no library call; so do bfloat16 and float16 batches of at most 64 (256 for bfloat16 on AMX;
// 16-bit panels, float32 accumulation). The autograd is
// csrc/autograd.cpp's SequenceFunction.
//
// With a projection (nn.LSTM's proj_size > 0, an optional weight_hr [proj_size, hidden]) each step's
// hidden state is weight_hr (o * tanh(c)): one more product per step in the loop, and in the
// backward the gradient of o * tanh(c) = grad_h weight_hr per step and grad_weight_hr once at the end.
//
// Layout: PackedSequence's. Every step's rows are stacked in one [sum(batch_sizes), ...] tensor,
// sequences sorted longest first, so step t holds sequences [0, batch_sizes[t]) and each step's rows
// are a prefix of the previous step's. A padded [T, B, ...] batch is the case of equal batch sizes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "sequence.h"

#include "cpu/small_batch.h"
#include "matmul.h"
#include "ops.h"

namespace lstm_fused {

std::vector<cpu::RecurrenceStep> visiting_order(const std::vector<int64_t>& batch_sizes, bool reverse) {
  const int64_t num_steps = static_cast<int64_t>(batch_sizes.size());
  std::vector<int64_t> offsets(num_steps, 0);
  for (int64_t t = 1; t < num_steps; ++t) {
    offsets[t] = offsets[t - 1] + batch_sizes[t - 1];
  }
  std::vector<cpu::RecurrenceStep> steps(num_steps);
  for (int64_t k = 0; k < num_steps; ++k) {
    const int64_t t = reverse ? num_steps - 1 - k : k;
    cpu::RecurrenceStep& step = steps[k];
    step.offset = offsets[t];
    step.batch = batch_sizes[t];
    // Forward, every row continues from step t - 1 (which has at least as many). Reversed, step
    // t + 1 holds fewer sequences: the others have their last element at t and start here.
    step.carried = k == 0 ? 0 : std::min(step.batch, steps[k - 1].batch);
    step.previous_offset = k == 0 ? 0 : steps[k - 1].offset;
  }
  for (int64_t k = 0; k < num_steps; ++k) {
    steps[k].ending = k + 1 < num_steps ? steps[k + 1].carried : 0;
  }
  return steps;
}

at::Tensor previous_rows(const at::Tensor& states, const at::Tensor& initial, const cpu::RecurrenceStep& step) {
  if (step.carried == step.batch) {
    return states.narrow(0, step.previous_offset, step.batch);
  }
  if (step.carried == 0) {
    return initial.narrow(0, 0, step.batch);
  }
  return at::cat(
      {states.narrow(0, step.previous_offset, step.carried),
       initial.narrow(0, step.carried, step.batch - step.carried)});
}

void add_incoming_grads(
    const cpu::RecurrenceStep& step,
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_cell_states,
    at::Tensor& grad_hidden,
    at::Tensor& grad_cell) {
  const int64_t ending_rows = step.batch - step.ending;
  if (ending_rows > 0) {
    at::Tensor hidden_rows = grad_hidden.narrow(0, step.ending, ending_rows);
    at::Tensor cell_rows = grad_cell.narrow(0, step.ending, ending_rows);
    grad_hy.has_value() ? hidden_rows.copy_(grad_hy->narrow(0, step.ending, ending_rows)) : hidden_rows.zero_();
    grad_cy.has_value() ? cell_rows.copy_(grad_cy->narrow(0, step.ending, ending_rows)) : cell_rows.zero_();
  }
  if (grad_output.has_value()) {
    grad_hidden.narrow(0, 0, step.batch).add_(grad_output->narrow(0, step.offset, step.batch));
  }
  if (grad_cell_states.has_value()) {
    grad_cell.narrow(0, 0, step.batch).add_(grad_cell_states->narrow(0, step.offset, step.batch));
  }
}

namespace {

// One time step, as the recurrence visits it (last step first when reverse).
using Step = cpu::RecurrenceStep;

// Copies row ranges into one destination, merging a copy that continues the previous one in both
// source and destination: a padded batch gathers its previous hidden states in two copies, not T.
class RowGather {
 public:
  explicit RowGather(at::Tensor destination) : destination_(std::move(destination)) {}

  void copy(int64_t destination_row, const at::Tensor& source, int64_t source_row, int64_t rows) {
    if (rows == 0) {
      return;
    }
    if (pending_rows_ > 0 && source.is_same(pending_source_) &&
        destination_row == pending_destination_row_ + pending_rows_ &&
        source_row == pending_source_row_ + pending_rows_) {
      pending_rows_ += rows;
      return;
    }
    flush();
    pending_source_ = source;
    pending_destination_row_ = destination_row;
    pending_source_row_ = source_row;
    pending_rows_ = rows;
  }

  at::Tensor finish() {
    flush();
    return destination_;
  }

 private:
  void flush() {
    if (pending_rows_ > 0) {
      destination_.narrow(0, pending_destination_row_, pending_rows_)
          .copy_(pending_source_.narrow(0, pending_source_row_, pending_rows_));
    }
    pending_rows_ = 0;
  }

  at::Tensor destination_;
  at::Tensor pending_source_;
  int64_t pending_destination_row_ = 0;
  int64_t pending_source_row_ = 0;
  int64_t pending_rows_ = 0;
};

// Every row's previous hidden state (what its step multiplied by weight_hh) as one matrix, so that
// grad_weight_hh is a single product. Visited in row order, which is what lets copies merge.
at::Tensor previous_hidden_states(const at::Tensor& output, const at::Tensor& hx, const std::vector<Step>& steps, bool reverse) {
  RowGather gather(new_output(output.sizes(), output.options()));
  const int64_t num_steps = static_cast<int64_t>(steps.size());
  for (int64_t i = 0; i < num_steps; ++i) {
    const Step& step = steps[reverse ? num_steps - 1 - i : i];
    gather.copy(step.offset, output, step.previous_offset, step.carried);
    gather.copy(step.offset + step.carried, hx, step.carried, step.batch - step.carried);
  }
  return gather.finish();
}

bool takes_small_batch_path(const at::Tensor& input, const at::Tensor& hx) {
  return input.device().is_cpu() && input.scalar_type() == at::kFloat && cpu::small_batch::handles_float32_sequence(hx.size(0));
}

// bfloat16 and float16 sequences take the fused recurrence and its backward with 16-bit panels
// too: at batch 1-64, T = 64, hidden 128-1024 each step's library product and pointwise pass cost
// more than the whole fused step.
bool takes_fused_recurrence(const at::Tensor& input, const at::Tensor& hx) {
  const bool reduced = input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kHalf;
  return takes_small_batch_path(input, hx) ||
      (input.device().is_cpu() && reduced &&
       cpu::small_batch::handles_reduced_sequence(hx.size(0), input.scalar_type() == at::kBFloat16));
}

// Calls f with the storage type the fused recurrence sees for the tensor's dtype: float, or the
// 16-bit bits of bfloat16 and float16.
template <typename F>
void with_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(std::type_identity<float>{});
    case at::kBFloat16: return f(std::type_identity<cpu::BFloat16Bits>{});
    case at::kHalf: return f(std::type_identity<cpu::HalfBits>{});
    default: TORCH_INTERNAL_ASSERT(false, "lstm_fused: no fused recurrence for ", dtype);
  }
}

// How the fused recurrence and its backward pack their weights for each storage type: float32
// panels, or 16-bit panels with the reduction in pairs.
template <typename T>
struct RecurrencePacking {
  static int64_t gate_panels_size(int64_t hidden_size, int64_t state_size) {
    return cpu::small_batch::pair_gate_panels_size(hidden_size, state_size);
  }
  static void pack_gate_panels(const T* weight_hh, int64_t hidden_size, int64_t state_size, T* panels) {
    cpu::small_batch::pack_pair_gate_panels(weight_hh, hidden_size, state_size, panels);
  }
  static int64_t projection_panels_size(int64_t rows, int64_t reduction) {
    return cpu::small_batch::pair_panels_size(rows, reduction);
  }
  static void pack_projection_panels(const T* weight_hr, int64_t rows, int64_t reduction, T* panels) {
    cpu::small_batch::pack_pair_panels(weight_hr, rows, reduction, panels);
  }
  static int64_t unit_panels_size(int64_t rows, int64_t units) {
    return cpu::small_batch::pair_panels_size(units, rows);
  }
  static void pack_unit_panels(const T* weight, int64_t rows, int64_t units, T* panels) {
    cpu::small_batch::pack_pair_unit_panels(weight, rows, units, panels);
  }
};
template <>
struct RecurrencePacking<float> {
  static int64_t gate_panels_size(int64_t hidden_size, int64_t state_size) {
    return cpu::small_batch::gate_panels_size(hidden_size, state_size);
  }
  static void pack_gate_panels(const float* weight_hh, int64_t hidden_size, int64_t state_size, float* panels) {
    cpu::small_batch::pack_gate_panels(weight_hh, hidden_size, state_size, panels);
  }
  static int64_t projection_panels_size(int64_t rows, int64_t reduction) {
    return cpu::small_batch::row_panels_size(rows, reduction);
  }
  static void pack_projection_panels(const float* weight_hr, int64_t rows, int64_t reduction, float* panels) {
    cpu::small_batch::pack_row_panels(weight_hr, rows, reduction, panels);
  }
  static int64_t unit_panels_size(int64_t rows, int64_t units) {
    return cpu::small_batch::unit_panels_size(rows, units);
  }
  static void pack_unit_panels(const float* weight, int64_t rows, int64_t units, float* panels) {
    cpu::small_batch::pack_unit_panels(weight, rows, units, panels);
  }
};

template <typename T>
const T* elements(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mutable_elements(at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// One call's fused recurrence: weight_hh (and weight_hr) packed once, then run over any run of
// the visited steps.
template <typename T>
class FusedRecurrence {
 public:
  FusedRecurrence(
      const at::Tensor& weight_hh,
      const std::optional<at::Tensor>& bias_hh,
      const std::optional<at::Tensor>& weight_hr,
      int64_t batch,
      int threads)
      : hidden_size_(weight_hh.size(0) / 4), output_size_(weight_hh.size(1)), threads_(threads) {
    using Packing = RecurrencePacking<T>;
    const auto options = weight_hh.options();
    const at::Tensor weight_hh_c = weight_hh.contiguous();
    gate_panels_ = at::empty({Packing::gate_panels_size(hidden_size_, output_size_)}, options);
    Packing::pack_gate_panels(elements<T>(weight_hh_c), hidden_size_, output_size_, mutable_elements<T>(gate_panels_));
    if (weight_hr.has_value()) {
      // The projection: its panels (outputs: proj_size rows of weight_hr) and o * tanh(c)'s scratch.
      const at::Tensor weight_hr_c = weight_hr->contiguous();
      projection_panels_ = at::empty({Packing::projection_panels_size(weight_hr_c.size(0), weight_hr_c.size(1))}, options);
      Packing::pack_projection_panels(elements<T>(weight_hr_c), weight_hr_c.size(0), weight_hr_c.size(1),
                                      mutable_elements<T>(projection_panels_));
      unprojected_ = at::empty({batch, hidden_size_}, options);
    }
    bias_hh_ = contiguous_or_undefined(bias_hh);
  }

  // steps' offsets index gates, output and cell_states, each contiguous; hx and cx are contiguous.
  // keeps_gates: whether gates holds the activated gates afterwards (the backward reads them);
  // false, it is scratch.
  void run(const Step* steps, int64_t num_steps, const at::Tensor& hx, const at::Tensor& cx, at::Tensor& gates,
           at::Tensor& output, at::Tensor& cell_states, at::Tensor& hy, at::Tensor& cy, bool keeps_gates = true) {
    cpu::small_batch::sequence_forward(
        cpu::small_batch::SequenceForwardOf<T>{
            steps, num_steps, hidden_size_, output_size_, elements<T>(gate_panels_), elements<T>(projection_panels_),
            mutable_elements<T>(unprojected_), elements<T>(bias_hh_), elements<T>(hx), elements<T>(cx),
            mutable_elements<T>(gates), mutable_elements<T>(output), mutable_elements<T>(cell_states),
            mutable_elements<T>(hy), mutable_elements<T>(cy), keeps_gates},
        threads_);
  }

 private:
  int64_t hidden_size_;
  int64_t output_size_;
  int threads_;
  at::Tensor gate_panels_, projection_panels_, unprojected_, bias_hh_;
};

// Every row's hidden state before the projection, o * tanh(c), from what the forward saved: the
// projection's weight gradient multiplies it by every step's hidden-state gradient. Recomputed
// rather than saved: one pointwise pass, against a [rows, hidden_size] buffer kept per layer.
at::Tensor hidden_before_projection(const at::Tensor& cell_states, const at::Tensor& gates) {
  const int64_t hidden_size = cell_states.size(1);
  return gates.narrow(1, 3 * hidden_size, hidden_size) * cell_states.tanh();
}

// The multiply-adds of a step: the recurrent product, and the projection's where there is one.
int small_batch_threads(int64_t batch, int64_t hidden_size, int64_t output_size, bool projecting) {
  const int64_t multiply_adds = batch * (4 * hidden_size * output_size + (projecting ? hidden_size * output_size : 0));
  return cpu::small_batch::threads_for(multiply_adds, at::get_num_threads());
}

}  // namespace

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
    const std::optional<at::Tensor>& weight_hr) {
  const std::vector<int64_t> sizes =
      check_sequence_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  // Autocast must not recast the products of an op whose dtype was fixed by its caller.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t total_rows = input.size(0);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);  // proj_size with a projection, else hidden_size
  const int64_t batch = hx.size(0);
  const auto options = input.options();

  // The input's share of every step's gates in one product, the only part that does not wait on
  // the recurrence. bias_ih rides on it; bias_hh is added by the pointwise pass.
  at::Tensor gates = linear_product(input, weight_ih, bias_ih);
  at::Tensor output = new_output({total_rows, output_size}, options);
  at::Tensor cell_states = new_output({total_rows, hidden_size}, options);
  at::Tensor hy = new_output({batch, output_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);

  const std::vector<Step> steps = visiting_order(sizes, reverse);
  if (takes_fused_recurrence(input, hx)) {
    const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous();
    gates = gates.contiguous();
    with_storage_type(input.scalar_type(), [&](auto type) {
      using T = typename decltype(type)::type;
      FusedRecurrence<T>(weight_hh, bias_hh, weight_hr, batch,
                         small_batch_threads(batch, hidden_size, output_size, weight_hr.has_value()))
          .run(steps.data(), static_cast<int64_t>(steps.size()), hx_c, cx_c, gates, output, cell_states, hy, cy);
    });
    return {output, hy, cy, cell_states, gates};
  }

  const int64_t num_steps = static_cast<int64_t>(sizes.size());
  const at::Tensor recurrent_weight = prepare_repeated_weight(weight_hh, batch, num_steps);
  // With a projection the cell writes o * tanh(c) here, and the step's output row is its product
  // with weight_hr: the next step's recurrent product reads the projected rows.
  const at::Tensor projection_weight = weight_hr.has_value() ? prepare_repeated_weight(*weight_hr, batch, num_steps) : at::Tensor();
  at::Tensor unprojected = weight_hr.has_value() ? new_output({batch, hidden_size}, options) : at::Tensor();
  for (const Step& step : steps) {
    at::Tensor step_gates = gates.narrow(0, step.offset, step.batch);
    at::Tensor step_output = output.narrow(0, step.offset, step.batch);
    at::Tensor step_hidden = weight_hr.has_value() ? unprojected.narrow(0, 0, step.batch) : step_output;
    at::Tensor step_cell = cell_states.narrow(0, step.offset, step.batch);
    linear_product_into(step_gates, previous_rows(output, hx, step), recurrent_weight, /*accumulate=*/true);
    dispatch_cell_pointwise_(step_gates, previous_rows(cell_states, cx, step), bias_hh, step_hidden, step_cell);
    if (weight_hr.has_value()) {
      linear_product_into(step_output, step_hidden, projection_weight, /*accumulate=*/false);
    }
    const int64_t ending_rows = step.batch - step.ending;
    if (ending_rows > 0) {
      hy.narrow(0, step.ending, ending_rows).copy_(step_output.narrow(0, step.ending, ending_rows));
      cy.narrow(0, step.ending, ending_rows).copy_(step_cell.narrow(0, step.ending, ending_rows));
    }
  }
  return {output, hy, cy, cell_states, gates};
}

namespace {

// Rows an inference call projects at once, and the recurrence then runs over: no call allocates
// (and faults in) a [rows, 4 * hidden] buffer for the whole sequence, nor keeps every step's cell
// state. oneDNN's product of 512 rows ran at its whole-sequence speed (AMD EPYC Zen 4, 1 thread,
// [512, 128] x [128, 512]: 5.3 against 5.9 ms for 4096 rows' worth); at 64 rows it took 20% longer.
constexpr int64_t kInferenceChunkRows = 512;

SequenceInferenceOutputs sequence_inference_cpu(
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    const std::optional<at::Tensor>& weight_hr) {
  if (!takes_fused_recurrence(input, hx)) {
    const auto [output, hy, cy, cell_states, gates] =
        sequence_forward_loop(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
    return {output, hy, cy};
  }
  const std::vector<int64_t> sizes =
      check_sequence_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);
  const int64_t batch = hx.size(0);
  const auto options = input.options();
  at::Tensor output = new_output({input.size(0), output_size}, options);
  at::Tensor hy = new_output({batch, output_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  const std::vector<Step> steps = visiting_order(sizes, reverse);
  const int64_t num_steps = static_cast<int64_t>(steps.size());

  // Visited steps in runs of at most chunk_rows rows. A run's rows are contiguous in the packed
  // layout (its steps are consecutive in time, either way round).
  const int64_t chunk_rows = std::max(batch, kInferenceChunkRows);
  std::vector<std::pair<int64_t, int64_t>> runs;  // [first, end) visited steps
  for (int64_t first = 0; first < num_steps;) {
    int64_t end = first, rows = 0;
    while (end < num_steps && (end == first || rows + steps[end].batch <= chunk_rows)) {
      rows += steps[end++].batch;
    }
    runs.emplace_back(first, end);
    first = end;
  }
  const at::Tensor input_weight = prepare_repeated_weight(weight_ih, chunk_rows, static_cast<int64_t>(runs.size()));
  at::Tensor cell_states = at::empty({chunk_rows, hidden_size}, options);
  // The states a run starts from, as its first step reads them: rows that continue from the step
  // before it, then hx and cx's rows for sequences that start there (and, reversed, at later steps).
  at::Tensor entering_hidden = hx.contiguous(), entering_cell = cx.contiguous();
  if (runs.size() > 1) {
    entering_hidden = entering_hidden.clone();
    entering_cell = entering_cell.clone();
  }
  with_storage_type(input.scalar_type(), [&](auto type) {
    using T = typename decltype(type)::type;
    FusedRecurrence<T> recurrence(
        weight_hh, bias_hh, weight_hr, batch, small_batch_threads(batch, hidden_size, output_size, weight_hr.has_value()));
    int64_t previous_base = 0;
    for (const auto& [first, end] : runs) {
      std::vector<Step> run(steps.begin() + first, steps.begin() + end);
      int64_t base = run.front().offset, last_row = 0;
      for (const Step& step : run) {
        base = std::min(base, step.offset);
        last_row = std::max(last_row, step.offset + step.batch);
      }
      if (first > 0) {
        // The previous run's last step holds the carried rows: its h in output, its c in the
        // cell_states scratch, which this run is about to overwrite.
        const Step& previous = steps[first - 1];
        const int64_t carried = run.front().carried;
        entering_hidden.narrow(0, 0, carried).copy_(output.narrow(0, previous.offset, carried));
        entering_cell.narrow(0, 0, carried).copy_(cell_states.narrow(0, previous.offset - previous_base, carried));
        run.front().carried = 0;
      }
      for (Step& step : run) {
        step.offset -= base;
        step.previous_offset -= base;
      }
      run.front().previous_offset = 0;  // its rows all start from entering_hidden and entering_cell
      at::Tensor gates = linear_product(input.narrow(0, base, last_row - base), input_weight, bias_ih).contiguous();
      at::Tensor run_output = output.narrow(0, base, last_row - base);
      recurrence.run(run.data(), static_cast<int64_t>(run.size()), entering_hidden, entering_cell, gates, run_output,
                     cell_states, hy, cy, /*keeps_gates=*/false);
      previous_base = base;
    }
  });
  return {output, hy, cy};
}

// The backward loop from dispatcher calls, for every device and dtype: per step, the pointwise gate
// gradients and one product with weight_hh.
void loop_backward(
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_cell_states,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr,
    const at::Tensor& cell_states,
    const at::Tensor& gates,
    const std::vector<Step>& steps,
    bool keep_gate_grads,
    at::Tensor& grad_preactivations,
    at::Tensor& grad_outputs,
    at::Tensor& grad_hx,
    at::Tensor& grad_cx) {
  const int64_t batch = hx.size(0);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);
  const auto options = hx.options();
  // The gradient reaching each running sequence's h and c at the step being visited: from the
  // step after it (through the recurrence), from output and cell_states, and at a sequence's last
  // step from h_n, c_n. With a projection h is the projected state, and grad_unprojected the
  // gradient of o * tanh(c): grad_hidden @ weight_hr.
  at::Tensor grad_hidden = new_output({batch, output_size}, options);
  at::Tensor grad_cell = new_output({batch, hidden_size}, options);
  at::Tensor grad_unprojected = weight_hr.has_value() ? new_output({batch, hidden_size}, options) : at::Tensor();
  const at::Tensor weight_hr_t = weight_hr.has_value() ? weight_hr->t() : at::Tensor();

  // h_prev's gradient is G @ weight_hh: linear's weight^T is weight_hh.t(), a strided view.
  const at::Tensor weight_hh_t = weight_hh.t();
  for (auto step_it = steps.rbegin(); step_it != steps.rend(); ++step_it) {
    const Step& step = *step_it;
    add_incoming_grads(step, grad_output, grad_hy, grad_cy, grad_cell_states, grad_hidden, grad_cell);
    at::Tensor step_grad_hidden = grad_hidden.narrow(0, 0, step.batch);
    at::Tensor step_grad_cell = grad_cell.narrow(0, 0, step.batch);
    const std::optional<at::Tensor> step_grad_gates =
        grad_gates.has_value() ? std::optional<at::Tensor>(grad_gates->narrow(0, step.offset, step.batch)) : std::nullopt;
    at::Tensor step_grad_cell_output = step_grad_hidden;  // the gradient of o * tanh(c)
    if (weight_hr.has_value()) {
      // Kept for the projection's weight gradient, one product over all steps at the end.
      grad_outputs.narrow(0, step.offset, step.batch).copy_(step_grad_hidden);
      step_grad_cell_output = grad_unprojected.narrow(0, 0, step.batch);
      linear_product_into(step_grad_cell_output, step_grad_hidden, weight_hr_t, /*accumulate=*/false);
    }
    auto [grad_preactivation, grad_cell_prev] = dispatch_cell_gate_grads(
        step_grad_cell_output,
        step_grad_cell,
        step_grad_gates,
        previous_rows(cell_states, cx, step),
        cell_states.narrow(0, step.offset, step.batch),
        gates.narrow(0, step.offset, step.batch));
    if (keep_gate_grads) {
      grad_preactivations.narrow(0, step.offset, step.batch).copy_(grad_preactivation);
    }
    // Now the gradient of the states this step started from: what the previous visited step gets.
    linear_product_into(step_grad_hidden, grad_preactivation, weight_hh_t, /*accumulate=*/false);
    step_grad_cell.copy_(grad_cell_prev);
    const int64_t starting_rows = step.batch - step.carried;
    if (starting_rows > 0) {
      grad_hx.narrow(0, step.carried, starting_rows).copy_(step_grad_hidden.narrow(0, step.carried, starting_rows));
      grad_cx.narrow(0, step.carried, starting_rows).copy_(step_grad_cell.narrow(0, step.carried, starting_rows));
    }
  }
}

}  // namespace

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
    const std::optional<at::Tensor>& weight_hr) {
  // The saved tensors are sequence_forward's own; checking its arguments again covers the rest.
  const std::vector<int64_t> sizes =
      check_sequence_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t total_rows = input.size(0);
  const int64_t hidden_size = weight_hh.size(0) / 4;
  const int64_t output_size = weight_hh.size(1);
  const int64_t batch = hx.size(0);
  const auto options = input.options();
  for (const auto& [grad, name, width] :
       {std::tuple<const std::optional<at::Tensor>&, const char*, int64_t>{grad_output, "grad_output", output_size},
        {grad_cell_states, "grad_cell_states", hidden_size},
        {grad_gates, "grad_gates", 4 * hidden_size}}) {
    TORCH_CHECK(
        !grad.has_value() || grad->sizes() == at::IntArrayRef({total_rows, width}),
        "lstm_fused: ", name, " must have shape [", total_rows, ", ", width, "], got ", grad->sizes());
  }
  for (const auto& [grad, name, state] :
       {std::tuple<const std::optional<at::Tensor>&, const char*, const at::Tensor&>{grad_hy, "grad_hy", hx},
        {grad_cy, "grad_cy", cx}}) {
    TORCH_CHECK(
        !grad.has_value() || grad->sizes() == state.sizes(),
        "lstm_fused: ", name, " must have shape ", state.sizes(), ", got ", grad->sizes());
  }

  at::Tensor grad_hx = new_output({batch, output_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);
  // Every step's gate pre-activation gradients, kept for the products over all steps at the end.
  const bool keep_gate_grads = output_mask[0] || output_mask[3] || output_mask[4] || output_mask[5];
  at::Tensor grad_preactivations;
  // Every step's gradient of its (projected) hidden state, for the projection's weight gradient.
  at::Tensor grad_outputs = weight_hr.has_value() ? new_output({total_rows, output_size}, options) : at::Tensor();
  const std::vector<Step> steps = visiting_order(sizes, reverse);
  if (takes_fused_recurrence(input, hx)) {
    // The fused recurrence writes every step's gate gradients whether or not they are kept.
    grad_preactivations = new_output({total_rows, 4 * hidden_size}, options);
    const at::Tensor grad_output_c = contiguous_or_undefined(grad_output);
    const at::Tensor grad_cell_states_c = contiguous_or_undefined(grad_cell_states);
    const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
    const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
    const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
    const at::Tensor cx_c = cx.contiguous();
    const at::Tensor cell_states_c = cell_states.contiguous(), gates_c = gates.contiguous();
    at::Tensor grad_hidden = at::empty({batch, output_size}, options);
    at::Tensor grad_cell = at::empty({batch, hidden_size}, options);
    at::Tensor grad_unprojected = weight_hr.has_value() ? at::empty({batch, hidden_size}, options) : at::Tensor();
    with_storage_type(input.scalar_type(), [&](auto type) {
      using T = typename decltype(type)::type;
      using Packing = RecurrencePacking<T>;
      // weight (weight_hh, [4 * hidden, output_size]; weight_hr, [proj_size, hidden]) in the
      // panels of the products grad_rows weight, read along its rows.
      const auto unit_panels = [&](const at::Tensor& weight) {
        const at::Tensor weight_c = weight.contiguous();
        at::Tensor panels = at::empty({Packing::unit_panels_size(weight_c.size(0), weight_c.size(1))}, options);
        Packing::pack_unit_panels(elements<T>(weight_c), weight_c.size(0), weight_c.size(1), mutable_elements<T>(panels));
        return panels;
      };
      const at::Tensor weight_hh_panels = unit_panels(weight_hh);
      // The projection's backward product: grad of o * tanh(c) = grad_hidden weight_hr.
      const at::Tensor projection_panels = weight_hr.has_value() ? unit_panels(*weight_hr) : at::Tensor();
      cpu::small_batch::sequence_backward(
          cpu::small_batch::SequenceBackwardOf<T>{
              steps.data(), static_cast<int64_t>(steps.size()), hidden_size, output_size, elements<T>(weight_hh_panels),
              elements<T>(projection_panels), mutable_elements<T>(grad_unprojected), mutable_elements<T>(grad_outputs),
              elements<T>(cx_c), elements<T>(cell_states_c), elements<T>(gates_c), elements<T>(grad_output_c),
              elements<T>(grad_cell_states_c), elements<T>(grad_gates_c), elements<T>(grad_hy_c),
              elements<T>(grad_cy_c), mutable_elements<T>(grad_preactivations), mutable_elements<T>(grad_hx),
              mutable_elements<T>(grad_cx), mutable_elements<T>(grad_hidden), mutable_elements<T>(grad_cell)},
          small_batch_threads(batch, hidden_size, output_size, weight_hr.has_value()));
    });
  } else {
    grad_preactivations = keep_gate_grads ? new_output({total_rows, 4 * hidden_size}, options) : at::Tensor();
    loop_backward(grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, hx, cx, weight_hh, weight_hr, cell_states,
                  gates, steps, keep_gate_grads, grad_preactivations, grad_outputs, grad_hx, grad_cx);
  }

  // The products over all steps at once: one large GEMM each instead of T small ones.
  const auto empty = [&] { return at::empty({0}, options); };
  const InputAndWeightGrads grads = input_and_weight_grads(
      grad_preactivations, input, output_mask[4] ? previous_hidden_states(output, hx, steps, reverse) : at::Tensor(),
      weight_ih, output_mask);
  return {
      grads.input,
      output_mask[1] ? grad_hx : empty(),
      output_mask[2] ? grad_cx : empty(),
      grads.weight_ih,
      grads.weight_hh,
      grads.bias,
      weight_hr.has_value() ? transposed_products(grad_outputs, {hidden_before_projection(cell_states, gates)}).front()
                            : empty(),
  };
}

namespace {

// Every other device: sequence_forward's kernel for that device, without the states.
SequenceInferenceOutputs sequence_inference_loop(
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    const std::optional<at::Tensor>& weight_hr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::sequence_forward", "")
                       .typed<SequenceForwardOutputs(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
  const auto [output, hy, cy, cell_states, gates] =
      op.call(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
  return {output, hy, cy};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("sequence_forward", &sequence_forward_loop);
  m.impl("sequence_backward", &sequence_backward_loop);
  m.impl("sequence_inference", &sequence_inference_loop);
}

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("sequence_inference", &sequence_inference_cpu);
}

}  // namespace lstm_fused
