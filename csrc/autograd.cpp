// Autograd for cell_forward and sequence_forward, in C++: a training step crosses no Python between
// the forward op and its hand-written backward (at batch 1 that Python was over half of
// nn.LSTMCell's whole step).
#include <algorithm>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "ops.h"
#include "regularised.h"

namespace lstm_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using CellForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&);

// Which of a Function's tensor arguments (undefined where an optional one was absent) want a
// gradient. needs_input_grad counts only the tensors that were passed, so an absent bias shifts the
// rest.
template <size_t N>
std::array<bool, N> inputs_needing_grad(AutogradContext* ctx, const variable_list& inputs) {
  std::array<bool, N> needs{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) {
    if (inputs[i].defined()) {
      needs[i] = ctx->needs_input_grad(edge++);
    }
  }
  return needs;
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The step rebuilt from differentiable ATen ops. Used only under create_graph=True (double
// backward), where the fused kernels, which autograd cannot see into, will not do.
variable_list composite_cell(const variable_list& in) {
  const auto& [input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh] =
      std::tie(in[0], in[1], in[2], in[3], in[4], in[5], in[6]);
  const auto preactivation = at::linear(input, weight_ih, optional(bias_ih)) + at::linear(hx, weight_hh, optional(bias_hh));
  const auto chunks = preactivation.chunk(4, 1);
  const auto input_gate = chunks[0].sigmoid();
  const auto forget_gate = chunks[1].sigmoid();
  const auto cell_gate = chunks[2].tanh();
  const auto output_gate = chunks[3].sigmoid();
  const auto cy = forget_gate * cx + input_gate * cell_gate;
  return {output_gate * cy.tanh(), cy, at::cat({input_gate, forget_gate, cell_gate, output_gate}, 1)};
}

// sequence_forward rebuilt from composite_cell steps (each followed by the projection where
// weight_hr, in[8], is defined), outputs in its order (output, hy, cy, cell_states, gates). For
// double backward and for the transforms below, never for speed.
variable_list composite_sequence(const variable_list& in, bool reverse) {
  const auto& [input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr] =
      std::tie(in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], in[8]);
  const std::vector<int64_t> sizes = check_sequence_forward_args(
      input, batch_sizes, hx, cx, weight_ih, weight_hh, optional(bias_ih), optional(bias_hh), optional(weight_hr));
  // A step starts from the previous visited step's rows for the sequences that continue and from
  // hx, cx for those that begin there (all of them at the first step; reversed, some at a step
  // where the batch grows).
  const auto starting = [](const at::Tensor& previous, const at::Tensor& initial, const cpu::RecurrenceStep& step) {
    if (step.carried == 0) {
      return initial.narrow(0, 0, step.batch);
    }
    if (step.carried == step.batch) {
      return previous.narrow(0, 0, step.batch);
    }
    return at::cat({previous.narrow(0, 0, step.carried), initial.narrow(0, step.carried, step.batch - step.carried)});
  };
  std::vector<at::Tensor> hidden, cell, gates;  // in visiting order
  std::vector<std::pair<int64_t, at::Tensor>> last_hidden, last_cell;  // (first row, rows ending there)
  at::Tensor h, c;  // the previous visited step's states
  for (const cpu::RecurrenceStep& step : visiting_order(sizes, reverse)) {
    const variable_list outputs = composite_cell({input.narrow(0, step.offset, step.batch), starting(h, hx, step),
                                                  starting(c, cx, step), weight_ih, weight_hh, bias_ih, bias_hh});
    h = weight_hr.defined() ? at::linear(outputs[0], weight_hr) : outputs[0];
    c = outputs[1];
    hidden.push_back(h);
    cell.push_back(c);
    gates.push_back(outputs[2]);
    last_hidden.emplace_back(step.ending, h.narrow(0, step.ending, step.batch - step.ending));
    last_cell.emplace_back(step.ending, c.narrow(0, step.ending, step.batch - step.ending));
  }
  // Packed rows are in time order.
  if (reverse) {
    std::reverse(hidden.begin(), hidden.end());
    std::reverse(cell.begin(), cell.end());
    std::reverse(gates.begin(), gates.end());
  }
  const auto by_row = [](std::vector<std::pair<int64_t, at::Tensor>> pieces) {
    std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<at::Tensor> rows;
    for (const auto& piece : pieces) {
      rows.push_back(piece.second);
    }
    return at::cat(rows);
  };
  return {at::cat(hidden), by_row(last_hidden), by_row(last_cell), at::cat(cell), at::cat(gates)};
}

// The gradients of a Function's inputs by differentiating its composite recomputation with
// create_graph=True, so that the gradients are themselves differentiable (double backward).
// needs says which inputs want one; the others come back undefined.
template <size_t N>
variable_list differentiable_backward(
    const variable_list& inputs,
    const variable_list& outputs,
    const variable_list& grad_outputs,
    const std::array<bool, N>& needs) {
  variable_list used_outputs, used_grads, wanted;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (grad_outputs[i].defined()) {
      used_outputs.push_back(outputs[i]);
      used_grads.push_back(grad_outputs[i]);
    }
  }
  for (size_t i = 0; i < N; ++i) {
    if (needs[i]) {
      wanted.push_back(inputs[i]);
    }
  }
  variable_list result(N);
  if (used_outputs.empty() || wanted.empty()) {
    return result;
  }
  const variable_list grads = torch::autograd::grad(
      used_outputs, wanted, used_grads, /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  size_t next = 0;
  for (size_t i = 0; i < N; ++i) {
    if (needs[i]) {
      result[i] = grads[next++];
    }
  }
  return result;
}

// torch.func's transforms (grad, vmap, jacrev, jacfwd, hessian) refuse a C++ autograd Function,
// and forward-mode AD cannot pass one: under either the ops run as their composites instead,
// whose ATen ops both support. A transform is active while functorch's front-mode key is in the
// thread's included keys (its DynamicLayer header is not usable from an extension). Forward AD
// outside torch.func has a single level, 0.
bool runs_composite(std::initializer_list<const at::Tensor*> tensors) {
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode)) {
    return true;
  }
  return std::any_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) {
    return t != nullptr && t->defined() && t->_fw_grad(/*level=*/0).defined();
  });
}

const at::Tensor* pointer_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? &*t : nullptr;
}

class CellFunction : public torch::autograd::Function<CellFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const at::Tensor& input,
      const at::Tensor& hx,
      const at::Tensor& cx,
      const at::Tensor& weight_ih,
      const at::Tensor& weight_hh,
      const std::optional<at::Tensor>& bias_ih,
      const std::optional<at::Tensor>& bias_hh) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_fused::cell_forward", "").typed<CellForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [hy, cy, gates] = op.call(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
    // An output nobody used arrives as an undefined gradient instead of a zero tensor to read.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {input, hx, cx, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()), bias_hh.value_or(at::Tensor()), cy, gates});
    return {hy, cy, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const variable_list inputs(saved.begin(), saved.begin() + 7);
    const at::Tensor& cy = saved[7];
    const at::Tensor& gates = saved[8];

    const auto needs = inputs_needing_grad<7>(ctx, inputs);

    if (at::GradMode::is_enabled()) {
      return differentiable_backward(inputs, composite_cell(inputs), grad_outputs, needs);
    }

    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lstm_fused::cell_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&,
                             const at::Tensor&,
                             const at::Tensor&,
                             const at::Tensor&,
                             const at::Tensor&,
                             const at::Tensor&,
                             const at::Tensor&,
                             const at::Tensor&,
                             std::array<bool, 6>)>();
    const std::array<bool, 6> output_mask{needs[0], needs[1], needs[2], needs[3], needs[4], needs[5] || needs[6]};
    // Grad mode is off here, so nothing needs recording: straight to the kernel, past the boxed
    // autograd fallback (a few microseconds of a batch-1 step).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias] = op.call(
        optional(grad_outputs[0]),
        optional(grad_outputs[1]),
        optional(grad_outputs[2]),
        inputs[0],
        inputs[1],
        inputs[2],
        cy,
        gates,
        inputs[3],
        inputs[4],
        output_mask);
    const variable_list grads{grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias};
    variable_list result(7);
    for (size_t i = 0; i < 7; ++i) {
      if (needs[i]) {
        result[i] = grads[i];
      }
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward_autograd(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  if (runs_composite({&input, &hx, &cx, &weight_ih, &weight_hh, pointer_or_null(bias_ih), pointer_or_null(bias_hh)})) {
    const auto outputs = composite_cell(
        {input, hx, cx, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()), bias_hh.value_or(at::Tensor())});
    return {outputs[0], outputs[1], outputs[2]};
  }
  const auto outputs = CellFunction::apply(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  return {outputs[0], outputs[1], outputs[2]};
}

using SequenceForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    bool,
    const std::optional<at::Tensor>&);

using SequenceGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using SequenceBackwardFn = SequenceGrads(
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    const at::Tensor&,
    bool,
    std::array<bool, 6>,
    const std::optional<at::Tensor>&);

// sequence_forward's autograd: backpropagation through time by the sequence_backward op. Saves
// only what that needs: the arguments, output, cell_states and the activated gates (the hidden
// state before a projection, o * tanh(c), follows from the last two).
class SequenceFunction : public torch::autograd::Function<SequenceFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
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
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_fused::sequence_forward", "").typed<SequenceForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, cell_states, gates] =
        op.call(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()),
         bias_hh.value_or(at::Tensor()), weight_hr.value_or(at::Tensor()), output, cell_states, gates});
    ctx->saved_data["reverse"] = reverse;
    return {output, hy, cy, cell_states, gates};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const variable_list inputs(saved.begin(), saved.begin() + 9);
    const auto& [input, batch_sizes, hx, cx, weight_ih, weight_hh, weight_hr] =
        std::tie(inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5], inputs[8]);
    const auto& [output, cell_states, gates] = std::tie(saved[9], saved[10], saved[11]);
    const auto needs = inputs_needing_grad<9>(ctx, inputs);
    // One per forward argument: the tensors in inputs' order, but reverse (index 8) before weight_hr.
    variable_list result(10);
    const auto set_results = [&](const variable_list& grads) {
      for (size_t i = 0; i < 9; ++i) {
        if (needs[i]) {
          result[i < 8 ? i : 9] = grads[i];
        }
      }
    };
    if (std::none_of(grad_outputs.begin(), grad_outputs.end(), [](const at::Tensor& g) { return g.defined(); })) {
      return result;
    }
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients autograd can differentiate again, through the composite.
      set_results(differentiable_backward(inputs, composite_sequence(inputs, reverse), grad_outputs, needs));
      return result;
    }
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_fused::sequence_backward", "").typed<SequenceBackwardFn>();
    const std::array<bool, 6> output_mask{needs[0], needs[2], needs[3], needs[4], needs[5], needs[6] || needs[7]};
    // Grad mode is off here: straight to the kernel, past the op's own autograd.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr] = op.call(
        optional(grad_outputs[0]),
        optional(grad_outputs[1]),
        optional(grad_outputs[2]),
        optional(grad_outputs[3]),
        optional(grad_outputs[4]),
        input,
        batch_sizes,
        hx,
        cx,
        weight_ih,
        weight_hh,
        output,
        cell_states,
        gates,
        reverse,
        output_mask,
        optional(weight_hr));
    // batch_sizes (index 1) has no gradient.
    set_results({grad_input, at::Tensor(), grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_bias,
                 grad_weight_hr});
    return result;
  }
};

// sequence_backward's own autograd, for a direct call of the op: none (lstm_fused.LSTM's double
// backward goes through composite_sequence instead). Refused where it is asked for.
class SequenceBackwardFunction : public torch::autograd::Function<SequenceBackwardFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
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
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("lstm_fused::sequence_backward", "").typed<SequenceBackwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto [grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr] = op.call(
        grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih, weight_hh,
        output, cell_states, gates, reverse, output_mask, weight_hr);
    return {grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(
        false,
        "lstm_fused::sequence_backward has no derivative: differentiate lstm_fused.LSTM (or the "
        "sequence_forward op) with create_graph=True instead, which backpropagates through a differentiable "
        "recomputation.");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_forward_autograd(
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
  if (runs_composite({&input, &hx, &cx, &weight_ih, &weight_hh, pointer_or_null(bias_ih), pointer_or_null(bias_hh),
                      pointer_or_null(weight_hr)})) {
    const auto outputs = composite_sequence(
        {input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()),
         bias_hh.value_or(at::Tensor()), weight_hr.value_or(at::Tensor())},
        reverse);
    return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4]};
  }
  const auto outputs =
      SequenceFunction::apply(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4]};
}

// sequence_inference: the op itself where no gradient can be asked of it; sequence_forward's autograd
// (and, under the torch.func transforms and forward-mode AD, its composite) otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_inference_autograd(
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
  const std::initializer_list<const at::Tensor*> tensors{
      &input, &hx, &cx, &weight_ih, &weight_hh, pointer_or_null(bias_ih), pointer_or_null(bias_hh),
      pointer_or_null(weight_hr)};
  const bool wants_grad = at::GradMode::is_enabled() && std::any_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) {
    return t != nullptr && t->defined() && t->requires_grad();
  });
  if (wants_grad || runs_composite(tensors)) {
    const auto [output, hy, cy, cell_states, gates] =
        sequence_forward_autograd(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
    return {output, hy, cy};
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::sequence_inference", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
}

SequenceGrads sequence_backward_autograd(
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
  const auto grads = SequenceBackwardFunction::apply(
      grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih, weight_hh,
      output, cell_states, gates, reverse, output_mask, weight_hr);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, Autograd, m) {
  m.impl("cell_forward", &cell_forward_autograd);
  m.impl("sequence_forward", &sequence_forward_autograd);
  m.impl("sequence_inference", &sequence_inference_autograd);
  m.impl("sequence_backward", &sequence_backward_autograd);
}

}  // namespace lstm_fused

// ---------------------------------------------------------------------------------------------
// The regularised LSTM layer (issue 16, csrc/regularised.cpp): its differentiable composite and
// its autograd, a hand-written backward through regularised_sequence_backward.

namespace lstm_fused {

std::vector<at::Tensor> regularised_sequence_composite(
    const std::vector<at::Tensor>& args, double zoneout_cell, double zoneout_hidden, bool reverse) {
  const std::vector<int64_t> sizes = check_regularised_args(args);
  const at::Tensor& input = args[kInput];
  const at::Tensor &hx = args[kHx], &cx = args[kCx], &weight_hh = args[kWeightHh];
  const at::Tensor &bias_ih = args[kBiasIh], &bias_hh = args[kBiasHh];
  const at::Tensor& recurrent_dropout_mask = args[kRecurrentDropoutMask];
  const at::Tensor &zoneout_cell_mask = args[kZoneoutCellMask], &zoneout_hidden_mask = args[kZoneoutHiddenMask];
  const bool layer_norm = args[kLayerNormIh].defined();
  const int64_t hidden_size = weight_hh.size(1);
  // (v - mean) / sqrt(var + eps) over the features, biased variance, and that 1 / sqrt(var + eps).
  const auto normalise = [](const at::Tensor& v) {
    const at::Tensor centred = v - v.mean(-1, /*keepdim=*/true);
    const at::Tensor rstd = (centred.pow(2).mean(-1, /*keepdim=*/true) + 1e-5).rsqrt();
    return std::pair<at::Tensor, at::Tensor>{centred * rstd, rstd};
  };
  const auto starting = [](const at::Tensor& previous, const at::Tensor& initial, const cpu::RecurrenceStep& step) {
    if (step.carried == 0) {
      return initial.narrow(0, 0, step.batch);
    }
    if (step.carried == step.batch) {
      return previous.narrow(0, 0, step.batch);
    }
    return at::cat({previous.narrow(0, 0, step.carried), initial.narrow(0, step.carried, step.batch - step.carried)});
  };
  // The zoneout blend: the mask's rows in training, the probability itself in evaluation.
  const auto zone = [](const at::Tensor& mask, double p, const cpu::RecurrenceStep& step, const at::Tensor& old_value,
                       const at::Tensor& new_value) {
    if (mask.defined()) {
      const at::Tensor d = mask.narrow(0, step.offset, step.batch);
      return d * old_value + (1 - d) * new_value;
    }
    return p == 0.0 ? new_value : old_value * p + new_value * (1.0 - p);
  };
  const at::Tensor input_products = at::linear(input, args[kWeightIh]);
  std::vector<at::Tensor> hidden, cell, gates, input_parts, hidden_parts, normalized, rstds;  // in visiting order
  std::vector<std::pair<int64_t, at::Tensor>> last_hidden, last_cell;
  at::Tensor h, c;
  for (const cpu::RecurrenceStep& step : visiting_order(sizes, reverse)) {
    const at::Tensor h_prev = starting(h, hx, step), c_prev = starting(c, cx, step);
    const at::Tensor h_bar =
        recurrent_dropout_mask.defined() ? h_prev * recurrent_dropout_mask.narrow(0, 0, step.batch) : h_prev;
    const at::Tensor input_product = input_products.narrow(0, step.offset, step.batch);
    const at::Tensor hidden_product = at::linear(h_bar, weight_hh);
    at::Tensor preactivation;
    at::Tensor rstd_ih, rstd_hh;
    if (layer_norm) {
      auto [x_hat_ih, r_ih] = normalise(input_product);
      auto [x_hat_hh, r_hh] = normalise(hidden_product);
      preactivation = x_hat_ih * args[kLayerNormIh] + x_hat_hh * args[kLayerNormHh];
      input_parts.push_back(x_hat_ih);
      hidden_parts.push_back(x_hat_hh);
      rstd_ih = r_ih;
      rstd_hh = r_hh;
    } else {
      preactivation = input_product + hidden_product;
    }
    if (bias_ih.defined()) {
      preactivation = preactivation + bias_ih;
    }
    if (bias_hh.defined()) {
      preactivation = preactivation + bias_hh;
    }
    const auto chunks = preactivation.chunk(4, 1);
    const at::Tensor i = chunks[0].sigmoid(), f = chunks[1].sigmoid(), g = chunks[2].tanh(), o = chunks[3].sigmoid();
    const at::Tensor c_new = f * c_prev + i * g;
    at::Tensor n = c_new;
    if (layer_norm) {
      auto [n_hat, r_c] = normalise(c_new);
      n = n_hat * args[kLayerNormCellWeight] + args[kLayerNormCellBias];
      normalized.push_back(n_hat);
      rstds.push_back(at::cat({rstd_ih, rstd_hh, r_c}, 1));
    }
    const at::Tensor h_new = o * n.tanh();
    c = zone(zoneout_cell_mask, zoneout_cell, step, c_prev, c_new);
    h = zone(zoneout_hidden_mask, zoneout_hidden, step, h_prev, h_new);
    hidden.push_back(h);
    cell.push_back(c);
    gates.push_back(at::cat({i, f, g, o}, 1));
    last_hidden.emplace_back(step.ending, h.narrow(0, step.ending, step.batch - step.ending));
    last_cell.emplace_back(step.ending, c.narrow(0, step.ending, step.batch - step.ending));
  }
  const auto in_time_order = [&](std::vector<at::Tensor> pieces, int64_t width) {
    if (pieces.empty()) {
      return at::empty({0, width}, input.options());
    }
    if (reverse) {
      std::reverse(pieces.begin(), pieces.end());
    }
    return at::cat(pieces);
  };
  const auto by_row = [](std::vector<std::pair<int64_t, at::Tensor>> pieces) {
    std::sort(pieces.begin(), pieces.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<at::Tensor> rows;
    for (const auto& piece : pieces) {
      rows.push_back(piece.second);
    }
    return at::cat(rows);
  };
  return {in_time_order(hidden, hidden_size),      by_row(last_hidden),
          by_row(last_cell),                       in_time_order(cell, hidden_size),
          in_time_order(gates, 4 * hidden_size),   in_time_order(input_parts, 4 * hidden_size),
          in_time_order(hidden_parts, 4 * hidden_size), in_time_order(normalized, hidden_size),
          in_time_order(rstds, 3)};
}

namespace {

using RegularisedForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                        at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    double, bool);

using RegularisedBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    double, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, bool, std::array<bool, 3>);

variable_list regularised_tensor_args(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const std::optional<at::Tensor>& recurrent_dropout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask) {
  return {input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih.value_or(at::Tensor()),
          bias_hh.value_or(at::Tensor()), layer_norm_ih.value_or(at::Tensor()), layer_norm_hh.value_or(at::Tensor()),
          layer_norm_cell_weight.value_or(at::Tensor()), layer_norm_cell_bias.value_or(at::Tensor()),
          recurrent_dropout_mask.value_or(at::Tensor()), zoneout_cell_mask.value_or(at::Tensor()),
          zoneout_hidden_mask.value_or(at::Tensor())};
}

// regularised_sequence_forward's autograd: backpropagation through time by
// regularised_sequence_backward, saving the arguments and the op's outputs for backward (the
// products normalised, LN(c~)'s input normalised and the three 1 / std per row, with layer norm).
class RegularisedSequenceFunction : public torch::autograd::Function<RegularisedSequenceFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& hx,
      const at::Tensor& cx, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
      const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
      const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
      const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
      const std::optional<at::Tensor>& recurrent_dropout_mask, const std::optional<at::Tensor>& zoneout_cell_mask,
      const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
      bool reverse) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lstm_fused::regularised_sequence_forward", "")
                         .typed<RegularisedForwardFn>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, hy, cy, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd] =
        op.call(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
                layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask,
                zoneout_hidden_mask, zoneout_cell, zoneout_hidden, reverse);
    ctx->set_materialize_grads(false);
    variable_list saved = regularised_tensor_args(
        input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
        layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask);
    for (const at::Tensor& t : {output, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd}) {
      saved.push_back(t);
    }
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({input_part, hidden_part, normalized_cell, layer_norm_rstd});
    ctx->saved_data["zoneout_cell"] = zoneout_cell;
    ctx->saved_data["zoneout_hidden"] = zoneout_hidden;
    ctx->saved_data["reverse"] = reverse;
    return {output, hy, cy, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const variable_list inputs(saved.begin(), saved.begin() + kNumRegularisedArgs);
    const auto needs = inputs_needing_grad<kNumRegularisedArgs>(ctx, inputs);
    variable_list result(kNumRegularisedArgs + 3);  // the three non-tensor arguments have none
    if (std::none_of(grad_outputs.begin(), grad_outputs.begin() + 5, [](const at::Tensor& g) { return g.defined(); })) {
      return result;
    }
    const double zoneout_cell = ctx->saved_data["zoneout_cell"].toDouble();
    const double zoneout_hidden = ctx->saved_data["zoneout_hidden"].toDouble();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    if (at::GradMode::is_enabled()) {
      // create_graph=True: gradients autograd can differentiate again, through the composite.
      const variable_list outputs = regularised_sequence_composite(inputs, zoneout_cell, zoneout_hidden, reverse);
      const variable_list used_outputs(outputs.begin(), outputs.begin() + 5);
      const variable_list used_grads(grad_outputs.begin(), grad_outputs.begin() + 5);
      const variable_list grads = differentiable_backward(inputs, used_outputs, used_grads, needs);
      std::copy(grads.begin(), grads.end(), result.begin());
      return result;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lstm_fused::regularised_sequence_backward", "")
                         .typed<RegularisedBackwardFn>();
    const auto& [output, cell_states, gates, input_part, hidden_part, normalized_cell, layer_norm_rstd] =
        std::tie(saved[15], saved[16], saved[17], saved[18], saved[19], saved[20], saved[21]);
    const std::array<bool, 3> output_mask{needs[kInput], needs[kWeightIh], needs[kWeightHh]};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto grads = op.call(
        optional(grad_outputs[0]), optional(grad_outputs[1]), optional(grad_outputs[2]), optional(grad_outputs[3]),
        optional(grad_outputs[4]), inputs[kInput], inputs[kBatchSizes], inputs[kHx], inputs[kCx], inputs[kWeightIh],
        inputs[kWeightHh], optional(inputs[kLayerNormIh]), optional(inputs[kLayerNormHh]),
        optional(inputs[kLayerNormCellWeight]), optional(inputs[kLayerNormCellBias]),
        optional(inputs[kRecurrentDropoutMask]), optional(inputs[kZoneoutCellMask]),
        optional(inputs[kZoneoutHiddenMask]), zoneout_cell, zoneout_hidden, output, cell_states, gates, input_part,
        hidden_part, normalized_cell, layer_norm_rstd, reverse, output_mask);
    const variable_list by_input{std::get<0>(grads), at::Tensor(), std::get<1>(grads), std::get<2>(grads),
                                 std::get<3>(grads), std::get<4>(grads), std::get<5>(grads), std::get<5>(grads),
                                 std::get<6>(grads), std::get<7>(grads), std::get<8>(grads), std::get<9>(grads)};
    for (size_t i = 0; i < by_input.size(); ++i) {
      if (needs[i]) {
        result[i] = by_input[i];
      }
    }
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
regularised_sequence_forward_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const std::optional<at::Tensor>& recurrent_dropout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, bool reverse) {
  const variable_list args = regularised_tensor_args(
      input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
      layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask);
  variable_list outputs;
  if (!regularised_has_fused_kernel(input) ||
      runs_composite({&input, &hx, &cx, &weight_ih, &weight_hh, pointer_or_null(bias_ih), pointer_or_null(bias_hh),
                      pointer_or_null(layer_norm_ih), pointer_or_null(layer_norm_hh),
                      pointer_or_null(layer_norm_cell_weight), pointer_or_null(layer_norm_cell_bias)})) {
    TORCH_CHECK(
        zoneout_cell >= 0.0 && zoneout_cell <= 1.0 && zoneout_hidden >= 0.0 && zoneout_hidden <= 1.0,
        "lstm_fused: zoneout_cell and zoneout_hidden must be probabilities in [0, 1], got ", zoneout_cell, " and ",
        zoneout_hidden);
    outputs = regularised_sequence_composite(args, zoneout_cell, zoneout_hidden, reverse);
  } else {
    outputs = RegularisedSequenceFunction::apply(
        input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, layer_norm_ih, layer_norm_hh,
        layer_norm_cell_weight, layer_norm_cell_bias, recurrent_dropout_mask, zoneout_cell_mask, zoneout_hidden_mask,
        zoneout_cell, zoneout_hidden, reverse);
  }
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4], outputs[5], outputs[6], outputs[7], outputs[8]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, Autograd, m) {
  m.impl("regularised_sequence_forward", &regularised_sequence_forward_autograd);
}

}  // namespace lstm_fused
