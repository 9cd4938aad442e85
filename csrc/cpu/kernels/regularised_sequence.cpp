// The loops of regularised_sequence.h, written once over Vec (vec.h) and compiled once per
// instruction set: per step the recurrent product through small_batch.cpp's panel_products, then
// the step's pointwise pass (layer norms, gates, zoneout, the masks), forward and backward.
//
// Threads as small_batch.cpp's sequences share them: by batch rows where every thread gets at
// least 4 rows and hidden <= 512 (no thread then waits on another), else by hidden units, meeting
// once a step. Layer norm reduces over a whole row, so split by units its pointwise pass runs by
// rows instead, after a second meeting; zoneout and the dropout masks are per unit and follow the
// units.
//
// Row tails (hidden not a multiple of the vector) go through the same vector code with partial
// loads and stores: no scalar copy of the formulas compiled for this instruction set.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "../regularised_sequence.h"
#include "../threads.h"
#include "kernels.h"
#include "recurrence.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using regularised::Options;
using regularised::SequenceBackward;
using regularised::SequenceForward;
using small_batch::kMaxSequenceBatch;

constexpr int64_t kLanes = Vec::kWidth;
constexpr float kLayerNormEpsilon = 1e-5f;

// --- whole and partial vectors through one body ---

struct Whole {};
LSTM_FUSED_ALWAYS_INLINE Vec ld(const float* p, Whole) { return Vec::load(p); }
LSTM_FUSED_ALWAYS_INLINE Vec ld(const float* p, const Mask& m) { return load(p, m); }
LSTM_FUSED_ALWAYS_INLINE void st(float* p, Vec x, Whole) { x.store(p); }
LSTM_FUSED_ALWAYS_INLINE void st(float* p, Vec x, const Mask& m) { store(p, x, m); }

// body(j, lanes) for the vectors of [first, end): whole ones, then one partial (lanes: Whole or Mask).
template <typename Body>
LSTM_FUSED_ALWAYS_INLINE void for_vectors(int64_t first, int64_t end, const Body& body) {
  int64_t j = first;
  for (; j + kLanes <= end; j += kLanes) {
    body(j, Whole{});
  }
  if (j < end) {
    body(j, Mask(Tail{end - j}));
  }
}

LSTM_FUSED_ALWAYS_INLINE Vec sigmoid(Vec x) {
  const Vec one(1.0f);
  return one / (one + exp_(-x));
}

// A zoneout probability as the step reads it: the mask's lanes, or the probability (evaluation).
template <typename Lanes>
LSTM_FUSED_ALWAYS_INLINE Vec zoneout_at(const float* mask_row, float probability, int64_t j, const Lanes& lanes) {
  return mask_row != nullptr ? ld(mask_row + j, lanes) : Vec(probability);
}

// --- one row's pointwise pass ---

// Where one row of a step reads and writes.
struct Row {
  int64_t b;        // the batch row
  int64_t packed;   // its row in the packed tensors
  const float* hidden_prev;
  const float* cell_prev;
  const float* zoneout_cell;    // mask rows, or null
  const float* zoneout_hidden;
  const float* dropout;         // recurrent dropout mask row, or null
};

Row row_at(const Options& o, const RecurrenceStep& step, int64_t b, const float* output, const float* cell_states,
           const float* hx, const float* cx) {
  const int64_t H = o.hidden_size;
  const int64_t packed = step.offset + b;
  const bool carried = b < step.carried;
  return {b,
          packed,
          carried ? output + (step.previous_offset + b) * H : hx + b * H,
          carried ? cell_states + (step.previous_offset + b) * H : cx + b * H,
          o.zoneout_cell_mask ? o.zoneout_cell_mask + packed * H : nullptr,
          o.zoneout_hidden_mask ? o.zoneout_hidden_mask + packed * H : nullptr,
          o.recurrent_dropout_mask ? o.recurrent_dropout_mask + b * H : nullptr};
}

// The new states from the activated gates and c~ (cell holds c~ on entry), tanh's argument being
// c~ or, with layer norm, g_c LN(c~) + b_c (normalized: LN(c~)); zoneout mixes in the old states.
template <typename Lanes>
LSTM_FUSED_ALWAYS_INLINE void new_states(const SequenceForward& a, const Row& r, const float* gates, float* cell,
                                         float* hidden, float* masked, const float* normalized, int64_t j,
                                         const Lanes& lanes) {
  const Options& o = a.options;
  const int64_t H = o.hidden_size;
  const Vec c_new = ld(cell + j, lanes);
  const Vec tanh_argument =
      normalized ? fma(ld(o.layer_norm_cell_weight + j, lanes), ld(normalized + j, lanes), ld(o.layer_norm_cell_bias + j, lanes))
                 : c_new;
  const Vec h_new = ld(gates + 3 * H + j, lanes) * tanh_(tanh_argument);
  const Vec d_c = zoneout_at(r.zoneout_cell, o.zoneout_cell, j, lanes);
  const Vec d_h = zoneout_at(r.zoneout_hidden, o.zoneout_hidden, j, lanes);
  // d x_prev + (1 - d) x_new
  const Vec c = fma(d_c, ld(r.cell_prev + j, lanes) - c_new, c_new);
  const Vec h = fma(d_h, ld(r.hidden_prev + j, lanes) - h_new, h_new);
  st(cell + j, c, lanes);
  st(hidden + j, h, lanes);
  if (masked != nullptr) {
    st(masked + j, h * ld(r.dropout + j, lanes), lanes);
  }
}

// Activates the gates in place and writes c~ = f c_prev + i g to cell.
template <typename Lanes>
LSTM_FUSED_ALWAYS_INLINE void activate(float* gates, int64_t H, const float* cell_prev, float* cell, int64_t j,
                                       const Lanes& lanes) {
  const Vec i = sigmoid(ld(gates + j, lanes));
  const Vec f = sigmoid(ld(gates + H + j, lanes));
  const Vec g = tanh_(ld(gates + 2 * H + j, lanes));
  const Vec o = sigmoid(ld(gates + 3 * H + j, lanes));
  st(gates + j, i, lanes);
  st(gates + H + j, f, lanes);
  st(gates + 2 * H + j, g, lanes);
  st(gates + 3 * H + j, o, lanes);
  st(cell + j, fma(f, ld(cell_prev + j, lanes), i * g), lanes);
}

// Without layer norm, units [first, end) of a row whose gates hold the pre-activations (biases
// and both products).
void forward_units(const SequenceForward& a, const Row& r, int64_t first, int64_t end) {
  const int64_t H = a.options.hidden_size;
  float* gates = a.gates + r.packed * kGates * H;
  float* cell = a.cell_states + r.packed * H;
  float* hidden = a.output + r.packed * H;
  float* masked = r.dropout ? a.masked_hidden + r.packed * H : nullptr;
  for_vectors(first, end, [&](int64_t j, const auto& lanes) {
    activate(gates, H, r.cell_prev, cell, j, lanes);
    new_states(a, r, gates, cell, hidden, masked, nullptr, j, lanes);
  });
}

// x's lanes, zero past a partial vector's (a centred value there would be -mean, not zero).
LSTM_FUSED_ALWAYS_INLINE Vec in_lanes(Vec x, Whole) { return x; }
LSTM_FUSED_ALWAYS_INLINE Vec in_lanes(Vec x, const Mask& m) {
  float lanes[kLanes] = {};
  st(lanes, x, m);
  return Vec::load(lanes);
}

// 1 / std of n values of mean `mean` (biased variance), the centred squares in one pass.
float rstd_of(const float* v, int64_t n, float mean) {
  Vec squares(0.0f);
  for_vectors(0, n, [&](int64_t k, const auto& lanes) {
    const Vec centred = in_lanes(ld(v + k, lanes) - Vec(mean), lanes);
    squares = fma(centred, centred, squares);
  });
  return 1.0f / std::sqrt(sum(squares) / static_cast<float>(n) + kLayerNormEpsilon);
}

// With layer norm, a whole row: both products normalised in place, the pre-activation
// g_ih x^ + g_hh h^ + b, the gates, c~ and its normalisation, the new states. The two products'
// statistics read both rows in the same passes (sums, then centred squares), and the pass that
// normalises them also writes the pre-activation; c~'s sum comes with the activations, its
// normalisation with the new states: 4 passes over the [4H] rows and 3 over [H] (were 8 and 6).
void forward_normalised_row(const SequenceForward& a, const Row& r) {
  const Options& o = a.options;
  const int64_t H = o.hidden_size, width = kGates * H;
  float* input_part = a.input_part + r.packed * width;
  float* hidden_part = a.hidden_part + r.packed * width;
  float* gates = a.gates + r.packed * width;
  float* cell = a.cell_states + r.packed * H;
  float* normalized = a.normalized_cell + r.packed * H;
  float* rstd = a.layer_norm_rstd + r.packed * 3;
  Vec sum_ih(0.0f), sum_hh(0.0f);
  for_vectors(0, width, [&](int64_t k, const auto& lanes) {
    sum_ih = sum_ih + ld(input_part + k, lanes);
    sum_hh = sum_hh + ld(hidden_part + k, lanes);
  });
  const float mean_ih = sum(sum_ih) / static_cast<float>(width), mean_hh = sum(sum_hh) / static_cast<float>(width);
  Vec squares_ih(0.0f), squares_hh(0.0f);
  for_vectors(0, width, [&](int64_t k, const auto& lanes) {
    const Vec centred_ih = in_lanes(ld(input_part + k, lanes) - Vec(mean_ih), lanes);
    const Vec centred_hh = in_lanes(ld(hidden_part + k, lanes) - Vec(mean_hh), lanes);
    squares_ih = fma(centred_ih, centred_ih, squares_ih);
    squares_hh = fma(centred_hh, centred_hh, squares_hh);
  });
  const float rstd_ih = 1.0f / std::sqrt(sum(squares_ih) / static_cast<float>(width) + kLayerNormEpsilon);
  const float rstd_hh = 1.0f / std::sqrt(sum(squares_hh) / static_cast<float>(width) + kLayerNormEpsilon);
  rstd[0] = rstd_ih;
  rstd[1] = rstd_hh;
  for_vectors(0, width, [&](int64_t k, const auto& lanes) {
    const Vec x_ih = (ld(input_part + k, lanes) - Vec(mean_ih)) * Vec(rstd_ih);
    const Vec x_hh = (ld(hidden_part + k, lanes) - Vec(mean_hh)) * Vec(rstd_hh);
    st(input_part + k, x_ih, lanes);
    st(hidden_part + k, x_hh, lanes);
    const Vec total = fma(ld(o.layer_norm_ih + k, lanes), x_ih, ld(o.layer_norm_hh + k, lanes) * x_hh);
    st(gates + k, a.bias ? total + ld(a.bias + k, lanes) : total, lanes);
  });
  Vec sum_cell(0.0f);
  for_vectors(0, H, [&](int64_t j, const auto& lanes) {
    activate(gates, H, r.cell_prev, cell, j, lanes);
    sum_cell = sum_cell + ld(cell + j, lanes);  // zero past the row (partial loads)
  });
  const float mean_cell = sum(sum_cell) / static_cast<float>(H);
  const float rstd_cell = rstd_of(cell, H, mean_cell);
  rstd[2] = rstd_cell;
  float* masked = r.dropout ? a.masked_hidden + r.packed * H : nullptr;
  for_vectors(0, H, [&](int64_t j, const auto& lanes) {
    st(normalized + j, (ld(cell + j, lanes) - Vec(mean_cell)) * Vec(rstd_cell), lanes);
    new_states(a, r, gates, cell, a.output + r.packed * H, masked, normalized, j, lanes);
  });
}

// --- how the team shares a sequence ---

struct Share {
  int64_t first_unit, end_unit;  // the products' columns (hidden units, all four gates of each)
  int64_t first_row, end_row;    // the products' rows, of the widest step
  // The rows whose layer-norm pointwise pass the thread runs (whole rows).
  int64_t first_normalised_row, end_normalised_row;
  bool meets_every_step;

  static int64_t rows_in(int64_t first, int64_t end, const RecurrenceStep& step) {
    return std::max<int64_t>(0, std::min(end, step.batch) - first);
  }
  int64_t rows_at(const RecurrenceStep& step) const {
    return first_unit >= end_unit ? 0 : rows_in(first_row, end_row, step);
  }
  int64_t normalised_rows_at(const RecurrenceStep& step) const {
    return rows_in(first_normalised_row, end_normalised_row, step);
  }
};

// By rows or by units as recurrence.h's splits_by_rows says (its team_size assumes the same rule);
// split by units, layer norm's pass still goes by rows.
Share share_sequence(int64_t batch, int64_t hidden_size, int thread, int num_threads) {
  if (num_threads == 1 || splits_by_rows(batch, hidden_size, num_threads)) {
    const auto [first_row, end_row] = even_share(batch, 1, thread, num_threads);
    return {0, hidden_size, first_row, end_row, first_row, end_row, false};
  }
  const auto [first, end] = even_share(hidden_size, kLanes, thread, num_threads);
  const auto [first_row, end_row] = even_share(batch, 1, thread, num_threads);
  return {first, end, 0, batch, first_row, end_row, true};
}

int64_t total_rows(const Options& o) {
  int64_t rows = 0;
  for (int64_t k = 0; k < o.num_steps; ++k) {
    rows += o.steps[k].batch;
  }
  return rows;
}

void run_forward(const SequenceForward& a, int threads) {
  const Options& o = a.options;
  const int64_t H = o.hidden_size, width = kGates * H;
  const bool layer_norm = o.layer_norm_ih != nullptr;
  const bool dropout = o.recurrent_dropout_mask != nullptr;
  const int64_t batch = widest_step(o.steps, o.num_steps), rows_total = total_rows(o);
  // With recurrent dropout the products read h * m_r: every row's after it is computed, h_0's
  // after all rows.
  const float* masked_hx = dropout ? a.masked_hidden + rows_total * H : nullptr;
  threads = team_size(batch, H, threads);
  run_team(threads, [&](int thread, int num_threads) {
    const Share share = share_sequence(batch, H, thread, num_threads);
    const int64_t first = share.first_unit, end = share.end_unit;
    const float* hidden_prev[kMaxSequenceBatch];
    for (int64_t k = 0; k < o.num_steps; ++k) {
      const RecurrenceStep& step = o.steps[k];
      // Step k's product reads every unit of step k - 1's hidden states.
      if (k > 0 && share.meets_every_step) {
        team_barrier();
      }
      const int64_t rows = share.rows_at(step);
      if (rows > 0) {
        const float* previous = dropout ? a.masked_hidden : a.output;
        const float* initial = dropout ? masked_hx : a.hx;
        for (int64_t i = 0; i < rows; ++i) {
          hidden_prev[i] = state_row(step, share.first_row + i, previous, initial, H);
        }
        // With layer norm the product is normalised on its own: it goes to hidden_part.
        float* out = (layer_norm ? a.hidden_part : a.gates) + (step.offset + share.first_row) * width;
        for (int64_t gate = 0; gate < kGates; ++gate) {
          const float* panels = gate_panels_from(a.gate_panels, H, H * kLanes, gate, first);
          panel_products(hidden_prev, rows, H, panels, end - first, out + gate * H + first, width,
                         /*accumulate=*/!layer_norm);
        }
      }
      int64_t first_row = share.first_row, end_row = share.first_row + rows;
      if (layer_norm) {
        // The normalisation reads every unit of the row's product.
        if (share.meets_every_step) {
          team_barrier();
        }
        first_row = share.first_normalised_row;
        end_row = first_row + share.normalised_rows_at(step);
      }
      const int64_t first_unit = layer_norm ? 0 : first, end_unit = layer_norm ? H : end;
      for (int64_t b = first_row; b < end_row; ++b) {
        const Row r = row_at(o, step, b, a.output, a.cell_states, a.hx, a.cx);
        layer_norm ? forward_normalised_row(a, r) : forward_units(a, r, first_unit, end_unit);
        if (b >= step.ending) {
          const size_t bytes = (end_unit - first_unit) * sizeof(float);
          std::memcpy(a.hy + b * H + first_unit, a.output + r.packed * H + first_unit, bytes);
          std::memcpy(a.cy + b * H + first_unit, a.cell_states + r.packed * H + first_unit, bytes);
        }
      }
    }
  });
}

// --- backward ---

// Units [first, end) of a row's gradients through the step: in place, grad_hidden becomes
// d_h grad_h (what reaches h_prev through zoneout) and grad_cell the gradient of c_prev; writes
// the gate pre-activations' gradient, and with layer norm that of LN(c~) (the whole row then).
// tanh's argument is recomputed from the saved gates (c~) or LN(c~).
template <bool kLayerNorm>
void backward_units(const SequenceBackward& a, const Row& r, int64_t first, int64_t end, float* grad_sums) {
  const Options& o = a.options;
  const int64_t H = o.hidden_size, width = kGates * H;
  const float* gates = a.gates + r.packed * width;
  const float* grad_gates = a.grad_gates ? a.grad_gates + r.packed * width : nullptr;
  float* grad_hidden = a.grad_hidden + r.b * H;
  float* grad_cell = a.grad_cell + r.b * H;
  float* da = a.grad_preactivations + r.packed * width;
  const float* normalized = kLayerNorm ? a.normalized_cell + r.packed * H : nullptr;
  float* grad_normalized = kLayerNorm ? a.grad_normalized_cell + r.packed * H : nullptr;
  const auto incoming = [&](int64_t offset, int64_t j, const auto& lanes) {
    return grad_gates ? ld(grad_gates + offset + j, lanes) : Vec(0.0f);
  };
  const Vec one(1.0f);
  // Layer norm: the row's sums for the normalisations' parameters (grad_sums' layout, see
  // regularised_sequence.h), added in passes 1 and 2 while their operands are in registers.
  float* sums_ih = grad_sums;
  float* sums_hh = kLayerNorm ? grad_sums + width : nullptr;
  float* sums_cell_weight = kLayerNorm ? grad_sums + 2 * width : nullptr;
  float* sums_cell_bias = kLayerNorm ? sums_cell_weight + H : nullptr;
  const float* input_part = kLayerNorm ? a.input_part + r.packed * width : nullptr;
  const float* hidden_part = kLayerNorm ? a.hidden_part + r.packed * width : nullptr;
  // Pass 1: through h = d_h h_prev + (1 - d_h) o tanh(n) to o's gradient and n's (n: c~, or
  // LN(c~), whose row sums layer norm's backward needs before c~'s gradient).
  Vec sums(0.0f), sums_normalized(0.0f);
  for_vectors(first, end, [&](int64_t j, const auto& lanes) {
    const Vec o_gate = ld(gates + 3 * H + j, lanes);
    Vec tanh_argument;
    if constexpr (kLayerNorm) {
      tanh_argument = fma(ld(o.layer_norm_cell_weight + j, lanes), ld(normalized + j, lanes),
                          ld(o.layer_norm_cell_bias + j, lanes));
    } else {
      tanh_argument = fma(ld(gates + H + j, lanes), ld(r.cell_prev + j, lanes),
                          ld(gates + j, lanes) * ld(gates + 2 * H + j, lanes));
    }
    const Vec tn = tanh_(tanh_argument);
    const Vec d_h = zoneout_at(r.zoneout_hidden, o.zoneout_hidden, j, lanes);
    const Vec gh = ld(grad_hidden + j, lanes);
    const Vec grad_h_new = gh - d_h * gh;
    st(grad_hidden + j, d_h * gh, lanes);
    const Vec grad_o = fma(grad_h_new, tn, incoming(3 * H, j, lanes));
    st(da + 3 * H + j, grad_o * o_gate * (one - o_gate), lanes);
    const Vec grad_n = grad_h_new * o_gate * (one - tn * tn);
    if constexpr (kLayerNorm) {
      st(grad_normalized + j, grad_n, lanes);
      const Vec n_hat = ld(normalized + j, lanes);
      const Vec dy = grad_n * ld(o.layer_norm_cell_weight + j, lanes);  // zero past the row (partial loads)
      sums = sums + dy;
      sums_normalized = fma(dy, n_hat, sums_normalized);
      st(sums_cell_weight + j, fma(grad_n, n_hat, ld(sums_cell_weight + j, lanes)), lanes);
      st(sums_cell_bias + j, grad_n + ld(sums_cell_bias + j, lanes), lanes);
    } else {
      st(da + 2 * H + j, grad_n, lanes);  // c~'s gradient from h, for pass 2
    }
  });
  float mean_dy = 0.0f, mean_dy_normalized = 0.0f, rstd_c = 0.0f;
  if constexpr (kLayerNorm) {
    mean_dy = sum(sums) / static_cast<float>(H);
    mean_dy_normalized = sum(sums_normalized) / static_cast<float>(H);
    rstd_c = a.layer_norm_rstd[r.packed * 3 + 2];
  }
  // Pass 2: c~'s gradient, then c_prev's and those of i, f, g; with layer norm also, for each of
  // the four gates' pre-activation gradient g, the sums the products' normalisations' backward
  // needs (of dy = g gamma and dy x^, ih and hh) and the scales' gradients g x^.
  Vec sum_dy_ih(0.0f), sum_dy_x_ih(0.0f), sum_dy_hh(0.0f), sum_dy_x_hh(0.0f);
  const auto add_product_sums = [&](int64_t k, Vec g, const auto& lanes) {
    const Vec x_ih = ld(input_part + k, lanes), x_hh = ld(hidden_part + k, lanes);
    const Vec dy_ih = g * ld(o.layer_norm_ih + k, lanes), dy_hh = g * ld(o.layer_norm_hh + k, lanes);
    sum_dy_ih = sum_dy_ih + dy_ih;
    sum_dy_x_ih = fma(dy_ih, x_ih, sum_dy_x_ih);
    sum_dy_hh = sum_dy_hh + dy_hh;
    sum_dy_x_hh = fma(dy_hh, x_hh, sum_dy_x_hh);
    st(sums_ih + k, fma(g, x_ih, ld(sums_ih + k, lanes)), lanes);
    st(sums_hh + k, fma(g, x_hh, ld(sums_hh + k, lanes)), lanes);
  };
  for_vectors(first, end, [&](int64_t j, const auto& lanes) {
    const Vec i = ld(gates + j, lanes), f = ld(gates + H + j, lanes), g = ld(gates + 2 * H + j, lanes);
    Vec grad_c_new;
    if constexpr (kLayerNorm) {
      const Vec dy = ld(grad_normalized + j, lanes) * ld(o.layer_norm_cell_weight + j, lanes);
      grad_c_new = Vec(rstd_c) * (dy - Vec(mean_dy) - ld(normalized + j, lanes) * Vec(mean_dy_normalized));
    } else {
      grad_c_new = ld(da + 2 * H + j, lanes);
    }
    const Vec d_c = zoneout_at(r.zoneout_cell, o.zoneout_cell, j, lanes);
    const Vec gc = ld(grad_cell + j, lanes);
    grad_c_new = grad_c_new + (gc - d_c * gc);
    st(grad_cell + j, fma(d_c, gc, f * grad_c_new), lanes);
    const Vec grad_i = fma(grad_c_new, g, incoming(0, j, lanes));
    const Vec grad_f = fma(grad_c_new, ld(r.cell_prev + j, lanes), incoming(H, j, lanes));
    const Vec grad_g = fma(grad_c_new, i, incoming(2 * H, j, lanes));
    const Vec da_i = grad_i * i * (one - i), da_f = grad_f * f * (one - f), da_g = grad_g * (one - g * g);
    st(da + j, da_i, lanes);
    st(da + H + j, da_f, lanes);
    st(da + 2 * H + j, da_g, lanes);
    if constexpr (kLayerNorm) {
      add_product_sums(j, da_i, lanes);
      add_product_sums(H + j, da_f, lanes);
      add_product_sums(2 * H + j, da_g, lanes);
      add_product_sums(3 * H + j, ld(da + 3 * H + j, lanes), lanes);
    }
  });
  if constexpr (kLayerNorm) {
    // Each product's gradient before its normalisation: rstd (dy - mean(dy) - x^ mean(dy x^)).
    const float* rstd = a.layer_norm_rstd + r.packed * 3;
    const Vec rstd_ih(rstd[0]), rstd_hh(rstd[1]);
    const float n = static_cast<float>(width);
    const Vec mean_dy_ih(sum(sum_dy_ih) / n), mean_dy_x_ih(sum(sum_dy_x_ih) / n);
    const Vec mean_dy_hh(sum(sum_dy_hh) / n), mean_dy_x_hh(sum(sum_dy_x_hh) / n);
    float* grad_input_part = a.grad_input_parts + r.packed * width;
    float* grad_hidden_part = a.grad_hidden_parts + r.packed * width;
    for_vectors(0, width, [&](int64_t k, const auto& lanes) {
      const Vec g = ld(da + k, lanes);
      const Vec dy_ih = g * ld(o.layer_norm_ih + k, lanes), dy_hh = g * ld(o.layer_norm_hh + k, lanes);
      st(grad_input_part + k, rstd_ih * (dy_ih - mean_dy_ih - ld(input_part + k, lanes) * mean_dy_x_ih), lanes);
      st(grad_hidden_part + k, rstd_hh * (dy_hh - mean_dy_hh - ld(hidden_part + k, lanes) * mean_dy_x_hh), lanes);
    });
  }
}

// A sequence's last step starts from grad_hy, grad_cy (zero where absent); every step adds its
// rows of grad_output and grad_cell_states. Units [first, end) of row b.
void add_incoming_grads(const SequenceBackward& a, const RecurrenceStep& step, const Row& r, int64_t first,
                        int64_t end) {
  const int64_t H = a.options.hidden_size, b = r.b;
  float* grad_hidden = a.grad_hidden + b * H;
  float* grad_cell = a.grad_cell + b * H;
  const bool last = b >= step.ending;
  for_vectors(first, end, [&](int64_t j, const auto& lanes) {
    Vec gh = last ? (a.grad_hy ? ld(a.grad_hy + b * H + j, lanes) : Vec(0.0f)) : ld(grad_hidden + j, lanes);
    Vec gc = last ? (a.grad_cy ? ld(a.grad_cy + b * H + j, lanes) : Vec(0.0f)) : ld(grad_cell + j, lanes);
    if (a.grad_output) {
      gh = gh + ld(a.grad_output + r.packed * H + j, lanes);
    }
    if (a.grad_cell_states) {
      gc = gc + ld(a.grad_cell_states + r.packed * H + j, lanes);
    }
    st(grad_hidden + j, gh, lanes);
    st(grad_cell + j, gc, lanes);
  });
}

void run_backward(const SequenceBackward& a, int threads) {
  const Options& o = a.options;
  const int64_t H = o.hidden_size, width = kGates * H;
  const bool layer_norm = o.layer_norm_ih != nullptr;
  const bool dropout = o.recurrent_dropout_mask != nullptr;
  // Without zoneout of h the step's own gradient of h_prev is zero: the product overwrites it.
  const bool hidden_carries = o.zoneout_hidden_mask != nullptr || o.zoneout_hidden != 0.0f;
  const int64_t batch = widest_step(o.steps, o.num_steps);
  threads = team_size(batch, H, threads);
  run_team(threads, [&](int thread, int num_threads) {
    const Share share = share_sequence(batch, H, thread, num_threads);
    const int64_t first = share.first_unit, end = share.end_unit;
    const float* grad_rows[kMaxSequenceBatch];
    float* grad_sums = layer_norm ? a.layer_norm_grad_sums + thread * 10 * H : nullptr;
    for (int64_t k = o.num_steps - 1; k >= 0; --k) {
      const RecurrenceStep& step = o.steps[k];
      const int64_t rows = share.rows_at(step);
      const int64_t end_row = share.first_row + rows;
      // Split by units, layer norm's rows read every unit the last step's product wrote.
      if (layer_norm && share.meets_every_step && k < o.num_steps - 1) {
        team_barrier();
      }
      const int64_t first_pointwise_row = layer_norm ? share.first_normalised_row : share.first_row;
      const int64_t end_pointwise_row =
          layer_norm ? first_pointwise_row + share.normalised_rows_at(step) : end_row;
      const int64_t first_unit = layer_norm ? 0 : first, end_unit = layer_norm ? H : end;
      for (int64_t b = first_pointwise_row; b < end_pointwise_row; ++b) {
        const Row r = row_at(o, step, b, a.output, a.cell_states, a.hx, a.cx);
        add_incoming_grads(a, step, r, first_unit, end_unit);
        if (a.previous_masked_hidden != nullptr) {
          float* masked = a.previous_masked_hidden + r.packed * H;
          for_vectors(first_unit, end_unit, [&](int64_t j, const auto& lanes) {
            const Vec h = ld(r.hidden_prev + j, lanes);
            st(masked + j, r.dropout ? h * ld(r.dropout + j, lanes) : h, lanes);
          });
        }
        layer_norm ? backward_units<true>(a, r, first_unit, end_unit, grad_sums)
                   : backward_units<false>(a, r, first_unit, end_unit, nullptr);
      }
      // The product reads every gate column of this step's gradients.
      if (share.meets_every_step) {
        team_barrier();
      }
      if (rows > 0) {
        const float* source = layer_norm ? a.grad_hidden_parts : a.grad_preactivations;
        for (int64_t i = 0; i < rows; ++i) {
          grad_rows[i] = source + (step.offset + share.first_row + i) * width;
        }
        const float* panels = a.unit_panels + first / kLanes * width * kLanes;
        if (dropout) {
          panel_products(grad_rows, rows, width, panels, end - first, a.grad_masked_hidden + share.first_row * H + first,
                         H, /*accumulate=*/false);
          for (int64_t b = share.first_row; b < end_row; ++b) {
            float* grad_hidden = a.grad_hidden + b * H;
            const float* grad_masked = a.grad_masked_hidden + b * H;
            const float* mask = o.recurrent_dropout_mask + b * H;
            for_vectors(first, end, [&](int64_t j, const auto& lanes) {
              const Vec product = ld(grad_masked + j, lanes) * ld(mask + j, lanes);
              st(grad_hidden + j, hidden_carries ? ld(grad_hidden + j, lanes) + product : product, lanes);
            });
          }
        } else {
          panel_products(grad_rows, rows, width, panels, end - first, a.grad_hidden + share.first_row * H + first, H,
                         /*accumulate=*/hidden_carries);
        }
      }
      // Sequences that start here: their gradients are the initial states'.
      for (int64_t b = std::max(step.carried, share.first_row); b < end_row; ++b) {
        const size_t bytes = (end - first) * sizeof(float);
        std::memcpy(a.grad_hx + b * H + first, a.grad_hidden + b * H + first, bytes);
        std::memcpy(a.grad_cx + b * H + first, a.grad_cell + b * H + first, bytes);
      }
    }
  });
}

}  // namespace

void regularised_sequence_forward(const SequenceForward& args, int threads) {
  run_forward(args, threads);
}

void regularised_sequence_backward(const SequenceBackward& args, int threads) {
  run_backward(args, threads);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
