// The regularised LSTM's float loops (csrc/cpu/regularised_cell.cpp) over Vec: the activations and
// tanh (five exp or tanh a unit) over whole vectors, the scalar loop there finishing each row; and
// layer norm's row passes, forward and backward, with scalar tails here.
#include <cmath>

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

float normalise_row(float* v, int64_t n, float epsilon) {
  const float zero = 0.0f;
  Vec total = Vec::broadcast(&zero);
  int64_t k = 0;
  for (; k + Vec::kWidth <= n; k += Vec::kWidth) {
    total = total + Vec::load(v + k);
  }
  float sum_v = sum(total);
  for (int64_t t = k; t < n; ++t) {
    sum_v += v[t];
  }
  const float mean = sum_v / static_cast<float>(n);
  const Vec means = Vec::broadcast(&mean);
  Vec squares = Vec::broadcast(&zero);
  for (k = 0; k + Vec::kWidth <= n; k += Vec::kWidth) {
    const Vec centred = Vec::load(v + k) - means;
    squares = fma(centred, centred, squares);
  }
  float sum_squares = sum(squares);
  for (int64_t t = k; t < n; ++t) {
    sum_squares += (v[t] - mean) * (v[t] - mean);
  }
  const float rstd = 1.0f / std::sqrt(sum_squares / static_cast<float>(n) + epsilon);
  const Vec rstds = Vec::broadcast(&rstd);
  for (k = 0; k + Vec::kWidth <= n; k += Vec::kWidth) {
    ((Vec::load(v + k) - means) * rstds).store(v + k);
  }
  for (int64_t t = k; t < n; ++t) {
    v[t] = (v[t] - mean) * rstd;
  }
  return rstd;
}

void layer_norm_backward_row(const float* grad, const float* gamma, const float* x_hat, float rstd, int64_t n,
                             float* out) {
  const float zero = 0.0f;
  Vec sums = Vec::broadcast(&zero), sums_x_hat = Vec::broadcast(&zero);
  int64_t k = 0;
  for (; k + Vec::kWidth <= n; k += Vec::kWidth) {
    const Vec dy = Vec::load(grad + k) * Vec::load(gamma + k);
    sums = sums + dy;
    sums_x_hat = fma(dy, Vec::load(x_hat + k), sums_x_hat);
  }
  float sum_dy = sum(sums), sum_dy_x_hat = sum(sums_x_hat);
  for (int64_t t = k; t < n; ++t) {
    sum_dy += grad[t] * gamma[t];
    sum_dy_x_hat += grad[t] * gamma[t] * x_hat[t];
  }
  const float mean = sum_dy / static_cast<float>(n), mean_x_hat = sum_dy_x_hat / static_cast<float>(n);
  const Vec means = Vec::broadcast(&mean), means_x_hat = Vec::broadcast(&mean_x_hat), rstds = Vec::broadcast(&rstd);
  for (k = 0; k + Vec::kWidth <= n; k += Vec::kWidth) {
    const Vec dy = Vec::load(grad + k) * Vec::load(gamma + k);
    (rstds * (dy - means - Vec::load(x_hat + k) * means_x_hat)).store(out + k);
  }
  for (int64_t t = k; t < n; ++t) {
    out[t] = rstd * (grad[t] * gamma[t] - mean - x_hat[t] * mean_x_hat);
  }
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
