// The CUDA ops of the LSTM cell: argument checks, device guard, allocation, and the choice of path.
// The sequence ops are sequence.cu's.
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
#include "op_layer.h"

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

  // The activated gates are written under no_grad too. They are an output of cell_forward's schema,
  // and nothing the op sees says whether its caller reads them: return_gates=True reads them under
  // any grad mode, the autograd Function runs the op with grad mode off whatever the caller's mode
  // (and saves them when the caller's mode is on), inference_mode skips the autograd kernel
  // altogether. Skipping them needs the caller to say so, through the schema (a trailing
  // `bool need_gates=True`, which csrc/autograd.cpp would set from grad mode and requires_grad,
  // and functional.py from return_gates). The kernel is ready for it: a null gates pointer writes
  // none (tests/test_emulated_cuda.py::test_no_gates_written_when_not_wanted).
  at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {hy, cy, gates};  // every output is empty
  }

  // The path reads the TF32 setting as the cuBLAS products would: with TF32 allowed, float32
  // products go to tensor cores from a lower batch (cell_kernels.cuh, use_fused_forward).
  if (!cuda::use_fused_forward(
          batch, hidden_size, cuda::forward_dtype(input.scalar_type()), at::globalContext().allowTF32CuBLAS())) {
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

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("cell_forward", &cell_forward_cuda);
  m.impl("cell_pointwise_", &cell_pointwise_cuda);
  m.impl("cell_gate_grads", &cell_gate_grads_cuda);
}

}  // namespace lstm_fused
