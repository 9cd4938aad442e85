// The CUDA kernels of csrc/cuda/cell_kernels.cuh, compiled for the host against cuda_emulation.h
// and registered as torch.ops.lstm_fused_emulated.* on CPU tensors. Built by the tests
// (tests/test_emulated_cuda.py) with torch.utils.cpp_extension.load; the launches are the ones
// lstm_cell.cu makes (the same launch_* functions of the header), the glue here only checks and
// allocates. Outputs start NaN-filled, so an element a kernel does not write fails the tests.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <limits>

#include "cuda_emulation.h"
#include "selftest_kernels.cuh"
// After the emulation, which defines the builtins it uses.
#include "cuda/cell_kernels.cuh"
#include "cuda/sequence_host.h"

namespace lstm_fused_emulated {
namespace {

namespace kernels = lstm_fused::cuda;

at::Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& reference) {
  TORCH_CHECK(t.device().is_cpu(), name, ": the emulated kernels read CPU tensors");
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), name, ": dtype differs from input's");
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Unlike lstm_cell.cu, contiguity is NOT forced here: the caller hands over dense tensors whose
// data may start at any offset (the misaligned-pointer tests).
at::Tensor optional_dense(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) {
    return at::Tensor();
  }
  TORCH_CHECK(t->is_contiguous(), "the emulated ops take contiguous tensors");
  return *t;
}

// Always the fused kernel (the GPU op takes it when use_fused_forward says so). Returns hy, cy,
// gates (left NaN when write_gates is false) and the plan's batch tile, warps per unit and blocks.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t> cell_forward(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    int64_t multiprocessors,
    bool write_gates) {
  for (const at::Tensor* t : {&input, &hx, &cx, &weight_ih, &weight_hh}) {
    check_input(*t, "argument", input);
    TORCH_CHECK(t->is_contiguous(), "the emulated ops take contiguous tensors");
  }
  const int64_t batch = input.size(0);
  const int64_t input_size = input.size(1);
  const int64_t hidden_size = hx.size(1);
  TORCH_CHECK(weight_ih.sizes() == at::IntArrayRef({4 * hidden_size, input_size}), "weight_ih shape");
  TORCH_CHECK(weight_hh.sizes() == at::IntArrayRef({4 * hidden_size, hidden_size}), "weight_hh shape");
  const at::Tensor b_ih = optional_dense(bias_ih);
  const at::Tensor b_hh = optional_dense(bias_hh);
  at::Tensor hy = poisoned({batch, hidden_size}, input.options());
  at::Tensor cy = poisoned({batch, hidden_size}, input.options());
  at::Tensor gates = poisoned({batch, 4 * hidden_size}, input.options());
  kernels::ForwardPlan plan{};
  if (batch == 0 || hidden_size == 0) {
    return {hy, cy, gates, 0, 0, 0};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulated_cell_forward", [&] {
    const kernels::ForwardPointers<scalar_t> pointers{
        input.const_data_ptr<scalar_t>(),
        hx.const_data_ptr<scalar_t>(),
        cx.const_data_ptr<scalar_t>(),
        weight_ih.const_data_ptr<scalar_t>(),
        weight_hh.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(b_ih),
        data_or_null<scalar_t>(b_hh),
        hy.mutable_data_ptr<scalar_t>(),
        cy.mutable_data_ptr<scalar_t>(),
        write_gates ? gates.mutable_data_ptr<scalar_t>() : nullptr};
    plan = kernels::launch_fused_forward<scalar_t>(
        pointers, batch, input_size, hidden_size, static_cast<int>(multiprocessors), nullptr);
  });
  return {hy, cy, gates, plan.batch_tile, plan.shape.warps_per_unit, plan.blocks};
}

void cell_pointwise_(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy,
    int64_t multiprocessors) {
  const int64_t batch = gates.size(0);
  const int64_t hidden_size = gates.size(1) / 4;
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&gates, &cx, &hy, &cy}) {
    check_input(*t, "argument", gates);
    TORCH_CHECK(t->is_contiguous(), "the emulated ops take contiguous tensors");
  }
  const at::Tensor b = optional_dense(bias);
  if (batch == 0 || hidden_size == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "emulated_cell_pointwise", [&] {
    kernels::launch_cell_pointwise<scalar_t>(
        gates.mutable_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(b),
        hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(), batch, hidden_size,
        static_cast<int>(multiprocessors), nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor> cell_gate_grads(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates,
    int64_t multiprocessors) {
  const int64_t batch = cx.size(0);
  const int64_t hidden_size = cx.size(1);
  at::Tensor grad_preactivation = poisoned({batch, 4 * hidden_size}, cx.options());
  at::Tensor grad_cx = poisoned({batch, hidden_size}, cx.options());
  const at::Tensor gh = optional_dense(grad_hy);
  const at::Tensor gc = optional_dense(grad_cy);
  const at::Tensor gg = optional_dense(grad_gates);
  if (batch == 0 || hidden_size == 0) {
    return {grad_preactivation, grad_cx};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "emulated_cell_gate_grads", [&] {
    kernels::launch_cell_gate_grads<scalar_t>(
        data_or_null<scalar_t>(gh), data_or_null<scalar_t>(gc), data_or_null<scalar_t>(gg),
        cx.const_data_ptr<scalar_t>(), cy.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
        grad_preactivation.mutable_data_ptr<scalar_t>(), grad_cx.mutable_data_ptr<scalar_t>(), batch, hidden_size,
        static_cast<int>(multiprocessors), nullptr);
  });
  return {grad_preactivation, grad_cx};
}

kernels::ForwardDtype forward_dtype(at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    return kernels::ForwardDtype::kReduced;
  }
  return dtype == at::kDouble ? kernels::ForwardDtype::kDouble : kernels::ForwardDtype::kFloat;
}

// The path lstm_cell.cu's cell_forward takes: use_fused_forward() itself.
bool use_fused_forward(int64_t batch, int64_t hidden_size, at::ScalarType dtype, bool allow_tf32) {
  return kernels::use_fused_forward(batch, hidden_size, forward_dtype(dtype), allow_tf32);
}

// The fused launch's plan: (batch tile, blocks, warps per unit, chunk elements, shared bytes).
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> plan_fused_forward(
    int64_t batch, int64_t input_size, int64_t hidden_size, at::ScalarType dtype, int64_t multiprocessors) {
  kernels::ForwardPlan plan{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "emulated_plan", [&] {
    plan = kernels::plan_fused_forward<scalar_t>(
        batch, input_size, hidden_size, true, true, static_cast<int>(multiprocessors));
  });
  return {plan.batch_tile, plan.blocks, plan.shape.warps_per_unit, plan.shape.chunk_elements,
          static_cast<int64_t>(plan.shared_bytes)};
}

// The persistent sequence forward over a padded [T, B, I] input, as lstm_cell.cu's
// sequence_forward_persistent launches it; co-residency as the emulation allows (at most
// kMaxCooperativeBlocks blocks, 227 KiB of shared memory each). Returns output, hy, cy,
// cell_states, gates and which kernel ran: 0 none (the shape does not fit), 1 SIMT, 2 tensor cores.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> sequence_forward_persistent(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse,
    bool write_gates) {
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  const at::Tensor projected = kernels::project_inputs(input, weight_ih, bias_ih, bias_hh);
  const auto options = input.options();
  at::Tensor output = poisoned({steps, batch, hidden_size}, options);
  at::Tensor cell_states = poisoned({steps, batch, hidden_size}, options);
  at::Tensor gates = poisoned({steps, batch, 4 * hidden_size}, options);
  at::Tensor hy = poisoned({batch, hidden_size}, options);
  at::Tensor cy = poisoned({batch, hidden_size}, options);
  int64_t ran = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulated_sequence", [&] {
    const kernels::SequencePlan plan = kernels::plan_persistent_sequence<scalar_t>(
        batch, hidden_size, cuda_emulation::kOptInSharedBytes, cuda_emulation::kMaxCooperativeBlocks);
    if (!plan.fits || steps == 0) {
      return;
    }
    const at::Tensor w_hh = weight_hh.contiguous();
    const at::Tensor h0 = hx.contiguous();
    const at::Tensor c0 = cx.contiguous();
    const kernels::SequencePointers<scalar_t> pointers{
        projected.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
        c0.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), cell_states.mutable_data_ptr<scalar_t>(),
        write_gates ? gates.mutable_data_ptr<scalar_t>() : nullptr, hy.mutable_data_ptr<scalar_t>(),
        cy.mutable_data_ptr<scalar_t>()};
    kernels::launch_persistent_sequence<scalar_t>(
        pointers, kernels::SequenceShape{steps, batch, hidden_size, reverse}, plan, nullptr);
    ran = plan.tensor_cores ? 2 : 1;
  });
  return {output, hy, cy, cell_states, gates, ran};
}

// Backpropagation through time with the persistent backward kernel, from the forward's saved
// output, cell_states and gates. Returns grad_input, grad_hx, grad_cx, grad_weight_ih,
// grad_weight_hh, grad_bias and whether the persistent kernel ran.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> sequence_backward_persistent(
    const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const at::Tensor& output,
    const at::Tensor& cell_states,
    const at::Tensor& gates,
    bool reverse) {
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();
  at::Tensor grad_preactivation = poisoned({steps, batch, 4 * hidden_size}, options);
  at::Tensor grad_cx = poisoned({batch, hidden_size}, options);
  const at::Tensor go = optional_dense(grad_output);
  const at::Tensor gh = optional_dense(grad_hy);
  const at::Tensor gc = optional_dense(grad_cy);
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulated_sequence_backward", [&] {
    const kernels::SequencePlan plan = kernels::plan_persistent_sequence_backward<scalar_t>(
        hidden_size, cuda_emulation::kOptInSharedBytes, cuda_emulation::kMaxCooperativeBlocks);
    if (!plan.fits || steps == 0 || batch == 0) {
      return;
    }
    const at::Tensor w_hh = weight_hh.contiguous();
    const kernels::SequenceBackwardPointers<scalar_t> pointers{
        data_or_null<scalar_t>(go), data_or_null<scalar_t>(gh), data_or_null<scalar_t>(gc),
        w_hh.const_data_ptr<scalar_t>(), cx.contiguous().const_data_ptr<scalar_t>(),
        cell_states.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
        grad_preactivation.mutable_data_ptr<scalar_t>(), grad_cx.mutable_data_ptr<scalar_t>()};
    kernels::launch_persistent_sequence_backward<scalar_t>(
        pointers, kernels::SequenceShape{steps, batch, hidden_size, reverse}, plan, nullptr);
    ran = true;
  });
  if (!ran) {
    return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), false};
  }
  const kernels::SequenceGrads grads =
      kernels::sequence_products(grad_preactivation, input, hx, output, weight_ih, weight_hh, reverse);
  return {grads.input, grads.hx, grad_cx, grads.weight_ih, grads.weight_hh, grads.bias, true};
}

// Checks of the emulation itself, each with a kernel of selftest_kernels.cuh.
at::Tensor selftest(const std::string& name, int64_t blocks, int64_t threads) {
  const dim3 grid(static_cast<unsigned int>(blocks));
  const dim3 block(static_cast<unsigned int>(threads));
  const int64_t n = blocks * threads;
  if (name == "warp_collectives") {
    at::Tensor out = at::full({n, 6}, -1, at::kLong);
    int64_t* data = out.mutable_data_ptr<int64_t>();
    cuda_emulation::launch(grid, block, 0, [=] { selftest::warp_collectives(data); });
    return out;
  }
  if (name == "atomics") {
    at::Tensor out = at::zeros({3}, at::kDouble);
    double* data = out.mutable_data_ptr<double>();
    cuda_emulation::launch_cooperative(grid, block, 0, [=] { selftest::atomics(data); });
    return out;
  }
  if (name == "grid_sync") {
    at::Tensor out = at::full({n}, -1, at::kLong);
    at::Tensor scratch = at::zeros({blocks}, at::kLong);
    int64_t* data = out.mutable_data_ptr<int64_t>();
    int64_t* scratch_data = scratch.mutable_data_ptr<int64_t>();
    cuda_emulation::launch_cooperative(grid, block, 0, [=] { selftest::grid_sync(data, scratch_data); });
    return out;
  }
  if (name == "shared_memory") {
    at::Tensor out = at::full({n}, -1, at::kLong);
    int64_t* data = out.mutable_data_ptr<int64_t>();
    const size_t bytes = static_cast<size_t>(threads) * sizeof(int64_t);
    cuda_emulation::launch(grid, block, bytes, [=] { selftest::shared_memory(data); });
    return out;
  }
  if (name == "divergent_barrier") {
    cuda_emulation::launch(grid, block, 0, [=] { selftest::divergent_barrier(); });
    return at::empty({0});
  }
  if (name == "race_without_barrier") {
    at::Tensor out = at::full({n}, -1, at::kLong);
    int64_t* data = out.mutable_data_ptr<int64_t>();
    cuda_emulation::launch(grid, block, static_cast<size_t>(threads) * sizeof(int64_t), [=] {
      selftest::race_without_barrier(data);
    });
    return out;
  }
  TORCH_CHECK(false, "unknown self-test ", name);
}

// cuda_emulation::Error (a std::runtime_error) reaches Python as a RuntimeError with its message.

}  // namespace

TORCH_LIBRARY(lstm_fused_emulated, m) {
  m.def(
      "cell_forward(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, int multiprocessors, bool write_gates) -> (Tensor, Tensor, Tensor, int, int, int)",
      &cell_forward);
  m.def(
      "cell_pointwise_(Tensor(a!) gates, Tensor cx, Tensor? bias, Tensor(b!) hy, Tensor(c!) cy, int multiprocessors) -> ()",
      &cell_pointwise_);
  m.def(
      "cell_gate_grads(Tensor? grad_hy, Tensor? grad_cy, Tensor? grad_gates, Tensor cx, Tensor cy, Tensor gates, "
      "int multiprocessors) -> (Tensor, Tensor)",
      &cell_gate_grads);
  m.def("use_fused_forward(int batch, int hidden_size, ScalarType dtype, bool allow_tf32) -> bool", &use_fused_forward);
  m.def(
      "plan_fused_forward(int batch, int input_size, int hidden_size, ScalarType dtype, int multiprocessors) -> "
      "(int, int, int, int, int)",
      &plan_fused_forward);
  m.def(
      "sequence_forward_persistent(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool write_gates) -> (Tensor, Tensor, Tensor, Tensor, Tensor, int)",
      &sequence_forward_persistent);
  m.def(
      "sequence_backward_persistent(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, "
      "Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor cell_states, Tensor gates, bool reverse) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, bool)",
      &sequence_backward_persistent);
  m.def("selftest(str name, int blocks, int threads) -> Tensor", &selftest);
}

}  // namespace lstm_fused_emulated
