// The transcendental part of the regularised LSTM's float kernels (csrc/cpu/regularised_cell.cpp)
// over Vec, whole vectors of units; the scalar loop there finishes each row. The layer norms'
// row reductions stay scalar in that file: these are the loops that cost (five exp or tanh a unit).
#include "kernels.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {

namespace {
LSTM_FUSED_ALWAYS_INLINE Vec sigmoid(Vec x) {
  const float one = 1.0f;
  const Vec ones = Vec::broadcast(&one);
  return ones / (ones + exp_(-x));
}
}  // namespace

int64_t regularised_activations(float* gates, const float* cell_prev, float* cell_new, int64_t hidden_size) {
  const int64_t H = hidden_size;
  int64_t j = 0;
  for (; j + Vec::kWidth <= H; j += Vec::kWidth) {
    const Vec i = sigmoid(Vec::load(gates + j));
    const Vec f = sigmoid(Vec::load(gates + H + j));
    const Vec g = tanh_(Vec::load(gates + 2 * H + j));
    const Vec o = sigmoid(Vec::load(gates + 3 * H + j));
    i.store(gates + j);
    f.store(gates + H + j);
    g.store(gates + 2 * H + j);
    o.store(gates + 3 * H + j);
    fma(f, Vec::load(cell_prev + j), i * g).store(cell_new + j);
  }
  return j;
}

int64_t tanh_units(const float* in, float* out, int64_t count) {
  int64_t j = 0;
  for (; j + Vec::kWidth <= count; j += Vec::kWidth) {
    tanh_(Vec::load(in + j)).store(out + j);
  }
  return j;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
