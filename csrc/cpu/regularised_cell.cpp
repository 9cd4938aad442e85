// CPU kernels of the regularised LSTM step (csrc/regularised.cpp has the schemas and the loop):
// the layer normalisations, gates, zoneout and their backward in one pass over each batch row,
// after the step's two products. Templated on the scalar type (float32, float64) and compiled
// once; for float the exp and tanh loops, most of the cost, run over kernels/vec.h's Vec through
// the per-instruction-set table (kernels/regularised_units.cpp), and the scalar loop finishes each
// row. The row reductions of layer norm are why a row, not a unit range, is the unit of work.
// The float32 batches small_batch.h takes run instead the fused recurrence of
// regularised_sequence.h, whose entry points are at the end of this file.
// The per-unit formulas are regularised_cell_math.h's, which the CUDA kernels share
// (csrc/cuda/regularised_kernels.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../regularised_cell_math.h"
#include "kernels/kernels.h"

namespace lstm_fused {
namespace {

using math::kLayerNormEpsilon;

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// v <- (v - mean(v)) / sqrt(var(v) + eps) over n values (biased variance); returns 1 / sqrt(var + eps).
template <typename T>
T normalise_in_place(T* v, int64_t n) {
  T mean = 0;
  for (int64_t k = 0; k < n; ++k) {
    mean += v[k];
  }
  mean /= T(n);
  T sum_squares = 0;
  for (int64_t k = 0; k < n; ++k) {
    const T centred = v[k] - mean;
    sum_squares += centred * centred;
  }
  const T rstd = math::layer_norm_rstd(sum_squares, T(n));
  for (int64_t k = 0; k < n; ++k) {
    v[k] = (v[k] - mean) * rstd;
  }
  return rstd;
}

// The gradient of LN(v; gamma) with respect to v, in place over grad (the gradient of LN's output):
// rstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)) with dy = grad * gamma. Written to out.
template <typename T>
void layer_norm_backward(const T* grad, const T* gamma, const T* x_hat, T rstd, int64_t n, T* out) {
  T sum = 0, sum_x_hat = 0;
  for (int64_t k = 0; k < n; ++k) {
    const T dy = grad[k] * gamma[k];
    sum += dy;
    sum_x_hat += dy * x_hat[k];
  }
  const T mean = sum / T(n), mean_x_hat = sum_x_hat / T(n);
  for (int64_t k = 0; k < n; ++k) {
    out[k] = math::layer_norm_input_grad(rstd, grad[k] * gamma[k], mean, x_hat[k], mean_x_hat);
  }
}

float normalise_in_place(float* v, int64_t n) {
  return cpu::kernels().normalise_row(v, n, static_cast<float>(kLayerNormEpsilon));
}

void layer_norm_backward(const float* grad, const float* gamma, const float* x_hat, float rstd, int64_t n, float* out) {
  cpu::kernels().layer_norm_backward_row(grad, gamma, x_hat, rstd, n, out);
}

// The vector loops where there are some (float): each returns the first unit it left to the caller.
template <typename T>
int64_t vector_activations(T*, const T*, T*, int64_t) {
  return 0;
}
int64_t vector_activations(float* gates, const float* cell_prev, float* cell_new, int64_t hidden_size) {
  return cpu::kernels().regularised_activations(gates, cell_prev, cell_new, hidden_size);
}
template <typename T>
int64_t vector_tanh(const T*, T*, int64_t) {
  return 0;
}
int64_t vector_tanh(const float* in, float* out, int64_t count) {
  return cpu::kernels().tanh_units(in, out, count);
}

// tanh(n) of a row into out, n = LN(c~) (layer norm) or c~.
template <typename T>
void tanh_of_normalised(bool layer_norm, const T* g_c, const T* b_c, const T* n_hat, const T* c_new, int64_t H,
                        T* out) {
  for (int64_t j = 0; j < H; ++j) {
    out[j] = layer_norm ? g_c[j] * n_hat[j] + b_c[j] : c_new[j];
  }
  for (int64_t j = vector_tanh(out, out, H); j < H; ++j) {
    out[j] = math::tanh_(out[j]);
  }
}

// Rows per task: a row is ~20 transcendental-free flops and 3 exp/tanh per unit.
int64_t rows_per_task(int64_t hidden_size) {
  return std::max<int64_t>(1, 2048 / std::max<int64_t>(1, hidden_size));
}

template <typename T>
void forward_rows(
    at::Tensor& input_part, at::Tensor& hidden_part, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    at::Tensor& gates, at::Tensor& hy, at::Tensor& cy, at::Tensor& normalized_cell, at::Tensor& layer_norm_rstd) {
  const int64_t batch = gates.size(0), H = hy.size(1);
  const bool layer_norm = layer_norm_ih.has_value();
  T* xp_all = input_part.mutable_data_ptr<T>();
  T* hp_all = hidden_part.mutable_data_ptr<T>();
  const T* b = data_or_null<T>(bias);
  const T* g_ih = data_or_null<T>(layer_norm_ih);
  const T* g_hh = data_or_null<T>(layer_norm_hh);
  const T* g_c = data_or_null<T>(layer_norm_cell_weight);
  const T* b_c = data_or_null<T>(layer_norm_cell_bias);
  const T* h_prev_all = hx.const_data_ptr<T>();
  const T* c_prev_all = cx.const_data_ptr<T>();
  const T* zc_all = data_or_null<T>(zoneout_cell_mask);
  const T* zh_all = data_or_null<T>(zoneout_hidden_mask);
  T* gates_all = gates.mutable_data_ptr<T>();
  T* hy_all = hy.mutable_data_ptr<T>();
  T* cy_all = cy.mutable_data_ptr<T>();
  T* n_all = layer_norm ? normalized_cell.mutable_data_ptr<T>() : nullptr;
  T* rstd_all = layer_norm ? layer_norm_rstd.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, batch, rows_per_task(H), [&](int64_t begin, int64_t end) {
    std::vector<T> tanh_n(H);
    for (int64_t r = begin; r < end; ++r) {
      T* xp = xp_all + r * 4 * H;
      T* hp = hp_all + r * 4 * H;
      T* g = gates_all + r * 4 * H;
      const T* h_prev = h_prev_all + r * H;
      const T* c_prev = c_prev_all + r * H;
      T* h = hy_all + r * H;
      T* c = cy_all + r * H;
      if (layer_norm) {
        const T rstd_ih = normalise_in_place(xp, 4 * H);
        const T rstd_hh = normalise_in_place(hp, 4 * H);
        for (int64_t k = 0; k < 4 * H; ++k) {
          g[k] = g_ih[k] * xp[k] + g_hh[k] * hp[k] + (b ? b[k] : T(0));
        }
        rstd_all[r * 3 + 0] = rstd_ih;
        rstd_all[r * 3 + 1] = rstd_hh;
      } else {
        for (int64_t k = 0; k < 4 * H; ++k) {
          g[k] = xp[k] + hp[k] + (b ? b[k] : T(0));
        }
      }
      // Activations; c-tilde (the un-zoned new cell state) goes to c for now.
      for (int64_t j = vector_activations(g, c_prev, c, H); j < H; ++j) {
        const auto unit =
            math::regularised_activation(math::Gates<T>{g[j], g[H + j], g[2 * H + j], g[3 * H + j]}, c_prev[j]);
        g[j] = unit.gates.input;
        g[H + j] = unit.gates.forget;
        g[2 * H + j] = unit.gates.cell;
        g[3 * H + j] = unit.gates.output;
        c[j] = unit.cell_tilde;
      }
      T* n_hat = nullptr;
      if (layer_norm) {
        n_hat = n_all + r * H;
        std::copy(c, c + H, n_hat);
        rstd_all[r * 3 + 2] = normalise_in_place(n_hat, H);
      }
      const T* zc = zc_all ? zc_all + r * H : nullptr;
      const T* zh = zh_all ? zh_all + r * H : nullptr;
      tanh_of_normalised(layer_norm, g_c, b_c, n_hat, c, H, tanh_n.data());
      for (int64_t j = 0; j < H; ++j) {
        const T h_new = g[3 * H + j] * tanh_n[j];
        const T d_c = zc ? zc[j] : T(zoneout_cell), d_h = zh ? zh[j] : T(zoneout_hidden);
        c[j] = math::zoneout(d_c, c_prev[j], c[j]);
        h[j] = math::zoneout(d_h, h_prev[j], h_new);
      }
    }
  });
}

void regularised_pointwise_cpu(
    at::Tensor& input_part, at::Tensor& hidden_part, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& layer_norm_ih, const std::optional<at::Tensor>& layer_norm_hh,
    const std::optional<at::Tensor>& layer_norm_cell_weight, const std::optional<at::Tensor>& layer_norm_cell_bias,
    const at::Tensor& hx, const at::Tensor& cx, const std::optional<at::Tensor>& zoneout_cell_mask,
    const std::optional<at::Tensor>& zoneout_hidden_mask, double zoneout_cell, double zoneout_hidden,
    at::Tensor& gates, at::Tensor& hy, at::Tensor& cy, at::Tensor& normalized_cell, at::Tensor& layer_norm_rstd) {
  for (const at::Tensor* t : {&input_part, &hidden_part, &gates, &hy, &cy, &normalized_cell, &layer_norm_rstd}) {
    TORCH_CHECK(t->is_contiguous(), "lstm_fused::regularised_pointwise_: outputs must be contiguous");
  }
  const at::Tensor hx_c = hx.contiguous(), cx_c = cx.contiguous();
  auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "regularised_pointwise_", [&] {
    forward_rows<scalar_t>(
        input_part, hidden_part, contiguous(bias), contiguous(layer_norm_ih), contiguous(layer_norm_hh),
        contiguous(layer_norm_cell_weight), contiguous(layer_norm_cell_bias), hx_c, cx_c, contiguous(zoneout_cell_mask),
        contiguous(zoneout_hidden_mask), zoneout_cell, zoneout_hidden, gates, hy, cy, normalized_cell, layer_norm_rstd);
  });
}

template <typename T>
void backward_rows(
    at::Tensor& grad_hy, at::Tensor& grad_cy, const std::optional<at::Tensor>& grad_gates, const at::Tensor& gates,
    const at::Tensor& cx, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, at::Tensor& grad_preactivation, at::Tensor& grad_input_part,
    at::Tensor& grad_hidden_part, at::Tensor& grad_normalized_cell) {
  const int64_t batch = gates.size(0), H = cx.size(1);
  const bool layer_norm = layer_norm_ih.has_value();
  T* gh_all = grad_hy.mutable_data_ptr<T>();
  T* gc_all = grad_cy.mutable_data_ptr<T>();
  const T* gg_all = data_or_null<T>(grad_gates);
  const T* gates_all = gates.const_data_ptr<T>();
  const T* c_prev_all = cx.const_data_ptr<T>();
  const T* g_ih = data_or_null<T>(layer_norm_ih);
  const T* g_hh = data_or_null<T>(layer_norm_hh);
  const T* g_c = data_or_null<T>(layer_norm_cell_weight);
  const T* b_c = data_or_null<T>(layer_norm_cell_bias);
  const T* x_hat_ih_all = layer_norm ? input_part.const_data_ptr<T>() : nullptr;
  const T* x_hat_hh_all = layer_norm ? hidden_part.const_data_ptr<T>() : nullptr;
  const T* n_hat_all = layer_norm ? normalized_cell.const_data_ptr<T>() : nullptr;
  const T* rstd_all = layer_norm ? layer_norm_rstd.const_data_ptr<T>() : nullptr;
  const T* zc_all = data_or_null<T>(zoneout_cell_mask);
  const T* zh_all = data_or_null<T>(zoneout_hidden_mask);
  T* da_all = grad_preactivation.mutable_data_ptr<T>();
  T* dxp_all = layer_norm ? grad_input_part.mutable_data_ptr<T>() : nullptr;
  T* dhp_all = layer_norm ? grad_hidden_part.mutable_data_ptr<T>() : nullptr;
  T* dn_all = layer_norm ? grad_normalized_cell.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, batch, rows_per_task(H), [&](int64_t begin, int64_t end) {
    std::vector<T> c_new_row(H), tanh_n(H);
    for (int64_t r = begin; r < end; ++r) {
      T* gh = gh_all + r * H;
      T* gc = gc_all + r * H;
      const T* gg = gg_all ? gg_all + r * 4 * H : nullptr;
      const T* g = gates_all + r * 4 * H;
      const T* c_prev = c_prev_all + r * H;
      const T* zc = zc_all ? zc_all + r * H : nullptr;
      const T* zh = zh_all ? zh_all + r * H : nullptr;
      T* da = da_all + r * 4 * H;
      // Pass 1: through h = d_h h_prev + (1 - d_h) o tanh(n), to the gradient of n. da's cell chunk
      // holds it (without layer norm n is c-tilde, so it is already c-tilde's share).
      T* dn = layer_norm ? dn_all + r * H : da + 2 * H;
      const T* n_hat = layer_norm ? n_hat_all + r * H : nullptr;
      T sum_dy = 0, sum_dy_n_hat = 0;
      if (!layer_norm) {
        for (int64_t j = 0; j < H; ++j) {
          c_new_row[j] = math::cell_tilde(math::Gates<T>{g[j], g[H + j], g[2 * H + j], g[3 * H + j]}, c_prev[j]);
        }
      }
      tanh_of_normalised(layer_norm, g_c, b_c, n_hat, c_new_row.data(), H, tanh_n.data());
      for (int64_t j = 0; j < H; ++j) {
        const T d_h = zh ? zh[j] : T(zoneout_hidden);
        const auto unit =
            math::regularised_hidden_backward(g[3 * H + j], tanh_n[j], d_h, gh[j], gg ? gg[3 * H + j] : T(0));
        gh[j] = unit.grad_hidden_prev;
        da[3 * H + j] = unit.grad_output_preact;
        dn[j] = unit.grad_normalized;
        if (layer_norm) {
          const T dy = dn[j] * g_c[j];
          sum_dy += dy;
          sum_dy_n_hat += dy * n_hat[j];
        }
      }
      const T rstd_c = layer_norm ? rstd_all[r * 3 + 2] : T(0);
      const T mean_dy = sum_dy / T(H), mean_dy_n_hat = sum_dy_n_hat / T(H);
      // Pass 2: c-tilde's gradient, then c_prev's and the other gates'.
      for (int64_t j = 0; j < H; ++j) {
        const T grad_from_h =
            layer_norm ? math::layer_norm_input_grad(rstd_c, dn[j] * g_c[j], mean_dy, n_hat[j], mean_dy_n_hat) : dn[j];
        const T d_c = zc ? zc[j] : T(zoneout_cell);
        const auto unit = math::regularised_cell_backward(
            math::Gates<T>{g[j], g[H + j], g[2 * H + j], g[3 * H + j]}, c_prev[j], d_c, grad_from_h, gc[j],
            gg ? gg[j] : T(0), gg ? gg[H + j] : T(0), gg ? gg[2 * H + j] : T(0));
        gc[j] = unit.grad_cell_prev;
        da[j] = unit.grad_input_preact;
        da[H + j] = unit.grad_forget_preact;
        da[2 * H + j] = unit.grad_cell_preact;
      }
      if (layer_norm) {
        layer_norm_backward(da, g_ih, x_hat_ih_all + r * 4 * H, rstd_all[r * 3 + 0], 4 * H, dxp_all + r * 4 * H);
        layer_norm_backward(da, g_hh, x_hat_hh_all + r * 4 * H, rstd_all[r * 3 + 1], 4 * H, dhp_all + r * 4 * H);
      }
    }
  });
}

void regularised_gate_grads_cpu(
    at::Tensor& grad_hy, at::Tensor& grad_cy, const std::optional<at::Tensor>& grad_gates, const at::Tensor& gates,
    const at::Tensor& cx, const std::optional<at::Tensor>& layer_norm_ih,
    const std::optional<at::Tensor>& layer_norm_hh, const std::optional<at::Tensor>& layer_norm_cell_weight,
    const std::optional<at::Tensor>& layer_norm_cell_bias, const at::Tensor& input_part,
    const at::Tensor& hidden_part, const at::Tensor& normalized_cell, const at::Tensor& layer_norm_rstd,
    const std::optional<at::Tensor>& zoneout_cell_mask, const std::optional<at::Tensor>& zoneout_hidden_mask,
    double zoneout_cell, double zoneout_hidden, at::Tensor& grad_preactivation, at::Tensor& grad_input_part,
    at::Tensor& grad_hidden_part, at::Tensor& grad_normalized_cell) {
  for (const at::Tensor* t : {&grad_hy, &grad_cy, &grad_preactivation, &grad_input_part, &grad_hidden_part,
                              &grad_normalized_cell}) {
    TORCH_CHECK(t->is_contiguous(), "lstm_fused::regularised_gate_grads_: outputs must be contiguous");
  }
  auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "regularised_gate_grads_", [&] {
    backward_rows<scalar_t>(
        grad_hy, grad_cy, contiguous(grad_gates), gates.contiguous(), cx.contiguous(), contiguous(layer_norm_ih),
        contiguous(layer_norm_hh), contiguous(layer_norm_cell_weight), contiguous(layer_norm_cell_bias),
        input_part.contiguous(), hidden_part.contiguous(), normalized_cell.contiguous(), layer_norm_rstd.contiguous(),
        contiguous(zoneout_cell_mask), contiguous(zoneout_hidden_mask), zoneout_cell, zoneout_hidden,
        grad_preactivation, grad_input_part, grad_hidden_part, grad_normalized_cell);
  });
}

}  // namespace

namespace cpu {
namespace regularised {
// The fused recurrence (regularised_sequence.h) of the instruction set capability.cpp chose.
void sequence_forward(const SequenceForward& args, int threads) {
  kernels().regularised_sequence_forward(args, threads);
}
void sequence_backward(const SequenceBackward& args, int threads) {
  kernels().regularised_sequence_backward(args, threads);
}
}  // namespace regularised
}  // namespace cpu

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("regularised_pointwise_", &regularised_pointwise_cpu);
  m.impl("regularised_gate_grads_", &regularised_gate_grads_cpu);
}

}  // namespace lstm_fused
