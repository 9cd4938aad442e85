// The CUDA kernels of csrc/cuda/cell_kernels.cuh, compiled for the host against cuda_emulation.h
// and registered as torch.ops.lstm_fused_emulated.* on CPU tensors. Built by the tests
// (tests/test_emulated_cuda.py) with torch.utils.cpp_extension.load; the launches are the ones
// lstm_cell.cu makes (the same launch_* functions of the header), the glue here only checks and
// allocates. Outputs start NaN-filled, so an element a kernel does not write fails the tests.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "cuda_emulation.h"
#include "selftest_kernels.cuh"
// After the emulation, which defines the builtins it uses.
#include "cuda/cell_kernels.cuh"
#include "cuda/op_layer.h"
#include "cuda/regularised_kernels.cuh"

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

// The path lstm_cell.cu's cell_forward takes: use_fused_forward() itself.
bool use_fused_forward(int64_t batch, int64_t hidden_size, at::ScalarType dtype, bool allow_tf32) {
  return kernels::use_fused_forward(batch, hidden_size, kernels::forward_dtype(dtype), allow_tf32);
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

// op_layer.h's Device under the emulation: co-residency as the test says the GPU would allow (at
// most what the emulation can hold), the library's own sequence ops on the CPU as the loop (the
// same device-independent code the GPU falls back to), NaN-filled outputs, plain ATen products.
struct Emulation {
  struct Guard {
    explicit Guard(at::Device) {}
  };
  kernels::CooperativeLimits limits;

  template <typename scalar_t>
  kernels::CooperativeLimits forward_limits(const kernels::SequencePlan&) const {
    return limits;
  }
  template <typename scalar_t>
  kernels::CooperativeLimits backward_limits(const kernels::SequencePlan&) const {
    return limits;
  }
  cudaStream_t stream() const {
    return nullptr;
  }
  at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return poisoned(sizes, options);
  }
  // The shape checks the persistent path relies on (the library's check_sequence_forward_args
  // does more, and runs in the loop).
  std::vector<int64_t> check_forward_args(
      const at::Tensor& input,
      const at::Tensor& batch_sizes,
      const at::Tensor& hx,
      const at::Tensor& cx,
      const at::Tensor& weight_ih,
      const at::Tensor& weight_hh,
      const std::optional<at::Tensor>& bias_ih,
      const std::optional<at::Tensor>& bias_hh,
      const std::optional<at::Tensor>& weight_hr) const {
    for (const at::Tensor* t : {&input, &hx, &cx, &weight_ih, &weight_hh}) {
      check_input(*t, "argument", input);
    }
    TORCH_CHECK(batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1, "batch_sizes: 1-D int64");
    const at::Tensor sizes_c = batch_sizes.contiguous();
    std::vector<int64_t> sizes(sizes_c.const_data_ptr<int64_t>(), sizes_c.const_data_ptr<int64_t>() + sizes_c.numel());
    int64_t rows = 0;
    for (const int64_t b : sizes) {
      rows += b;
    }
    // With a projection, weight_hh is [4H, P], h is [B, P] and weight_hr [P, H].
    TORCH_CHECK(weight_hh.dim() == 2 && weight_hh.size(0) % 4 == 0, "weight_hh shape");
    const int64_t hidden_size = weight_hh.size(0) / 4;
    const int64_t output_size = weight_hh.size(1);
    TORCH_CHECK(input.dim() == 2 && input.size(0) == rows, "input: [sum(batch_sizes), input_size]");
    TORCH_CHECK(weight_ih.sizes() == at::IntArrayRef({4 * hidden_size, input.size(1)}), "weight_ih shape");
    if (weight_hr.has_value()) {
      check_input(*weight_hr, "weight_hr", input);
      TORCH_CHECK(weight_hr->sizes() == at::IntArrayRef({output_size, hidden_size}), "weight_hr shape");
    } else {
      TORCH_CHECK(output_size == hidden_size, "weight_hh shape");
    }
    TORCH_CHECK(!sizes.empty() && hx.sizes() == at::IntArrayRef({sizes[0], output_size}), "hx shape");
    TORCH_CHECK(cx.sizes() == at::IntArrayRef({sizes[0], hidden_size}), "cx shape");
    for (const auto* b : {&bias_ih, &bias_hh}) {
      TORCH_CHECK(!b->has_value() || (*b)->sizes() == at::IntArrayRef({4 * hidden_size}), "bias shape");
    }
    return sizes;
  }
  kernels::ForwardOutputs forward_loop(
      const at::Tensor& input,
      const at::Tensor& batch_sizes,
      const at::Tensor& hx,
      const at::Tensor& cx,
      const at::Tensor& weight_ih,
      const at::Tensor& weight_hh,
      const std::optional<at::Tensor>& bias_ih,
      const std::optional<at::Tensor>& bias_hh,
      bool reverse,
      const std::optional<at::Tensor>& weight_hr) const {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_fused::sequence_forward", "")
                               .typed<kernels::ForwardOutputs(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse, weight_hr);
  }
  kernels::BackwardOutputs backward_loop(
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
      const std::optional<at::Tensor>& weight_hr) const {
    using Optional = const std::optional<at::Tensor>&;
    using T = const at::Tensor&;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lstm_fused::sequence_backward", "")
                               .typed<kernels::BackwardOutputs(
                                   Optional, Optional, Optional, Optional, Optional, T, T, T, T, T, T, T, T, T, bool,
                                   std::array<bool, 6>, Optional)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(
        grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih, weight_hh,
        output, cell_states, gates, reverse, output_mask, weight_hr);
  }
  kernels::SequenceProducts products(
      const at::Tensor& grad_preactivation,
      const at::Tensor& input,
      const at::Tensor& hidden,
      const at::Tensor& weight_ih,
      const std::array<bool, 6>& output_mask) const {
    const auto empty = [&] { return at::empty({0}, input.options()); };
    return {
        output_mask[0] ? at::mm(grad_preactivation, weight_ih) : empty(),
        output_mask[3] ? at::mm(grad_preactivation.t(), input) : empty(),
        output_mask[4] ? at::mm(grad_preactivation.t(), hidden) : empty(),
        output_mask[5] ? grad_preactivation.sum(0) : empty(),
    };
  }
};

Emulation emulation(int64_t max_shared_bytes, int64_t max_blocks) {
  return Emulation{{std::min(static_cast<size_t>(max_shared_bytes), cuda_emulation::kOptInSharedBytes),
                    std::min<int64_t>(max_blocks, cuda_emulation::kMaxCooperativeBlocks)}};
}

// The sequence_forward op as sequence.cu registers it for CUDA (op_layer.h's sequence_forward_op),
// on a device that allows max_blocks co-resident blocks of max_shared_bytes each. Returns the op's
// outputs and which path ran (kernels::SequencePath: 0 the loop, 1 SIMT, 2 tensor cores).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> sequence_forward(
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
    int64_t max_shared_bytes,
    int64_t max_blocks,
    const std::optional<at::Tensor>& weight_hr) {
  kernels::SequencePath path;
  auto [output, hy, cy, cell_states, gates] = kernels::sequence_forward_op(
      emulation(max_shared_bytes, max_blocks), &path, input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih,
      bias_hh, reverse, allow_tf32, weight_hr);
  return {output, hy, cy, cell_states, gates, static_cast<int64_t>(path)};
}

// The sequence_inference op as sequence.cu registers it for CUDA (op_layer.h's
// sequence_inference_op): output, hy, cy and which path ran, as sequence_forward above.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> sequence_inference(
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
    int64_t max_shared_bytes,
    int64_t max_blocks,
    const std::optional<at::Tensor>& weight_hr) {
  kernels::SequencePath path;
  auto [output, hy, cy] = kernels::sequence_inference_op(
      emulation(max_shared_bytes, max_blocks), &path, input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih,
      bias_hh, reverse, allow_tf32, weight_hr);
  return {output, hy, cy, static_cast<int64_t>(path)};
}

// The sequence_backward op as sequence.cu registers it for CUDA. Returns the op's gradients (the
// seventh, weight_hr's, empty without a projection) and which path ran (0 the loop, 1 the
// persistent kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t> sequence_backward(
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
    int64_t max_shared_bytes,
    int64_t max_blocks,
    const std::optional<at::Tensor>& weight_hr) {
  kernels::SequencePath path;
  auto [grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr] =
      kernels::sequence_backward_op(
          emulation(max_shared_bytes, max_blocks), &path, grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates,
          input, batch_sizes, hx, cx, weight_ih, weight_hh, output, cell_states, gates, reverse, output_mask, weight_hr);
  return {grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr,
          static_cast<int64_t>(path)};
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

// The regularised step's kernels (regularised_kernels.cuh), with regularised.cu's schemas: the
// same in-place outputs, which the tests NaN-poison. Inputs must be contiguous.
void regularised_pointwise_(
    at::Tensor& input_part, at::Tensor& hidden_part, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    at::Tensor& gates, at::Tensor& hy, at::Tensor& cy, at::Tensor& normalized_cell, at::Tensor& layer_norm_rstd) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &input_part, &hidden_part, &hx, &cx, &gates, &hy, &cy, &normalized_cell, &layer_norm_rstd}) {
    check_input(*t, "argument", gates);
    TORCH_CHECK(t->is_contiguous(), "the emulated ops take contiguous tensors");
  }
  const int64_t batch = gates.size(0), hidden_size = hy.size(1);
  const at::Tensor b = optional_dense(bias), ln_ih = optional_dense(layer_norm_ih);
  const at::Tensor ln_hh = optional_dense(layer_norm_hh), ln_cw = optional_dense(layer_norm_cell_weight);
  const at::Tensor ln_cb = optional_dense(layer_norm_cell_bias);
  const at::Tensor zc = optional_dense(zoneout_cell_mask), zh = optional_dense(zoneout_hidden_mask);
  if (batch == 0 || hidden_size == 0) {
    return;
  }
  const bool layer_norm = ln_ih.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "emulated_regularised_pointwise", [&] {
    const kernels::RegularisedForwardPointers<scalar_t> p{
        input_part.mutable_data_ptr<scalar_t>(), hidden_part.mutable_data_ptr<scalar_t>(), data_or_null<scalar_t>(b),
        data_or_null<scalar_t>(ln_ih), data_or_null<scalar_t>(ln_hh), data_or_null<scalar_t>(ln_cw),
        data_or_null<scalar_t>(ln_cb), hx.const_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(zc), data_or_null<scalar_t>(zh), gates.mutable_data_ptr<scalar_t>(),
        hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
        layer_norm ? normalized_cell.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? layer_norm_rstd.mutable_data_ptr<scalar_t>() : nullptr};
    kernels::launch_regularised_pointwise<scalar_t>(p, batch, hidden_size, zoneout_cell, zoneout_hidden, nullptr);
  });
}

void regularised_gate_grads_(
    at::Tensor& grad_hy, at::Tensor& grad_cy, const std::optional<at::Tensor>& grad_gates, const at::Tensor& gates,
    const at::Tensor& cx, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, at::Tensor& grad_preactivation, at::Tensor& grad_input_part,
    at::Tensor& grad_hidden_part, at::Tensor& grad_normalized_cell) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &grad_hy, &grad_cy, &gates, &cx, &input_part, &hidden_part, &normalized_cell, &layer_norm_rstd,
           &grad_preactivation, &grad_input_part, &grad_hidden_part, &grad_normalized_cell}) {
    check_input(*t, "argument", gates);
    TORCH_CHECK(t->is_contiguous(), "the emulated ops take contiguous tensors");
  }
  const int64_t batch = gates.size(0), hidden_size = cx.size(1);
  const at::Tensor gg = optional_dense(grad_gates), ln_ih = optional_dense(layer_norm_ih);
  const at::Tensor ln_hh = optional_dense(layer_norm_hh), ln_cw = optional_dense(layer_norm_cell_weight);
  const at::Tensor ln_cb = optional_dense(layer_norm_cell_bias);
  const at::Tensor zc = optional_dense(zoneout_cell_mask), zh = optional_dense(zoneout_hidden_mask);
  if (batch == 0 || hidden_size == 0) {
    return;
  }
  const bool layer_norm = ln_ih.defined();
  const auto saved = [&](const at::Tensor& t) { return layer_norm ? t : at::Tensor(); };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "emulated_regularised_gate_grads", [&] {
    const kernels::RegularisedBackwardPointers<scalar_t> p{
        grad_hy.mutable_data_ptr<scalar_t>(), grad_cy.mutable_data_ptr<scalar_t>(), data_or_null<scalar_t>(gg),
        gates.const_data_ptr<scalar_t>(), cx.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(ln_ih),
        data_or_null<scalar_t>(ln_hh), data_or_null<scalar_t>(ln_cw), data_or_null<scalar_t>(ln_cb),
        data_or_null<scalar_t>(saved(input_part)), data_or_null<scalar_t>(saved(hidden_part)),
        data_or_null<scalar_t>(saved(normalized_cell)), data_or_null<scalar_t>(saved(layer_norm_rstd)),
        data_or_null<scalar_t>(zc), data_or_null<scalar_t>(zh), grad_preactivation.mutable_data_ptr<scalar_t>(),
        layer_norm ? grad_input_part.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? grad_hidden_part.mutable_data_ptr<scalar_t>() : nullptr,
        layer_norm ? grad_normalized_cell.mutable_data_ptr<scalar_t>() : nullptr};
    kernels::launch_regularised_gate_grads<scalar_t>(p, batch, hidden_size, zoneout_cell, zoneout_hidden, nullptr);
  });
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
      "sequence_forward(Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool allow_tf32, int max_shared_bytes, int max_blocks, "
      "Tensor? weight_hr=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, int)",
      &sequence_forward);
  m.def(
      "sequence_inference(Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse, bool allow_tf32, int max_shared_bytes, int max_blocks, "
      "Tensor? weight_hr=None) -> (Tensor, Tensor, Tensor, int)",
      &sequence_inference);
  m.def(
      "sequence_backward(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor? grad_cell_states, "
      "Tensor? grad_gates, Tensor input, Tensor batch_sizes, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor output, Tensor cell_states, Tensor gates, bool reverse, bool[6] output_mask, "
      "int max_shared_bytes, int max_blocks, Tensor? weight_hr=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int)",
      &sequence_backward);
  m.def("selftest(str name, int blocks, int threads) -> Tensor", &selftest);
  m.def(
      "regularised_pointwise_(Tensor(a!) input_part, Tensor(b!) hidden_part, Tensor? bias, Tensor? layer_norm_ih, "
      "Tensor? layer_norm_hh, Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, Tensor hx, Tensor cx, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "Tensor(c!) gates, Tensor(d!) hy, Tensor(e!) cy, Tensor(f!) normalized_cell, Tensor(g!) layer_norm_rstd) -> ()",
      &regularised_pointwise_);
  m.def(
      "regularised_gate_grads_(Tensor(a!) grad_hy, Tensor(b!) grad_cy, Tensor? grad_gates, Tensor gates, Tensor cx, "
      "Tensor? layer_norm_ih, Tensor? layer_norm_hh, Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, "
      "Tensor input_part, Tensor hidden_part, Tensor normalized_cell, Tensor layer_norm_rstd, "
      "Tensor? zoneout_cell_mask, Tensor? zoneout_hidden_mask, float zoneout_cell, float zoneout_hidden, "
      "Tensor(c!) grad_preactivation, Tensor(d!) grad_input_part, Tensor(e!) grad_hidden_part, "
      "Tensor(f!) grad_normalized_cell) -> ()",
      &regularised_gate_grads_);
}

}  // namespace lstm_fused_emulated
