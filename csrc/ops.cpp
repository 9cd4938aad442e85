// Op schemas, argument checks, and the device-independent half of the backward.
//
// Data flows one way: the autograd kernels (autograd.cpp) -> these ops -> the CPU or CUDA kernel
// registered for them in csrc/cpu and csrc/cuda. Only the dispatcher connects the two device files.
#include <Python.h>

#include <algorithm>
#include <atomic>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "matmul.h"
#include "ops.h"

// Importing lstm_fused._C runs the static TORCH_LIBRARY registrations below; the module itself is
// empty, which keeps the extension free of pybind11 (fast to build, and torch.compile sees only
// torch.ops.lstm_fused.*).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lstm_fused's registered operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lstm_fused {
namespace {

std::atomic<bool> poison_outputs{false};

bool set_poison_outputs(bool enabled) {
  return poison_outputs.exchange(enabled);
}

// An explicit list rather than at::isFloatingType, which also admits the float8 types: those have no
// kernel here and would otherwise fail later, deep inside a dtype dispatch, naming no argument.
void check_floating(const at::Tensor& t, const char* name) {
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "lstm_fused: ", name, " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
      t.scalar_type());
}

// Every tensor of a call must share one dtype and device, as nn.LSTMCell requires; `reference`
// is the argument the others are compared with (input, gates or cx, depending on the op).
void check_matches(const at::Tensor& t, const char* name, const at::Tensor& reference, const char* reference_name) {
  TORCH_CHECK(
      t.scalar_type() == reference.scalar_type(),
      "lstm_fused: ", name, " has dtype ", t.scalar_type(), " but ", reference_name, " has dtype ",
      reference.scalar_type(), "; all tensors of an LSTM cell must share one dtype");
  TORCH_CHECK(
      t.device() == reference.device(),
      "lstm_fused: ", name, " is on device ", t.device(), " but ", reference_name, " is on ", reference.device(),
      "; all tensors of an LSTM cell must be on one device");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK(
      t.sizes() == expected,
      "lstm_fused: ", name, " must have shape ", expected, " ", meaning, ", got ", t.sizes());
}

}  // namespace

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (poison_outputs.load(std::memory_order_relaxed)) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }
  return at::empty(sizes, options);
}

namespace {

// The weights and biases against the input, shared by the cell and the sequence. input_layout
// names input's expected 2-D shape in the caller's terms. weight_hr (the sequence's projection,
// [proj_size, hidden_size]) makes weight_hh [4 * hidden_size, proj_size]. Returns hidden_size.
int64_t check_weights_args(
    const at::Tensor& input,
    const char* input_layout,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr = std::nullopt) {
  check_floating(input, "input");
  check_matches(weight_ih, "weight_ih", input, "input");
  check_matches(weight_hh, "weight_hh", input, "input");
  int64_t hidden_size = 0;
  if (weight_hr.has_value()) {
    check_matches(*weight_hr, "weight_hr", input, "input");
    TORCH_CHECK(
        weight_hr->dim() == 2 && weight_hr->size(0) > 0,
        "lstm_fused: weight_hr must have shape [proj_size > 0, hidden_size], got ", weight_hr->sizes());
    hidden_size = weight_hr->size(1);
    TORCH_CHECK(
        weight_hh.sizes() == at::IntArrayRef({4 * hidden_size, weight_hr->size(0)}),
        "lstm_fused: weight_hh must have shape [4 * hidden_size, proj_size] = [", 4 * hidden_size, ", ",
        weight_hr->size(0), "] (from weight_hr shape ", weight_hr->sizes(), "), got ", weight_hh.sizes());
  } else {
    TORCH_CHECK(
        weight_hh.dim() == 2 && weight_hh.size(0) == 4 * weight_hh.size(1),
        "lstm_fused: weight_hh must have shape [4 * hidden_size, hidden_size], got ", weight_hh.sizes());
    hidden_size = weight_hh.size(1);
  }
  TORCH_CHECK(
      weight_ih.dim() == 2 && weight_ih.size(0) == 4 * hidden_size,
      "lstm_fused: weight_ih must have shape [4 * hidden_size, input_size] = [", 4 * hidden_size,
      ", input_size] (hidden_size ", hidden_size, " from weight_hh), got ", weight_ih.sizes());
  const int64_t input_size = weight_ih.size(1);
  TORCH_CHECK(
      input.dim() == 2,
      "lstm_fused: input must be 2-D ", input_layout, ", got ", input.dim(), "-D shape ", input.sizes());
  TORCH_CHECK(
      input.size(1) == input_size,
      "lstm_fused: input has inconsistent input_size: got ", input.size(1), ", expected ", input_size,
      " (input shape ", input.sizes(), ", weight_ih shape ", weight_ih.sizes(), ")");
  for (const auto& [bias, name] :
       {std::pair<const std::optional<at::Tensor>&, const char*>{bias_ih, "bias_ih"}, {bias_hh, "bias_hh"}}) {
    if (bias.has_value()) {
      check_matches(*bias, name, input, "input");
      check_shape(*bias, name, {4 * hidden_size}, "(4 * hidden_size)");
    }
  }
  return hidden_size;
}

// h_0 and c_0: [batch, hidden_size], batch as the caller derived it (batch_origin says from what);
// with a projection h_0 is [batch, proj_size] (hidden_features says which).
void check_initial_states(
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& input,
    int64_t batch,
    const char* batch_origin,
    int64_t hidden_size,
    int64_t hidden_features,
    const char* hidden_features_name) {
  for (const auto& [state, name, width, width_name] :
       {std::tuple<const at::Tensor&, const char*, int64_t, const char*>{hx, "hx (h_0)", hidden_features, hidden_features_name},
        {cx, "cx (c_0)", hidden_size, "hidden_size"}}) {
    check_matches(state, name, input, "input");
    TORCH_CHECK(
        state.dim() == 2,
        "lstm_fused: ", name, " must be 2-D [batch, ", width_name, "] = [", batch, ", ", width, "], got ",
        state.dim(), "-D shape ", state.sizes());
    TORCH_CHECK(
        state.size(0) == batch,
        "lstm_fused: ", batch_origin, " ", batch, " doesn't match ", name, " batch size ", state.size(0),
        " (", name, " shape ", state.sizes(), ")");
    TORCH_CHECK(
        state.size(1) == width,
        "lstm_fused: ", name, " has inconsistent ", width_name, ": got ", state.size(1), ", expected ", width,
        " (", name, " shape ", state.sizes(), ")");
  }
}

}  // namespace

void check_cell_forward_args(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  const int64_t hidden_size =
      check_weights_args(input, "[batch, input_size]", weight_ih, weight_hh, bias_ih, bias_hh);
  check_initial_states(hx, cx, input, input.size(0), "input batch size", hidden_size, hidden_size, "hidden_size");
}

std::vector<int64_t> check_sequence_forward_args(
    const at::Tensor& input,
    const at::Tensor& batch_sizes,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr) {
  const int64_t hidden_size = check_weights_args(
      input, "[sum(batch_sizes), input_size] (every step's rows, stacked as in PackedSequence.data)", weight_ih,
      weight_hh, bias_ih, bias_hh, weight_hr);
  // The loop reads the batch sizes on the host to slice its step rows, as PackedSequence keeps them.
  TORCH_CHECK(
      batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu(),
      "lstm_fused: batch_sizes must be a 1-D int64 CPU tensor (as PackedSequence.batch_sizes), got a ",
      batch_sizes.dim(), "-D ", batch_sizes.scalar_type(), " tensor on ", batch_sizes.device());
  TORCH_CHECK(batch_sizes.numel() > 0, "lstm_fused: batch_sizes is empty; a sequence needs at least one step");
  std::vector<int64_t> sizes(batch_sizes.numel());
  if (batch_sizes.has_storage()) {
    const at::Tensor sizes_contiguous = batch_sizes.contiguous();
    const int64_t* sizes_data = sizes_contiguous.const_data_ptr<int64_t>();
    std::copy(sizes_data, sizes_data + sizes.size(), sizes.begin());
  } else {
    // A tensor wrapped by a torch.func transform has no storage of its own; item() reads through it.
    for (size_t step = 0; step < sizes.size(); ++step) {
      sizes[step] = batch_sizes[static_cast<int64_t>(step)].item<int64_t>();
    }
  }
  int64_t total_rows = 0;
  for (size_t step = 0; step < sizes.size(); ++step) {
    // Sequences sorted longest first make each step's rows a prefix of the previous step's.
    TORCH_CHECK(
        sizes[step] >= 0 && (step == 0 || sizes[step] <= sizes[step - 1]),
        "lstm_fused: batch_sizes must be non-negative and non-increasing (sequences sorted by decreasing "
        "length, as pack_padded_sequence makes them), got ", at::IntArrayRef(sizes));
    total_rows += sizes[step];
  }
  TORCH_CHECK(
      input.size(0) == total_rows,
      "lstm_fused: input has ", input.size(0), " rows but batch_sizes sum to ", total_rows,
      "; input must hold every step's rows (input shape ", input.sizes(), ")");
  check_initial_states(
      hx, cx, input, sizes[0], "batch size (batch_sizes[0])", hidden_size, weight_hh.size(1),
      weight_hr.has_value() ? "proj_size" : "hidden_size");
  return sizes;
}

void check_cell_pointwise_args(
    const at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    const at::Tensor& hy,
    const at::Tensor& cy) {
  check_floating(gates, "gates");
  TORCH_CHECK(
      gates.dim() == 2 && gates.size(1) % 4 == 0,
      "lstm_fused: gates must be 2-D [batch, 4 * hidden_size], got shape ", gates.sizes());
  const int64_t batch = gates.size(0);
  const int64_t hidden_size = gates.size(1) / 4;
  check_matches(cx, "cx", gates, "gates");
  check_shape(cx, "cx", {batch, hidden_size}, "[batch, hidden_size]");
  check_matches(hy, "hy", gates, "gates");
  check_shape(hy, "hy", {batch, hidden_size}, "[batch, hidden_size]");
  check_matches(cy, "cy", gates, "gates");
  check_shape(cy, "cy", {batch, hidden_size}, "[batch, hidden_size]");
  if (bias.has_value()) {
    check_matches(*bias, "bias", gates, "gates");
    check_shape(*bias, "bias", {4 * hidden_size}, "(4 * hidden_size)");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{gates, "gates"}, {hy, "hy"}, {cy, "cy"}}) {
    TORCH_CHECK(t.is_contiguous(), "lstm_fused: ", name, " is written in place and must be contiguous");
  }
}

void check_cell_gate_grads_args(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  check_floating(cx, "cx");
  TORCH_CHECK(cx.dim() == 2, "lstm_fused: cx must be 2-D [batch, hidden_size], got shape ", cx.sizes());
  const int64_t batch = cx.size(0);
  const int64_t hidden_size = cx.size(1);
  check_matches(cy, "cy", cx, "cx");
  check_shape(cy, "cy", cx.sizes(), "(the shape of cx)");
  check_matches(gates, "gates", cx, "cx");
  check_shape(gates, "gates", {batch, 4 * hidden_size}, "[batch, 4 * hidden_size]");
  if (grad_hy.has_value()) {
    check_matches(*grad_hy, "grad_hy", cx, "cx");
    check_shape(*grad_hy, "grad_hy", cx.sizes(), "(the shape of cx)");
  }
  if (grad_cy.has_value()) {
    check_matches(*grad_cy, "grad_cy", cx, "cx");
    check_shape(*grad_cy, "grad_cy", cx.sizes(), "(the shape of cx)");
  }
  if (grad_gates.has_value()) {
    check_matches(*grad_gates, "grad_gates", cx, "cx");
    check_shape(*grad_gates, "grad_gates", {batch, 4 * hidden_size}, "[batch, 4 * hidden_size]");
  }
}

void dispatch_cell_pointwise_(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::cell_pointwise_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, at::Tensor&)>();
  op.call(gates, cx, bias, hy, cy);
}

std::tuple<at::Tensor, at::Tensor> dispatch_cell_gate_grads(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lstm_fused::cell_gate_grads", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&,
                           const at::Tensor&,
                           const at::Tensor&,
                           const at::Tensor&)>();
  return op.call(grad_hy, grad_cy, grad_gates, cx, cy, gates);
}

InputAndWeightGrads input_and_weight_grads(
    const at::Tensor& grad_preactivation,
    const at::Tensor& input,
    const at::Tensor& hidden,
    const at::Tensor& weight_ih,
    const std::array<bool, 6>& output_mask) {
  const auto empty = [&] { return at::empty({0}, input.options()); };
  // The weight gradients G^T x and G^T h share G^T: one transpose for both where it is needed.
  std::vector<at::Tensor> weight_grad_operands;
  if (output_mask[3]) {
    weight_grad_operands.push_back(input);
  }
  if (output_mask[4]) {
    weight_grad_operands.push_back(hidden);
  }
  const std::vector<at::Tensor> weight_grads =
      weight_grad_operands.empty() ? std::vector<at::Tensor>() : transposed_products(grad_preactivation, weight_grad_operands);
  return {
      output_mask[0] ? linear_product(grad_preactivation, weight_ih.t(), std::nullopt) : empty(),
      output_mask[3] ? weight_grads.front() : empty(),
      output_mask[4] ? weight_grads.back() : empty(),
      // A single row needs no reduction: it is the bias gradient.
      output_mask[5] ? (grad_preactivation.size(0) == 1 ? grad_preactivation[0] : grad_preactivation.sum(0)) : empty(),
  };
}

// The matrix products of the backward through matmul.h (oneDNN, MKL/OpenBLAS or cuBLAS); only the
// pointwise gate gradients are device kernels. output_mask says which of (input, hx, cx,
// weight_ih, weight_hh, bias) autograd wants; the others come back empty.
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
    std::array<bool, 6> output_mask) {
  // The products below would accept some inconsistent shapes silently (a transposed weight of the
  // right size); the forward's checks cover input, hx, cx and the weights. cell_gate_grads checks
  // the rest.
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt);
  // Autocast must not recast the products of an op whose dtype was fixed by its caller.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [grad_preactivation, grad_cx] = dispatch_cell_gate_grads(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const InputAndWeightGrads grads = input_and_weight_grads(grad_preactivation, input, hx, weight_ih, output_mask);
  return {
      grads.input,
      output_mask[1] ? linear_product(grad_preactivation, weight_hh.t(), std::nullopt) : empty(),
      output_mask[2] ? grad_cx : empty(),
      grads.weight_ih,
      grads.weight_hh,
      grads.bias,
  };
}

TORCH_LIBRARY(lstm_fused, m) {
  // One step: h1, c1 and the activated gates [batch, 4 * hidden] (i, f, g, o), which backward
  // reuses and gate introspection returns.
  m.def(
      "cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh) -> (Tensor hy, Tensor cy, Tensor gates)");
  // The pointwise half of the forward, for callers that computed the products themselves (the
  // sequence loop, the CUDA fallback path): adds bias, replaces the pre-activations in gates by
  // the activated gates, writes hy and cy.
  m.def("cell_pointwise_(Tensor(a!) gates, Tensor cx, Tensor? bias, Tensor(b!) hy, Tensor(c!) cy) -> ()");
  // The pointwise half of the backward: gradients of the gate pre-activations and of c0.
  m.def(
      "cell_gate_grads(Tensor? grad_hy, Tensor? grad_cy, Tensor? grad_gates, Tensor cx, Tensor cy, "
      "Tensor gates) -> (Tensor grad_preactivation, Tensor grad_cx)");
  m.def(
      "cell_backward(Tensor? grad_hy, Tensor? grad_cy, Tensor? grad_gates, Tensor input, Tensor hx, "
      "Tensor cx, Tensor cy, Tensor gates, Tensor weight_ih, Tensor weight_hh, bool[6] output_mask) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias)");
  // One layer in one direction over a whole sequence, in PackedSequence layout: input [sum(batch_sizes),
  // input_size] holds every step's rows (a padded [T, B, I] batch viewed as [T * B, I], every batch
  // size B). reverse runs each sequence from its last step to its first, as nn.LSTM's backward
  // direction. output, cell_states and gates (activated, i f g o) have one row per input row;
  // hy, cy are each sequence's state after its last step.
  // weight_hr [proj_size, hidden_size], nn.LSTM's projection (LSTMP): each step's hidden state is
  // weight_hr (o * tanh(c)), so output, hx and hy are [., proj_size] and weight_hh [4 * hidden_size,
  // proj_size]; cell_states, cy and gates keep hidden_size.
  m.def(
      "sequence_forward(Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, bool reverse, Tensor? weight_hr=None) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor cell_states, Tensor gates)");
  // sequence_forward without cell_states and gates, for calls that need neither backward nor the
  // states: on the CPU it projects the input a few steps at a time instead of all at once.
  // Differentiable (through sequence_forward where a gradient is wanted).
  m.def(
      "sequence_inference(Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, bool reverse, Tensor? weight_hr=None) -> "
      "(Tensor output, Tensor hy, Tensor cy)");
  // Backpropagation through time for sequence_forward; output_mask as cell_backward's. grad_weight_hr
  // is computed whenever weight_hr is given (one product over all steps), else empty.
  m.def(
      "sequence_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor? grad_cell_states, "
      "Tensor? grad_gates, Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor output, Tensor cell_states, Tensor gates, bool reverse, bool[6] output_mask, "
      "Tensor? weight_hr=None) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias, Tensor grad_weight_hr)");
  // Test hook: NaN-fill every kernel output before it is written. Returns the previous setting.
  m.def("_set_poison_outputs(bool enabled) -> bool", &set_poison_outputs);
}

// Every device but the CPU, which has its own kernel for small batches (csrc/cpu/lstm_cell.cpp).
TORCH_LIBRARY_IMPL(lstm_fused, CompositeExplicitAutograd, m) {
  m.impl("cell_backward", &cell_backward_composite);
}

}  // namespace lstm_fused
