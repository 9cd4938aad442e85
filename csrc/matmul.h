// The sequence loop's matrix products, each sent to the fastest library ATen offers for it.
//
// On the CPU, float32 products go to oneDNN (ATen's mkldnn::_linear_pointwise op) rather than to
// at::mm, which calls MKL: on the AMD EPYC of our CI, MKL's float32 GEMM runs its AVX2 code and
// takes 2.3-2.5x oneDNN's AVX-512 time at every shape the LSTM uses (one thread: a step's
// [8,256]x[256,1024] 60 against 33 us, [512,256]x[256,1024] 2.35 against 1.02 ms). nn.LSTM itself
// runs on oneDNN there. float16 products on x86 CPUs without AVX512-FP16 run in float32 (ATen's
// float16 GEMM there is a slow generic loop: matmul.cpp). Everything else (CUDA; float64, which
// oneDNN lacks; bfloat16, which ATen already sends to oneDNN) goes through at::mm, and so do
// products under about a million multiply-adds, where oneDNN's fixed cost per call (~10 us against
// MKL's ~2) outweighs its speed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace lstm_fused {

// x @ weight^T (+ bias), as F.linear for 2-D x.
at::Tensor linear_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

// out = x @ weight^T, or out += x @ weight^T when accumulate. out: a contiguous [rows, features].
void linear_product_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, bool accumulate);

// left^T @ right for each right: the weight gradients G^T X, G^T H of all steps at once. Through
// oneDNN after one transpose of left on CPUs with AVX-512; elsewhere through BLAS, which reads left
// transposed in place (a transpose of every step's gate gradients costs more than oneDNN saves).
std::vector<at::Tensor> transposed_products(const at::Tensor& left, const std::vector<at::Tensor>& rights);

// weight as linear_product_into should hold it when it multiplies `uses` batches of at most `batch`
// rows: on the oneDNN path and for enough uses, reordered once into oneDNN's blocked layout (a
// reorder costs 5 to 25 products and saves up to a third of each, at any row count); otherwise weight.
at::Tensor prepare_repeated_weight(const at::Tensor& weight, int64_t batch, int64_t uses);

}  // namespace lstm_fused
