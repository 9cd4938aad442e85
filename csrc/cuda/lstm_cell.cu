// The CUDA ops of the LSTM cell and of the persistent sequence kernels: argument checks, device
// guard, allocation, and the choice of path.
// The kernels and their launch planning live in cell_kernels.cuh, which the tests also compile for
// the CPU against their emulation of CUDA (tests/emulated_cuda/), so what runs here has run in CI.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "cell_kernels.cuh"
#include "sequence_host.h"

namespace lstm_fused {
namespace {

int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

void cell_pointwise_cuda(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy) {
  check_cell_pointwise_args(gates, cx, bias, hy, cy);
  const c10::cuda::CUDAGuard device_guard(gates.device());
  const int64_t batch = gates.size(0);
  const int64_t hidden_size = gates.size(1) / 4;
  if (batch == 0 || hidden_size == 0) {
    return;  // nothing to write, and a zero-size grid is a launch error
  }
  const at::Tensor cx_contiguous = cx.contiguous();
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_fused_cell_pointwise_cuda", [&] {
    cuda::launch_cell_pointwise<scalar_t>(
        gates.mutable_data_ptr<scalar_t>(), cx_contiguous.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(bias_contiguous), hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>(),
        batch, hidden_size, multiprocessor_count(), at::cuda::getCurrentCUDAStream());
  });
}

cuda::ForwardDtype forward_dtype(at::ScalarType dtype) {
  if (dtype == at::kHalf || dtype == at::kBFloat16) {
    return cuda::ForwardDtype::kReduced;
  }
  return dtype == at::kDouble ? cuda::ForwardDtype::kDouble : cuda::ForwardDtype::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  // Checked before the guard: the checks name a tensor on the wrong device, and a CUDAGuard on a
  // CPU input would fail with a less helpful message.
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::cuda::CUDAGuard device_guard(input.device());
  // Autocast must not recast the products of an op whose dtype was fixed by its caller.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t batch = input.size(0);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();

  at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {hy, cy, gates};  // every output is empty
  }

  // The path reads the TF32 setting as the cuBLAS products would: with TF32 allowed, float32
  // products go to tensor cores from a lower batch (cell_kernels.cuh, use_fused_forward).
  if (!cuda::use_fused_forward(
          batch, hidden_size, forward_dtype(input.scalar_type()), at::globalContext().allowTF32CuBLAS())) {
    // Both products accumulate into one [batch, 4 * hidden] buffer; bias_ih rides on the first,
    // bias_hh is added by the pointwise kernel. With input_size 0 the first product writes zeros.
    if (bias_ih.has_value()) {
      at::addmm_out(gates, *bias_ih, input, weight_ih.t());
    } else {
      at::mm_out(gates, input, weight_ih.t());
    }
    gates.addmm_(hx, weight_hh.t());
    cell_pointwise_cuda(gates, cx, bias_hh, hy, cy);
    return {hy, cy, gates};
  }

  // The kernel indexes rows densely. Activations are small; weights are normally contiguous already
  // (a parameter view that is not would be copied here on every step).
  const at::Tensor input_c = input.contiguous();
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor weight_ih_c = weight_ih.contiguous();
  const at::Tensor weight_hh_c = weight_hh.contiguous();
  const at::Tensor bias_ih_c = contiguous_or_undefined(bias_ih);
  const at::Tensor bias_hh_c = contiguous_or_undefined(bias_hh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_cell_forward_cuda", [&] {
    const cuda::ForwardPointers<scalar_t> pointers{
        input_c.const_data_ptr<scalar_t>(),
        hx_c.const_data_ptr<scalar_t>(),
        cx_c.const_data_ptr<scalar_t>(),
        weight_ih_c.const_data_ptr<scalar_t>(),
        weight_hh_c.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(bias_ih_c),
        data_or_null<scalar_t>(bias_hh_c),
        hy.mutable_data_ptr<scalar_t>(),
        cy.mutable_data_ptr<scalar_t>(),
        gates.mutable_data_ptr<scalar_t>()};
    const cuda::ForwardPlan plan = cuda::launch_fused_forward<scalar_t>(
        pointers, batch, input.size(1), hidden_size, multiprocessor_count(), at::cuda::getCurrentCUDAStream());
    TORCH_INTERNAL_ASSERT(plan.blocks > 0 && plan.blocks <= INT_MAX, "use_fused_forward must exclude this grid");
  });
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor> cell_gate_grads_cuda(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  check_cell_gate_grads_args(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const c10::cuda::CUDAGuard device_guard(cx.device());
  const int64_t batch = cx.size(0);
  const int64_t hidden_size = cx.size(1);
  const auto options = cx.options();
  at::Tensor grad_preactivation = new_output({batch, 4 * hidden_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {grad_preactivation, grad_cx};
  }

  const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
  const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
  const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor cy_c = cy.contiguous();
  const at::Tensor gates_c = gates.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_fused_cell_gate_grads_cuda", [&] {
    cuda::launch_cell_gate_grads<scalar_t>(
        data_or_null<scalar_t>(grad_hy_c), data_or_null<scalar_t>(grad_cy_c), data_or_null<scalar_t>(grad_gates_c),
        cx_c.const_data_ptr<scalar_t>(), cy_c.const_data_ptr<scalar_t>(), gates_c.const_data_ptr<scalar_t>(),
        grad_preactivation.mutable_data_ptr<scalar_t>(), grad_cx.mutable_data_ptr<scalar_t>(), batch, hidden_size,
        multiprocessor_count(), at::cuda::getCurrentCUDAStream());
  });
  return {grad_preactivation, grad_cx};
}

// How many blocks of the persistent kernel at `shared_bytes` can be alive together on this GPU:
// cooperative launches need every block co-resident, and SM counts and shared memory differ
// between GPUs. 0 when the device cannot launch cooperatively or the shared memory exceeds its
// opt-in limit.
template <typename Kernel>
int64_t cooperative_capacity(Kernel kernel, size_t shared_bytes, size_t* max_shared_bytes) {
  const int device = c10::cuda::current_device();
  int cooperative = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  *max_shared_bytes = static_cast<size_t>(optin);
  if (cooperative == 0 || shared_bytes > static_cast<size_t>(optin)) {
    return 0;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  int per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_multiprocessor, reinterpret_cast<const void*>(kernel), cuda::kSequenceThreads, shared_bytes));
  // Every SM but one: headroom for kernels of other streams, which would otherwise hold an SM the
  // grid barrier waits on.
  return static_cast<int64_t>(per_multiprocessor) * std::max(1, multiprocessor_count() - 1);
}

// One layer direction over a padded [T, B, I] sequence (every sequence of full length): one GEMM
// for the input projection of all steps, then one cooperative launch for the recurrence. Shapes the
// persistent kernel cannot hold fall back to a GEMM and a pointwise launch per step. Returns
// output [T, B, H], hy, cy, cell_states [T, B, H], gates [T, B, 4H] (as sequence_forward's, in the
// padded layout).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_forward_persistent_cuda(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh,
    bool reverse) {
  TORCH_CHECK(
      input.dim() == 3 && input.size(0) > 0,
      "lstm_fused: sequence_forward_persistent's input must be [steps > 0, batch, input_size], got ", input.sizes());
  check_cell_forward_args(input[0], hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::cuda::CUDAGuard device_guard(input.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();
  at::Tensor output = new_output({steps, batch, hidden_size}, options);
  at::Tensor cell_states = new_output({steps, batch, hidden_size}, options);
  at::Tensor gates = new_output({steps, batch, 4 * hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {output, hy, cy, cell_states, gates};
  }
  const at::Tensor projected = cuda::project_inputs(input, weight_ih, bias_ih, bias_hh);

  bool launched = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_sequence_persistent", [&] {
    size_t max_shared = 0;
    const cuda::SequencePlan wanted = cuda::plan_persistent_sequence<scalar_t>(batch, hidden_size, SIZE_MAX, INT64_MAX);
    const int64_t capacity = cooperative_capacity(
        cuda::persistent_forward_kernel<scalar_t>(wanted.tensor_cores), wanted.shared_bytes, &max_shared);
    const cuda::SequencePlan plan = cuda::plan_persistent_sequence<scalar_t>(batch, hidden_size, max_shared, capacity);
    if (!plan.fits) {
      return;
    }
    const at::Tensor w_hh = weight_hh.contiguous();
    const at::Tensor h0 = hx.contiguous();
    const at::Tensor c0 = cx.contiguous();
    const cuda::SequencePointers<scalar_t> pointers{
        projected.const_data_ptr<scalar_t>(), w_hh.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
        c0.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), cell_states.mutable_data_ptr<scalar_t>(),
        gates.mutable_data_ptr<scalar_t>(), hy.mutable_data_ptr<scalar_t>(), cy.mutable_data_ptr<scalar_t>()};
    cuda::launch_persistent_sequence<scalar_t>(
        pointers, cuda::SequenceShape{steps, batch, hidden_size, reverse}, plan, at::cuda::getCurrentCUDAStream());
    launched = true;
  });
  if (launched) {
    return {output, hy, cy, cell_states, gates};
  }
  // Fallback: per step one GEMM into that step's gates (projection + h W_hh^T) and the pointwise
  // kernel, writing h and c straight into the step's rows of output and cell_states.
  at::Tensor h = hx;
  at::Tensor c = cx;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    at::Tensor step_gates = gates[t];
    at::addmm_out(step_gates, projected[t], h, weight_hh.t());
    at::Tensor h_t = output[t];
    at::Tensor c_t = cell_states[t];
    cell_pointwise_cuda(step_gates, c, std::nullopt, h_t, c_t);
    h = h_t;
    c = c_t;
  }
  hy.copy_(h);
  cy.copy_(c);
  return {output, hy, cy, cell_states, gates};
}

// Backpropagation through time for sequence_forward_persistent: the recurrence of the gradients in
// one cooperative launch, then the library products that need none (sequence_host.h). Shapes the
// persistent kernel cannot hold fall back to a pointwise launch and a GEMM per step.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_backward_persistent_cuda(
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
  TORCH_CHECK(
      input.dim() == 3 && input.size(0) > 0,
      "lstm_fused: sequence_backward_persistent's input must be [steps > 0, batch, input_size], got ", input.sizes());
  check_cell_forward_args(input[0], hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt);
  const int64_t steps = input.size(0);
  const int64_t batch = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  for (const auto& [t, name, width] : {std::tuple<const at::Tensor&, const char*, int64_t>{output, "output", hidden_size},
                                       {cell_states, "cell_states", hidden_size},
                                       {gates, "gates", 4 * hidden_size}}) {
    TORCH_CHECK(
        t.sizes() == at::IntArrayRef({steps, batch, width}) && t.device() == input.device() &&
            t.scalar_type() == input.scalar_type(),
        "lstm_fused: ", name, " must be the forward's [", steps, ", ", batch, ", ", width, "] ", input.scalar_type(),
        " tensor on ", input.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  }
  const c10::cuda::CUDAGuard device_guard(input.device());
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto options = input.options();
  at::Tensor grad_preactivation = new_output({steps, batch, 4 * hidden_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    grad_preactivation.zero_();
    grad_cx.zero_();
  } else {
    const at::Tensor grad_output_c = contiguous_or_undefined(grad_output);
    const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
    const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
    const at::Tensor cx_c = cx.contiguous();
    const at::Tensor cell_states_c = cell_states.contiguous();
    const at::Tensor gates_c = gates.contiguous();
    bool launched = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_sequence_backward", [&] {
      size_t max_shared = 0;
      const size_t wanted = cuda::plan_persistent_sequence_backward<scalar_t>(hidden_size, SIZE_MAX, INT64_MAX).shared_bytes;
      const int64_t capacity =
          cooperative_capacity(cuda::sequence_backward_persistent_kernel<scalar_t>, wanted, &max_shared);
      const cuda::SequencePlan plan = cuda::plan_persistent_sequence_backward<scalar_t>(hidden_size, max_shared, capacity);
      if (!plan.fits) {
        return;
      }
      const at::Tensor w_hh = weight_hh.contiguous();
      const cuda::SequenceBackwardPointers<scalar_t> pointers{
          data_or_null<scalar_t>(grad_output_c), data_or_null<scalar_t>(grad_hy_c), data_or_null<scalar_t>(grad_cy_c),
          w_hh.const_data_ptr<scalar_t>(), cx_c.const_data_ptr<scalar_t>(), cell_states_c.const_data_ptr<scalar_t>(),
          gates_c.const_data_ptr<scalar_t>(), grad_preactivation.mutable_data_ptr<scalar_t>(),
          grad_cx.mutable_data_ptr<scalar_t>()};
      cuda::launch_persistent_sequence_backward<scalar_t>(
          pointers, cuda::SequenceShape{steps, batch, hidden_size, reverse}, plan, at::cuda::getCurrentCUDAStream());
      launched = true;
    });
    if (!launched) {
      // Per step, in the reverse of the forward's order: the gradient reaching h_t (from the
      // outputs, the final state, and the step after through W_hh), then the pointwise backward.
      at::Tensor recurrent = at::zeros({batch, hidden_size}, options);
      at::Tensor grad_c = grad_cy_c.defined() ? grad_cy_c : at::zeros({batch, hidden_size}, options);
      for (int64_t s = steps - 1; s >= 0; --s) {
        const int64_t t = reverse ? steps - 1 - s : s;
        const int64_t t_prev = reverse ? t + 1 : t - 1;
        at::Tensor grad_h = recurrent;
        if (grad_output_c.defined()) {
          grad_h = grad_h + grad_output_c[t];
        }
        if (s == steps - 1 && grad_hy_c.defined()) {
          grad_h = grad_h + grad_hy_c;
        }
        const at::Tensor c_prev = s == 0 ? cx_c : cell_states_c[t_prev];
        auto [step_grads, grad_c_prev] =
            cell_gate_grads_cuda(grad_h, grad_c, std::nullopt, c_prev, cell_states_c[t], gates_c[t]);
        grad_preactivation[t].copy_(step_grads);
        grad_c = grad_c_prev;
        recurrent = at::mm(step_grads, weight_hh);
      }
      grad_cx.copy_(grad_c);
    }
  }
  const cuda::SequenceGrads grads =
      cuda::sequence_products(grad_preactivation, input, hx, output, weight_ih, weight_hh, reverse);
  return {grads.input, grads.hx, grad_cx, grads.weight_ih, grads.weight_hh, grads.bias};
}

}  // namespace

// Registered here, with the CUDA build only: the persistent kernel has no CPU counterpart yet, and
// lf.LSTM does not call them yet (wiring them needs csrc/sequence.cpp and csrc/autograd.cpp).
TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def(
      "sequence_forward_persistent(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias_ih, Tensor? bias_hh, bool reverse) -> "
      "(Tensor output, Tensor hy, Tensor cy, Tensor cell_states, Tensor gates)");
  m.def(
      "sequence_backward_persistent(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, "
      "Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor cell_states, Tensor gates, bool reverse) -> "
      "(Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("cell_forward", &cell_forward_cuda);
  m.impl("cell_pointwise_", &cell_pointwise_cuda);
  m.impl("cell_gate_grads", &cell_gate_grads_cuda);
  m.impl("sequence_forward_persistent", &sequence_forward_persistent_cuda);
  m.impl("sequence_backward_persistent", &sequence_backward_persistent_cuda);
}

}  // namespace lstm_fused
