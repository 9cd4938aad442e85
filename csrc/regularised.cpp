// The regularised LSTM layer (issue 16): layer normalisation, zoneout and recurrent dropout over a
// whole sequence, one layer and direction, forward loop and backpropagation through time. Weight
// drop needs nothing here: the caller passes the dropped W_hh (one elementwise product per call,
// which autograd differentiates).
//
// One step, h-bar = h_{t-1} * m_r (recurrent dropout) and W the weight_hh given:
//   a = LN(x W_ih^T; g_ih) + LN(h-bar W^T; g_hh) + b_ih + b_hh   (without layer norm: no LN)
//   c~ = f c_{t-1} + i g,  h~ = o tanh(LN(c~; g_c, b_c))        (without layer norm: tanh(c~))
//   c_t = d_c c_{t-1} + (1 - d_c) c~,  h_t = d_h h_{t-1} + (1 - d_h) h~
// d_c, d_h: the zoneout masks' rows (training) or the zoneout probabilities (evaluation).
//
// The loop is sequence.cpp's: products through matmul.h, then one pass per step of the device op
// regularised_pointwise_ (forward) or regularised_gate_grads_ (backward), whose kernels are
// csrc/cpu/regularised_cell.cpp (CPU: float32, float64) and csrc/cuda/regularised.cu (CUDA: also
// float16, bfloat16). Devices and dtypes without those kernels (the CPU's float16 and bfloat16,
// other devices) run the differentiable composite of autograd.cpp instead. Layout: PackedSequence's, as sequence.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "cpu/regularised_sequence.h"
#include "matmul.h"
#include "ops.h"
#include "regularised.h"

namespace lstm_fused {

namespace {

using Step = cpu::RecurrenceStep;

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor defined_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

std::optional<at::Tensor> rows_of(const std::optional<at::Tensor>& t, int64_t offset, int64_t rows) {
  return t.has_value() ? std::optional<at::Tensor>(t->narrow(0, offset, rows)) : std::nullopt;
}

std::vector<at::Tensor> tensor_args(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const std::optional<at::Tensor>& recurrent_dropout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask) {
  return {input, batch_sizes, hx, cx, weight_ih, weight_hh, defined_or_undefined(bias_ih),
          defined_or_undefined(bias_hh), defined_or_undefined(layer_norm_ih), defined_or_undefined(layer_norm_hh),
          defined_or_undefined(layer_norm_cell_weight), defined_or_undefined(layer_norm_cell_bias),
          defined_or_undefined(recurrent_dropout_mask), defined_or_undefined(zoneout_cell_mask),
          defined_or_undefined(zoneout_hidden_mask)};
}

void check_zoneout(double zoneout, const char* name) {
  TORCH_CHECK(
      zoneout >= 0.0 && zoneout <= 1.0, "lstm_fused: ", name, " must be a probability in [0, 1], got ", zoneout);
}

using RegularisedOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                      at::Tensor, at::Tensor, at::Tensor>;

RegularisedOutputs as_tuple(const std::vector<at::Tensor>& o) {
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

void dispatch_regularised_pointwise_(
    at::Tensor& input_part, at::Tensor& hidden_part, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    at::Tensor& gates, at::Tensor& hy, at::Tensor& cy, at::Tensor& normalized_cell, at::Tensor& layer_norm_rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::regularised_pointwise_", "")
                       .typed<void(at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, double, at::Tensor&, at::Tensor&,
                                   at::Tensor&, at::Tensor&, at::Tensor&)>();
  op.call(input_part, hidden_part, bias, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight, layer_norm_cell_bias,
          hx, cx, zoneout_cell_mask, zoneout_hidden_mask, zoneout_cell, zoneout_hidden, gates, hy, cy, normalized_cell,
          layer_norm_rstd);
}

void dispatch_regularised_gate_grads_(
    at::Tensor& grad_hy, at::Tensor& grad_cy, const std::optional<at::Tensor>& grad_gates, const at::Tensor& gates,
    const at::Tensor& cx, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, at::Tensor& grad_preactivation, at::Tensor& grad_input_part,
    at::Tensor& grad_hidden_part, at::Tensor& grad_normalized_cell) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::regularised_gate_grads_", "")
                       .typed<void(at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, double, at::Tensor&, at::Tensor&,
                                   at::Tensor&, at::Tensor&)>();
  op.call(grad_hy, grad_cy, grad_gates, gates, cx, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
          layer_norm_cell_bias, input_part, hidden_part, normalized_cell, layer_norm_rstd, zoneout_cell_mask,
          zoneout_hidden_mask, zoneout_cell, zoneout_hidden, grad_preactivation, grad_input_part, grad_hidden_part,
          grad_normalized_cell);
}

// float32 batches of at most 64 on a CPU with vector kernels run the fused recurrence of
// cpu/regularised_sequence.h, as plain lf.LSTM's run cpu/small_batch.h's (sequence.cpp). CUDA
// tensors run the loop with the CUDA kernels.
bool takes_fused_recurrence(const at::Tensor& input, const at::Tensor& hx) {
  return input.device().is_cpu() && input.scalar_type() == at::kFloat &&
         cpu::small_batch::handles_sequence(hx.size(0));
}

// The threads of plain lf.LSTM's recurrence at this size (sequence.cpp's rule).
int fused_threads(int64_t batch, int64_t hidden_size) {
  return cpu::small_batch::threads_for(batch * 4 * hidden_size * hidden_size, at::get_num_threads());
}

// The fused recurrence's view of one layer and direction's options, holding the contiguous
// tensors it points into.
struct FusedOptions {
  std::vector<at::Tensor> held;
  cpu::regularised::Options options;

  FusedOptions(const std::vector<Step>& steps, int64_t hidden_size, const std::optional<at::Tensor>& layer_norm_ih,
               const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
               const std::optional<at::Tensor>& layer_norm_cell_bias,
               const std::optional<at::Tensor>& recurrent_dropout_mask,
               const std::optional<at::Tensor>& zoneout_cell_mask,
               const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden) {
    const auto data = [&](const std::optional<at::Tensor>& t) -> const float* {
      held.push_back(contiguous_or_undefined(t));
      return data_or_null<float>(held.back());
    };
    options = {steps.data(), static_cast<int64_t>(steps.size()), hidden_size, data(layer_norm_ih),
               data(layer_norm_hh), data(layer_norm_cell_weight), data(layer_norm_cell_bias),
               data(recurrent_dropout_mask), data(zoneout_cell_mask), data(zoneout_hidden_mask),
               static_cast<float>(zoneout_cell), static_cast<float>(zoneout_hidden)};
  }
};

// The forward through the fused recurrence: the input's product for every step at once, the
// recurrent weight packed once, then one kernel call for the whole sequence.
RegularisedOutputs fused_forward(
    const at::Tensor& input, const std::vector<Step>& steps, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias,
    const FusedOptions& fused) {
  namespace small_batch = cpu::small_batch;
  const bool layer_norm = fused.options.layer_norm_ih != nullptr;
  const int64_t total_rows = input.size(0), hidden_size = weight_hh.size(1), batch = hx.size(0);
  const auto options = input.options();
  const at::Tensor weight_hh_c = weight_hh.contiguous();
  at::Tensor gate_panels = at::empty({small_batch::gate_panels_size(hidden_size, hidden_size)}, options);
  small_batch::pack_gate_panels(weight_hh_c.const_data_ptr<float>(), hidden_size, hidden_size,
                                gate_panels.mutable_data_ptr<float>());
  // Without layer norm the recurrent product adds to x W_ih^T + both biases; with it, the two
  // products are normalised apart and kept for backward.
  at::Tensor input_part = layer_norm ? linear_product(input, weight_ih, std::nullopt).contiguous()
                                     : at::empty({0, 4 * hidden_size}, options);
  at::Tensor hidden_part = new_output({layer_norm ? total_rows : 0, 4 * hidden_size}, options);
  at::Tensor gates = layer_norm ? new_output({total_rows, 4 * hidden_size}, options)
                                : linear_product(input, weight_ih, bias).contiguous();
  at::Tensor output = new_output({total_rows, hidden_size}, options);
  at::Tensor cell_states = new_output({total_rows, hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  at::Tensor normalized_cell = new_output({layer_norm ? total_rows : 0, hidden_size}, options);
  at::Tensor layer_norm_rstd = new_output({layer_norm ? total_rows : 0, 3}, options);
  // Every row's h * m_r, then h_0 * m_r: what the recurrent products read.
  at::Tensor masked_hidden;
  if (fused.options.recurrent_dropout_mask != nullptr) {
    masked_hidden = new_output({total_rows + batch, hidden_size}, options);
    at::Tensor masked_hx = masked_hidden.narrow(0, total_rows, batch);
    at::mul_out(masked_hx, hx, fused.held[4]);  // held[4]: the mask, contiguous
  }
  const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous();
  const at::Tensor bias_c = contiguous_or_undefined(bias);
  cpu::regularised::sequence_forward(
      {fused.options, gate_panels.const_data_ptr<float>(), data_or_null<float>(bias_c), hx_c.const_data_ptr<float>(),
       cx_c.const_data_ptr<float>(), mutable_data_or_null<float>(input_part), mutable_data_or_null<float>(hidden_part),
       gates.mutable_data_ptr<float>(), output.mutable_data_ptr<float>(), cell_states.mutable_data_ptr<float>(),
       hy.mutable_data_ptr<float>(), cy.mutable_data_ptr<float>(), mutable_data_or_null<float>(normalized_cell),
       mutable_data_or_null<float>(layer_norm_rstd), mutable_data_or_null<float>(masked_hidden)},
      fused_threads(batch, hidden_size));
  return {output, hy, cy, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd};
}

RegularisedOutputs regularised_sequence_forward(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const std::optional<at::Tensor>& recurrent_dropout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, bool reverse) {
  const std::vector<at::Tensor> args = tensor_args(
      input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
      layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask);
  const std::vector<int64_t> sizes = check_regularised_args(args);
  check_zoneout(zoneout_cell, "zoneout_cell");
  check_zoneout(zoneout_hidden, "zoneout_hidden");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (!regularised_has_fused_kernel(input)) {
    return as_tuple(regularised_sequence_composite(args, zoneout_cell, zoneout_hidden, reverse));
  }
  const bool layer_norm = layer_norm_ih.has_value();
  const int64_t total_rows = input.size(0), hidden_size = weight_hh.size(1), batch = hx.size(0);
  const auto options = input.options();

  // Both biases enter the pre-activation after the normalisations: one sum, once per call.
  std::optional<at::Tensor> bias;
  if (bias_ih.has_value() && bias_hh.has_value()) {
    bias = *bias_ih + *bias_hh;
  } else if (bias_ih.has_value() || bias_hh.has_value()) {
    bias = bias_ih.has_value() ? *bias_ih : *bias_hh;
  }
  if (takes_fused_recurrence(input, hx)) {
    const std::vector<Step> steps = visiting_order(sizes, reverse);
    const FusedOptions fused(steps, hidden_size, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                             layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask,
                             zoneout_cell, zoneout_hidden);
    return fused_forward(input, steps, hx, cx, weight_ih, weight_hh, bias, fused);
  }
  // Every step's input product at once; with layer norm it is normalised in place and kept.
  at::Tensor input_part = linear_product(input, weight_ih, std::nullopt).contiguous();
  // With layer norm every step's recurrent product is kept (normalised) for backward; without, one
  // step's scratch will do.
  at::Tensor hidden_part = layer_norm ? new_output({total_rows, 4 * hidden_size}, options)
                                      : new_output({batch, 4 * hidden_size}, options);
  at::Tensor output = new_output({total_rows, hidden_size}, options);
  at::Tensor cell_states = new_output({total_rows, hidden_size}, options);
  at::Tensor gates = new_output({total_rows, 4 * hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  at::Tensor normalized_cell = new_output({layer_norm ? total_rows : 0, hidden_size}, options);
  at::Tensor layer_norm_rstd = new_output({layer_norm ? total_rows : 0, 3}, options);
  at::Tensor masked_hidden = recurrent_dropout_mask.has_value() ? new_output({batch, hidden_size}, options) : at::Tensor();
  at::Tensor unused = at::empty({0}, options);

  const std::vector<Step> steps = visiting_order(sizes, reverse);
  const at::Tensor recurrent_weight = prepare_repeated_weight(weight_hh, batch, static_cast<int64_t>(sizes.size()));
  for (const Step& step : steps) {
    const at::Tensor h_prev = previous_rows(output, hx, step);
    const at::Tensor c_prev = previous_rows(cell_states, cx, step);
    at::Tensor h_bar = h_prev;
    if (recurrent_dropout_mask.has_value()) {
      h_bar = masked_hidden.narrow(0, 0, step.batch);
      at::mul_out(h_bar, h_prev, recurrent_dropout_mask->narrow(0, 0, step.batch));
    }
    at::Tensor step_hidden_part = hidden_part.narrow(0, layer_norm ? step.offset : 0, step.batch);
    linear_product_into(step_hidden_part, h_bar, recurrent_weight, /*accumulate=*/false);
    at::Tensor step_input_part = input_part.narrow(0, step.offset, step.batch);
    at::Tensor step_gates = gates.narrow(0, step.offset, step.batch);
    at::Tensor step_hidden = output.narrow(0, step.offset, step.batch);
    at::Tensor step_cell = cell_states.narrow(0, step.offset, step.batch);
    at::Tensor step_normalized = layer_norm ? normalized_cell.narrow(0, step.offset, step.batch) : unused;
    at::Tensor step_rstd = layer_norm ? layer_norm_rstd.narrow(0, step.offset, step.batch) : unused;
    dispatch_regularised_pointwise_(
        step_input_part, step_hidden_part, bias, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
        layer_norm_cell_bias, h_prev, c_prev, rows_of(zoneout_cell_mask, step.offset, step.batch),
        rows_of(zoneout_hidden_mask, step.offset, step.batch), zoneout_cell, zoneout_hidden, step_gates, step_hidden,
        step_cell, step_normalized, step_rstd);
    const int64_t ending_rows = step.batch - step.ending;
    if (ending_rows > 0) {
      hy.narrow(0, step.ending, ending_rows).copy_(step_hidden.narrow(0, step.ending, ending_rows));
      cy.narrow(0, step.ending, ending_rows).copy_(step_cell.narrow(0, step.ending, ending_rows));
    }
  }
  if (!layer_norm) {
    // Scratch: backward does not read them.
    input_part = at::empty({0, 4 * hidden_size}, options);
    hidden_part = at::empty({0, 4 * hidden_size}, options);
  }
  return {output, hy, cy, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd};
}

using RegularisedGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                    at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

RegularisedGrads regularised_sequence_backward(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy, const std::optional<at::Tensor>& grad_cell_states,
    const std::optional<at::Tensor>& grad_gates, const at::Tensor& input, const at::Tensor& batch_sizes,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const std::optional<at::Tensor>& recurrent_dropout_mask, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    const at::Tensor& output, const at::Tensor& cell_states, const at::Tensor& gates, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd, bool reverse,
    std::array<bool, 3> output_mask) {
  const std::vector<int64_t> sizes = check_regularised_args(tensor_args(
      input, batch_sizes, hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt, layer_norm_ih, layer_norm_hh,
      layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask));
  TORCH_CHECK(
      regularised_has_fused_kernel(input),
      "lstm_fused::regularised_sequence_backward has kernels for float32 and float64 CPU tensors and float32, "
      "float64, float16 and bfloat16 CUDA tensors only, got ",
      input.scalar_type(), " on ", input.device(), "; elsewhere the forward runs as differentiable ATen ops");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool layer_norm = layer_norm_ih.has_value();
  const int64_t total_rows = input.size(0), hidden_size = weight_hh.size(1), batch = hx.size(0);
  const auto options = input.options();
  for (const auto& [saved, name, rows, width] :
       {std::tuple<const at::Tensor&, const char*, int64_t, int64_t>{output, "output", total_rows, hidden_size},
        {cell_states, "cell_states", total_rows, hidden_size},
        {gates, "gates", total_rows, 4 * hidden_size},
        {input_part, "input_part", layer_norm ? total_rows : 0, 4 * hidden_size},
        {hidden_part, "hidden_part", layer_norm ? total_rows : 0, 4 * hidden_size},
        {normalized_cell, "normalized_cell", layer_norm ? total_rows : 0, hidden_size},
        {layer_norm_rstd, "layer_norm_rstd", layer_norm ? total_rows : 0, 3}}) {
    TORCH_CHECK(
        saved.sizes() == at::IntArrayRef({rows, width}),
        "lstm_fused: ", name, " must have shape [", rows, ", ", width, "] (as regularised_sequence_forward returns it), got ",
        saved.sizes());
  }
  for (const auto& [grad, name, width] :
       {std::tuple<const std::optional<at::Tensor>&, const char*, int64_t>{grad_output, "grad_output", hidden_size},
        {grad_cell_states, "grad_cell_states", hidden_size},
        {grad_gates, "grad_gates", 4 * hidden_size}}) {
    TORCH_CHECK(
        !grad.has_value() || grad->sizes() == at::IntArrayRef({total_rows, width}),
        "lstm_fused: ", name, " must have shape [", total_rows, ", ", width, "], got ", grad->sizes());
  }
  for (const auto& [grad, name] :
       {std::pair<const std::optional<at::Tensor>&, const char*>{grad_hy, "grad_hy"}, {grad_cy, "grad_cy"}}) {
    TORCH_CHECK(
        !grad.has_value() || grad->sizes() == hx.sizes(),
        "lstm_fused: ", name, " must have shape ", hx.sizes(), ", got ", grad->sizes());
  }

  // The gradient reaching each running sequence's h and c at the step being visited.
  at::Tensor grad_hidden = new_output({batch, hidden_size}, options);
  at::Tensor grad_cell = new_output({batch, hidden_size}, options);
  at::Tensor grad_hx = new_output({batch, hidden_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);
  // Every step's gate pre-activation gradients; with layer norm also those of the two products
  // (before their normalisations) and of the cell normalisation's output, for the reductions and
  // products over all steps at the end. Without, the products' gradients are the pre-activations'.
  at::Tensor grad_preactivations = new_output({total_rows, 4 * hidden_size}, options);
  at::Tensor grad_input_parts = layer_norm ? new_output({total_rows, 4 * hidden_size}, options) : grad_preactivations;
  at::Tensor grad_hidden_parts = layer_norm ? new_output({total_rows, 4 * hidden_size}, options) : grad_preactivations;
  at::Tensor grad_normalized_cell = layer_norm ? new_output({total_rows, hidden_size}, options) : at::Tensor();
  at::Tensor grad_masked_hidden =
      recurrent_dropout_mask.has_value() ? new_output({batch, hidden_size}, options) : at::Tensor();
  at::Tensor unused = at::empty({0}, options);
  const at::Tensor weight_hh_t = weight_hh.t();

  const std::vector<Step> steps = visiting_order(sizes, reverse);
  const bool fused = takes_fused_recurrence(input, hx);
  // With layer norm, the fused recurrence's sums for the normalisations' parameters: [10 H].
  at::Tensor layer_norm_grads;
  // Every row's h-bar, the rows that multiplied W_hh: the fused recurrence writes them as it goes.
  at::Tensor masked_hidden = output_mask[2] ? new_output({total_rows, hidden_size}, options) : at::Tensor();
  if (fused) {
    namespace small_batch = cpu::small_batch;
    const FusedOptions fused_options(steps, hidden_size, layer_norm_ih, layer_norm_hh, layer_norm_cell_weight,
                                     layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask,
                                     zoneout_hidden_mask, zoneout_cell, zoneout_hidden);
    const at::Tensor weight_hh_c = weight_hh.contiguous();
    at::Tensor unit_panels = at::empty({small_batch::unit_panels_size(4 * hidden_size, hidden_size)}, options);
    small_batch::pack_unit_panels(weight_hh_c.const_data_ptr<float>(), 4 * hidden_size, hidden_size,
                                  unit_panels.mutable_data_ptr<float>());
    const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous(), output_c = output.contiguous();
    const at::Tensor cell_states_c = cell_states.contiguous(), gates_c = gates.contiguous();
    const at::Tensor input_part_c = input_part.contiguous(), hidden_part_c = hidden_part.contiguous();
    const at::Tensor normalized_cell_c = normalized_cell.contiguous(), rstd_c = layer_norm_rstd.contiguous();
    const at::Tensor grad_output_c = contiguous_or_undefined(grad_output);
    const at::Tensor grad_cell_states_c = contiguous_or_undefined(grad_cell_states);
    const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
    const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy), grad_cy_c = contiguous_or_undefined(grad_cy);
    const int threads = fused_threads(batch, hidden_size);
    at::Tensor layer_norm_grad_sums = layer_norm ? at::zeros({threads, 10 * hidden_size}, options) : at::Tensor();
    cpu::regularised::sequence_backward(
        {fused_options.options, unit_panels.const_data_ptr<float>(), hx_c.const_data_ptr<float>(),
         cx_c.const_data_ptr<float>(), output_c.const_data_ptr<float>(), cell_states_c.const_data_ptr<float>(),
         gates_c.const_data_ptr<float>(), layer_norm ? input_part_c.const_data_ptr<float>() : nullptr,
         layer_norm ? hidden_part_c.const_data_ptr<float>() : nullptr,
         layer_norm ? normalized_cell_c.const_data_ptr<float>() : nullptr,
         layer_norm ? rstd_c.const_data_ptr<float>() : nullptr, data_or_null<float>(grad_output_c),
         data_or_null<float>(grad_cell_states_c), data_or_null<float>(grad_gates_c), data_or_null<float>(grad_hy_c),
         data_or_null<float>(grad_cy_c), grad_preactivations.mutable_data_ptr<float>(),
         layer_norm ? grad_input_parts.mutable_data_ptr<float>() : nullptr,
         layer_norm ? grad_hidden_parts.mutable_data_ptr<float>() : nullptr,
         mutable_data_or_null<float>(grad_normalized_cell), grad_hx.mutable_data_ptr<float>(),
         grad_cx.mutable_data_ptr<float>(), grad_hidden.mutable_data_ptr<float>(), grad_cell.mutable_data_ptr<float>(),
         mutable_data_or_null<float>(grad_masked_hidden), mutable_data_or_null<float>(masked_hidden),
         mutable_data_or_null<float>(layer_norm_grad_sums)},
        threads);
    if (layer_norm) {
      layer_norm_grads = layer_norm_grad_sums.sum(0);
    }
  }
  for (auto step_it = steps.rbegin(); !fused && step_it != steps.rend(); ++step_it) {
    const Step& step = *step_it;
    add_incoming_grads(step, grad_output, grad_hy, grad_cy, grad_cell_states, grad_hidden, grad_cell);
    at::Tensor step_grad_hidden = grad_hidden.narrow(0, 0, step.batch);
    at::Tensor step_grad_cell = grad_cell.narrow(0, 0, step.batch);
    const auto rows = [&](const at::Tensor& t) { return layer_norm ? t.narrow(0, step.offset, step.batch) : unused; };
    at::Tensor step_grad_preactivation = grad_preactivations.narrow(0, step.offset, step.batch);
    at::Tensor step_grad_input_part = rows(grad_input_parts);
    at::Tensor step_grad_hidden_part = rows(grad_hidden_parts);
    at::Tensor step_grad_normalized = layer_norm ? grad_normalized_cell.narrow(0, step.offset, step.batch) : unused;
    // In place: step_grad_hidden becomes d_h * grad h_t, step_grad_cell grad c_{t-1}.
    dispatch_regularised_gate_grads_(
        step_grad_hidden, step_grad_cell, rows_of(grad_gates, step.offset, step.batch),
        gates.narrow(0, step.offset, step.batch), previous_rows(cell_states, cx, step), layer_norm_ih, layer_norm_hh,
        layer_norm_cell_weight, layer_norm_cell_bias, rows(input_part), rows(hidden_part), rows(normalized_cell),
        rows(layer_norm_rstd), rows_of(zoneout_cell_mask, step.offset, step.batch),
        rows_of(zoneout_hidden_mask, step.offset, step.batch), zoneout_cell, zoneout_hidden, step_grad_preactivation,
        step_grad_input_part, step_grad_hidden_part, step_grad_normalized);
    const at::Tensor step_grad_recurrent = grad_hidden_parts.narrow(0, step.offset, step.batch);
    if (recurrent_dropout_mask.has_value()) {
      at::Tensor grad_h_bar = grad_masked_hidden.narrow(0, 0, step.batch);
      linear_product_into(grad_h_bar, step_grad_recurrent, weight_hh_t, /*accumulate=*/false);
      step_grad_hidden.addcmul_(grad_h_bar, recurrent_dropout_mask->narrow(0, 0, step.batch));
    } else {
      linear_product_into(step_grad_hidden, step_grad_recurrent, weight_hh_t, /*accumulate=*/true);
    }
    const int64_t starting_rows = step.batch - step.carried;
    if (starting_rows > 0) {
      grad_hx.narrow(0, step.carried, starting_rows).copy_(step_grad_hidden.narrow(0, step.carried, starting_rows));
      grad_cx.narrow(0, step.carried, starting_rows).copy_(step_grad_cell.narrow(0, step.carried, starting_rows));
    }
  }

  const auto empty = [&] { return at::empty({0}, options); };
  at::Tensor grad_input = output_mask[0] ? linear_product(grad_input_parts, weight_ih.t(), std::nullopt) : empty();
  at::Tensor grad_weight_ih = empty(), grad_weight_hh = empty();
  bool have_grad_weight_ih = false;
  if (output_mask[2]) {
    for (const Step& step : fused ? std::vector<Step>() : steps) {
      at::Tensor rows = masked_hidden.narrow(0, step.offset, step.batch);
      if (recurrent_dropout_mask.has_value()) {
        at::mul_out(rows, previous_rows(output, hx, step), recurrent_dropout_mask->narrow(0, 0, step.batch));
      } else {
        rows.copy_(previous_rows(output, hx, step));
      }
    }
    if (output_mask[1] && !layer_norm) {
      const std::vector<at::Tensor> products = transposed_products(grad_preactivations, {input, masked_hidden});
      grad_weight_ih = products[0];
      grad_weight_hh = products[1];
      have_grad_weight_ih = true;
    } else {
      grad_weight_hh = transposed_products(grad_hidden_parts, {masked_hidden})[0];
    }
  }
  if (output_mask[1] && !have_grad_weight_ih) {
    grad_weight_ih = transposed_products(grad_input_parts, {input})[0];
  }
  at::Tensor grad_bias = grad_preactivations.sum(0);
  if (!layer_norm) {
    return {grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, empty(), empty(), empty(), empty()};
  }
  if (layer_norm_grads.defined()) {
    const int64_t width = 4 * hidden_size;
    return {grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias,
            layer_norm_grads.narrow(0, 0, width).clone(), layer_norm_grads.narrow(0, width, width).clone(),
            layer_norm_grads.narrow(0, 2 * width, hidden_size).clone(),
            layer_norm_grads.narrow(0, 2 * width + hidden_size, hidden_size).clone()};
  }
  // The normalisations' scales and shift: reductions over every row.
  return {grad_input,
          grad_hx,
          grad_cx,
          grad_weight_ih,
          grad_weight_hh,
          grad_bias,
          (grad_preactivations * input_part).sum(0),
          (grad_preactivations * hidden_part).sum(0),
          (grad_normalized_cell * normalized_cell).sum(0),
          grad_normalized_cell.sum(0)};
}

}  // namespace

// The CPU kernels (cpu/regularised_cell.cpp) take float32 and float64; the CUDA ones
// (cuda/regularised.cu) also float16 and bfloat16, computing in float.
bool regularised_has_fused_kernel(const at::Tensor& input) {
  const at::ScalarType dtype = input.scalar_type();
  const bool float_or_double = dtype == at::kFloat || dtype == at::kDouble;
  if (input.device().is_cpu()) {
    return float_or_double;
  }
  return input.device().is_cuda() && (float_or_double || dtype == at::kHalf || dtype == at::kBFloat16);
}

std::vector<int64_t> check_regularised_args(const std::vector<at::Tensor>& args) {
  const at::Tensor& input = args[kInput];
  const std::vector<int64_t> sizes = check_sequence_forward_args(
      input, args[kBatchSizes], args[kHx], args[kCx], args[kWeightIh], args[kWeightHh], optional(args[kBiasIh]),
      optional(args[kBiasHh]), /*weight_hr=*/std::nullopt);
  const int64_t hidden_size = args[kWeightHh].size(1), rows = input.size(0), batch = args[kHx].size(0);
  const bool layer_norm = args[kLayerNormIh].defined();
  struct Expected {
    RegularisedArg index;
    const char* name;
    std::vector<int64_t> shape;
    const char* meaning;
  };
  const Expected expected[] = {
      {kLayerNormIh, "layer_norm_ih", {4 * hidden_size}, "(4 * hidden_size)"},
      {kLayerNormHh, "layer_norm_hh", {4 * hidden_size}, "(4 * hidden_size)"},
      {kLayerNormCellWeight, "layer_norm_cell_weight", {hidden_size}, "(hidden_size)"},
      {kLayerNormCellBias, "layer_norm_cell_bias", {hidden_size}, "(hidden_size)"},
      {kRecurrentDropoutMask, "recurrent_dropout_mask", {batch, hidden_size}, "(batch, hidden_size)"},
      {kZoneoutCellMask, "zoneout_cell_mask", {rows, hidden_size}, "(rows of input, hidden_size)"},
      {kZoneoutHiddenMask, "zoneout_hidden_mask", {rows, hidden_size}, "(rows of input, hidden_size)"},
  };
  for (const Expected& e : expected) {
    const at::Tensor& t = args[e.index];
    if (e.index <= kLayerNormCellBias) {
      TORCH_CHECK(
          t.defined() == layer_norm,
          "lstm_fused: layer_norm_ih, layer_norm_hh, layer_norm_cell_weight and layer_norm_cell_bias must be given "
          "together or not at all; ", e.name, (t.defined() ? " was given without layer_norm_ih" : " is missing"));
    }
    if (!t.defined()) {
      continue;
    }
    TORCH_CHECK(
        t.scalar_type() == input.scalar_type() && t.device() == input.device(),
        "lstm_fused: ", e.name, " has dtype ", t.scalar_type(), " on ", t.device(), " but input has dtype ",
        input.scalar_type(), " on ", input.device(), "; all tensors of an LSTM layer must share one dtype and device");
    TORCH_CHECK(
        t.sizes() == at::IntArrayRef(e.shape),
        "lstm_fused: ", e.name, " must have shape ", at::IntArrayRef(e.shape), " ", e.meaning, ", got ", t.sizes());
  }
  return sizes;
}

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // One layer and direction of the regularised LSTM over a sequence, in sequence_forward's
  // layout. The layer-norm tensors come all four or none; a mask absent means that option is off,
  // except zoneout, where an absent mask means evaluation: the probability zoneout_cell (or
  // zoneout_hidden) itself weighs the old state. input_part, hidden_part (the products, normalised),
  // normalized_cell and layer_norm_rstd are what backward needs of layer norm: [0, ...] without it.
  m.def(
      "regularised_sequence_forward(Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? layer_norm_ih, Tensor? layer_norm_hh, "
      "Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, Tensor? recurrent_dropout_mask, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "bool reverse) -> (Tensor output, Tensor hy, Tensor cy, Tensor cell_states, Tensor gates, Tensor input_part, "
      "Tensor hidden_part, Tensor normalized_cell, Tensor layer_norm_rstd)");
  // Backpropagation through time for it; output_mask: grad_input, grad_weight_ih, grad_weight_hh.
  m.def(
      "regularised_sequence_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, "
      "Tensor? grad_cell_states, Tensor? grad_gates, Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, "
      "Tensor weight_ih, Tensor weight_hh, Tensor? layer_norm_ih, Tensor? layer_norm_hh, "
      "Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, Tensor? recurrent_dropout_mask, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "Tensor output, Tensor cell_states, Tensor gates, Tensor input_part, Tensor hidden_part, "
      "Tensor normalized_cell, Tensor layer_norm_rstd, bool reverse, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_layer_norm_ih, Tensor grad_layer_norm_hh, Tensor grad_layer_norm_cell_weight, "
      "Tensor grad_layer_norm_cell_bias)");
  // The step's pointwise pass after its two products (input_part, hidden_part: [batch, 4 * hidden],
  // normalised in place with layer norm); hx, cx the states it starts from. Writes the activated
  // gates, hy, cy, and with layer norm the normalised c-tilde and the three 1 / std of each row.
  m.def(
      "regularised_pointwise_(Tensor(a!) input_part, Tensor(b!) hidden_part, Tensor? bias, Tensor? layer_norm_ih, "
      "Tensor? layer_norm_hh, Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, Tensor hx, Tensor cx, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "Tensor(c!) gates, Tensor(d!) hy, Tensor(e!) cy, Tensor(f!) normalized_cell, Tensor(g!) layer_norm_rstd) -> ()");
  // Its backward: grad_hy becomes d_h * grad_hy, grad_cy the gradient of cx; writes the gate
  // pre-activations' gradient, and with layer norm those of both products and of LN(c-tilde).
  m.def(
      "regularised_gate_grads_(Tensor(a!) grad_hy, Tensor(b!) grad_cy, Tensor? grad_gates, Tensor gates, Tensor cx, "
      "Tensor? layer_norm_ih, Tensor? layer_norm_hh, Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, "
      "Tensor input_part, Tensor hidden_part, Tensor normalized_cell, Tensor layer_norm_rstd, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "Tensor(c!) grad_preactivation, Tensor(d!) grad_input_part, Tensor(e!) grad_hidden_part, "
      "Tensor(f!) grad_normalized_cell) -> ()");
}

TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("regularised_sequence_forward", &regularised_sequence_forward);
  m.impl("regularised_sequence_backward", &regularised_sequence_backward);
}

}  // namespace lstm_fused
