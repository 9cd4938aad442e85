// The CUDA kernels of the sequence ops (sequence_forward / sequence_inference / sequence_backward, the ops lf.LSTM calls
// per layer and direction): the persistent kernels of cell_kernels.cuh where the call allows them
// (a padded batch, weights that fit in a block's shared memory, a grid that can be co-resident;
// with or without a projection), else the device-independent loop of csrc/sequence.cpp, whose per-step products and
// pointwise launches run on the GPU too. The choice and the persistent path are op_layer.h's,
// shared with the tests' emulated build; this file supplies what only a GPU knows (occupancy, the
// stream) and what only the library links (poisonable outputs, the backward's products).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops.h"
#include "../sequence.h"
#include "cell_kernels.cuh"
#include "op_layer.h"

namespace lstm_fused {
namespace {

// How many blocks of `kernel` at `shared_bytes` can be alive together on the current GPU:
// cooperative launches need every block co-resident, and SM counts and shared memory differ
// between GPUs. 0 blocks when the device cannot launch cooperatively or the shared memory exceeds
// its opt-in limit.
template <typename Kernel>
cuda::CooperativeLimits cooperative_limits(Kernel kernel, size_t shared_bytes) {
  const int device = c10::cuda::current_device();
  int cooperative = 0;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const cuda::CooperativeLimits refused{static_cast<size_t>(optin), 0};
  if (cooperative == 0 || shared_bytes > static_cast<size_t>(optin)) {
    return refused;
  }
  C10_CUDA_CHECK(cudaFuncSetAttribute(
      reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  int per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_multiprocessor, reinterpret_cast<const void*>(kernel), cuda::kSequenceThreads, shared_bytes));
  // Every SM but one: headroom for kernels of other streams, which would otherwise hold an SM the
  // grid barrier waits on.
  const int multiprocessors = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return {static_cast<size_t>(optin), static_cast<int64_t>(per_multiprocessor) * std::max(1, multiprocessors - 1)};
}

// op_layer.h's Device, for the current GPU.
struct Gpu {
  using Guard = c10::cuda::CUDAGuard;
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
    return check_sequence_forward_args(input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr);
  }
  template <typename... Args>
  SequenceForwardOutputs forward_loop(const Args&... args) const {
    return sequence_forward_loop(args...);
  }
  template <typename... Args>
  SequenceBackwardOutputs backward_loop(const Args&... args) const {
    return sequence_backward_loop(args...);
  }
  template <typename scalar_t>
  cuda::CooperativeLimits forward_limits(const cuda::SequencePlan& wanted) const {
    return cooperative_limits(cuda::persistent_forward_kernel<scalar_t>(wanted.tensor_cores), wanted.shared_bytes);
  }
  template <typename scalar_t>
  cuda::CooperativeLimits backward_limits(const cuda::SequencePlan& wanted) const {
    return cooperative_limits(cuda::sequence_backward_persistent_kernel<scalar_t>, wanted.shared_bytes);
  }
  cudaStream_t stream() const {
    return at::cuda::getCurrentCUDAStream();
  }
  at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return lstm_fused::new_output(sizes, options);
  }
  cuda::SequenceProducts products(
      const at::Tensor& grad_preactivation,
      const at::Tensor& input,
      const at::Tensor& hidden,
      const at::Tensor& weight_ih,
      const std::array<bool, 6>& output_mask) const {
    const InputAndWeightGrads grads = input_and_weight_grads(grad_preactivation, input, hidden, weight_ih, output_mask);
    return {grads.input, grads.weight_ih, grads.weight_hh, grads.bias};
  }
};

SequenceForwardOutputs sequence_forward_cuda(
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
  cuda::SequencePath path;
  return cuda::sequence_forward_op(
      Gpu{}, &path, input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
      at::globalContext().allowTF32CuBLAS(), weight_hr);
}

SequenceInferenceOutputs sequence_inference_cuda(
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
  cuda::SequencePath path;
  return cuda::sequence_inference_op(
      Gpu{}, &path, input, batch_sizes, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
      at::globalContext().allowTF32CuBLAS(), weight_hr);
}

SequenceBackwardOutputs sequence_backward_cuda(
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
  cuda::SequencePath path;
  return cuda::sequence_backward_op(
      Gpu{}, &path, grad_output, grad_hy, grad_cy, grad_cell_states, grad_gates, input, batch_sizes, hx, cx, weight_ih,
      weight_hh, output, cell_states, gates, reverse, output_mask, weight_hr);
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("sequence_forward", &sequence_forward_cuda);
  m.impl("sequence_inference", &sequence_inference_cuda);
  m.impl("sequence_backward", &sequence_backward_cuda);
}

}  // namespace lstm_fused
