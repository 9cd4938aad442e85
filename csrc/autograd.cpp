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
  m.impl("sequence_backward", &sequence_backward_autograd);
}

}  // namespace lstm_fused
