// See matmul.h for why the CPU's float32 products bypass at::mm.
#include "matmul.h"

#include "cpu/capability.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>

namespace lstm_fused {
namespace {

// One thread: a reorder pays for itself after 5 products at [8,512]x[512,2048], 10 at
// [8,256]x[256,1024] (145 us against 15 us saved each), 25 at [16,128]x[128,512].
constexpr int64_t kUsesWorthReordering = 32;
// Two threads, a whole cell step with its products in plain layout (forward and backward): at 1-2M
// multiply-adds a product oneDNN still lost to MKL by 10-50% (B=64 H=64, B=8 H=256), at 4M they
// tie, above that oneDNN wins by up to 2x.
constexpr int64_t kMultiplyAddsWorthOnednn = int64_t{1} << 22;

using LinearPointwiseFn = at::Tensor(
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    c10::string_view,
    c10::List<std::optional<c10::Scalar>>,
    std::optional<c10::string_view>);
using ReorderLinearWeightFn = at::Tensor(const at::Tensor&, std::optional<int64_t>);

// ATen's oneDNN ops, looked up once. They are internal (Inductor's): absent from builds without
// oneDNN, and free to change between torch versions; either way at::mm takes over.
template <typename Fn>
std::optional<c10::TypedOperatorHandle<Fn>> find_cpu_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle.has_value() || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
    return std::nullopt;
  }
  try {
    return handle->typed<Fn>();
  } catch (const c10::Error&) {  // a signature other than the one this file was written for
    return std::nullopt;
  }
}

const std::optional<c10::TypedOperatorHandle<LinearPointwiseFn>>& onednn_linear_op() {
  static const auto op = find_cpu_op<LinearPointwiseFn>("mkldnn::_linear_pointwise");
  return op;
}

const std::optional<c10::TypedOperatorHandle<ReorderLinearWeightFn>>& onednn_reorder_op() {
  static const auto op = find_cpu_op<ReorderLinearWeightFn>("mkldnn::_reorder_linear_weight");
  return op;
}

// Whether `rows` rows times weight^T (weight [features, inner], of the input's dtype and device, or
// already reordered, which only oneDNN reads) go to oneDNN.
bool uses_onednn(int64_t rows, const at::Tensor& weight, int64_t threshold = kMultiplyAddsWorthOnednn) {
  if (weight.is_mkldnn()) {
    return true;
  }
  return weight.device().is_cpu() && weight.scalar_type() == at::kFloat &&
      rows * weight.size(0) * weight.size(1) >= threshold && at::globalContext().userEnabledMkldnn() &&
      onednn_linear_op().has_value();
}

// bfloat16 products already reach oneDNN through at::mm; what a repeated product gains from the op
// is the weight reordered once rather than at every call. oneDNN builds bfloat16 primitives only
// on CPUs with AVX-512 (AVX512-BF16 or AMX where present); elsewhere at::mm keeps its own route.
bool reorders_bfloat16(const at::Tensor& weight) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool onednn_has_bfloat16 = cpu::cpu_has("avx512");
#else
  static const bool onednn_has_bfloat16 = false;  // aarch64 oneDNN (ACL) bfloat16 is not measured here
#endif
  return onednn_has_bfloat16 && weight.device().is_cpu() && weight.scalar_type() == at::kBFloat16 &&
      at::globalContext().userEnabledMkldnn() && onednn_linear_op().has_value();
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  // The op reads a strided bias as if it were contiguous (NaN or garbage, found by the
  // non-contiguous parity tests), so bias and x go in contiguous (no copy when they already are).
  const std::optional<at::Tensor> contiguous_bias =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  return onednn_linear_op()->call(
      x.contiguous(), weight, contiguous_bias, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// float16 on a CPU without float16 arithmetic (AVX512-FP16): ATen's float16 GEMM there ran at 22
// GFLOP/s ([512,512]x[512,2048], Zen 5, one thread: 49 ms), the same product converted to float32
// and back in 11.5 ms, with the float32 accumulation the float16 GEMM has. So those products run
// in float32 (through oneDNN where it pays, as float32 does), their results rounded to float16 once.
bool float16_in_float32(const at::Tensor& x) {
  if (!x.device().is_cpu() || x.scalar_type() != at::kHalf) {
    return false;
  }
#if defined(__x86_64__) || defined(__i386__)
  static const bool native_float16 = cpu::cpuinfo_has("avx512_fp16");
  return !native_float16;
#else
  return false;  // aarch64's float16 GEMM is not measured here: keep the library's
#endif
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.is_mkldnn() ? t : t.to(at::kFloat);
}

}  // namespace

at::Tensor linear_product(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (float16_in_float32(x)) {
    const std::optional<at::Tensor> float_bias = bias.has_value() ? std::optional<at::Tensor>(as_float(*bias)) : std::nullopt;
    return linear_product(as_float(x), as_float(weight), float_bias).to(at::kHalf);
  }
  if (uses_onednn(x.size(0), weight)) {
    return onednn_linear(x, weight, bias);
  }
  return bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
}

void linear_product_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, bool accumulate) {
  if (float16_in_float32(x)) {
    // Added to out in float32, rounded once.
    const at::Tensor product = linear_product(as_float(x), as_float(weight), std::nullopt);
    accumulate ? out.add_(product) : out.copy_(product);
    return;
  }
  if (uses_onednn(x.size(0), weight)) {
    // The op returns a new tensor; adding or copying it costs a pass over out, small beside the product.
    const at::Tensor product = onednn_linear(x, weight, std::nullopt);
    accumulate ? out.add_(product) : out.copy_(product);
    return;
  }
  accumulate ? out.addmm_(x, weight.t()) : at::mm_out(out, x, weight.t());
}

std::vector<at::Tensor> transposed_products(const at::Tensor& left, const std::vector<at::Tensor>& rights) {
  if (float16_in_float32(left)) {
    std::vector<at::Tensor> float_rights;
    for (const at::Tensor& right : rights) {
      float_rights.push_back(as_float(right));
    }
    std::vector<at::Tensor> products = transposed_products(as_float(left), float_rights);
    for (at::Tensor& product : products) {
      product = product.to(at::kHalf);
    }
    return products;
  }
  std::vector<at::Tensor> products;
  // As linear products: x = left^T, weight = right^T.
  const at::Tensor left_t = left.t();
  // oneDNN wants left^T contiguous, and transposing a tall left (every step's gate gradients) is
  // slow: ATen's transposing copy ran at about 1 GB/s here (B=64 H=256 T=512: 150 ms of a 1.5 s
  // training step). BLAS reads the transposed operand in place. So oneDNN only where its AVX-512
  // code beats MKL's AVX2 code on AMD CPUs (see matmul.h); on AVX2-only CPUs MKL took 7.0 against
  // 7.4 + 1.1 (transpose) ms at [1024,1024]^T x [1024,256], 274-375 against 438-499 ms for both
  // weight gradients at 32768 rows, and lf.LSTM's training step went from 1.01x to 1.18x nn.LSTM's
  // speed at B=64 H=256 T=512 (0.98x to 1.10x at B=16).
#if defined(__x86_64__) || defined(__i386__)
  static const bool onednn_is_faster = cpu::cpu_has("avx512");
#else
  static const bool onednn_is_faster = true;  // no MKL there: keep the library ATen prefers
#endif
  if (onednn_is_faster &&
      std::all_of(rights.begin(), rights.end(), [&](const at::Tensor& right) { return uses_onednn(left_t.size(0), right.t()); })) {
    // The op takes its left operand contiguous: transpose once for all products. Its right
    // operand (weight) may be strided.
    const at::Tensor left_t_contiguous = left_t.contiguous();
    for (const at::Tensor& right : rights) {
      products.push_back(onednn_linear(left_t_contiguous, right.t(), std::nullopt));
    }
  } else {
    for (const at::Tensor& right : rights) {
      products.push_back(at::mm(left_t, right));
    }
  }
  return products;
}

at::Tensor prepare_repeated_weight(const at::Tensor& weight, int64_t batch, int64_t uses) {
  if (float16_in_float32(weight)) {
    // Converted once for every use (the products convert a float16 weight each time).
    return prepare_repeated_weight(weight.to(at::kFloat), batch, uses);
  }
  if (uses < kUsesWorthReordering || !(uses_onednn(batch, weight) || reorders_bfloat16(weight)) ||
      !onednn_reorder_op().has_value()) {
    return weight;
  }
  return onednn_reorder_op()->call(weight, batch);
}

}  // namespace lstm_fused
