// The regularised LSTM's fused float32 recurrence (layer norm, zoneout, recurrent dropout; issue
// 16) for the batches small_batch.h takes: per step the recurrent product on the weight packed
// once per call into small_batch.h's panels (kernels/small_batch.cpp's panel_products), and the
// normalisations, gates, zoneout and masks in the same pass, threads kept across the sequence; no
// library call and no allocation per step.
//
// Why: the loop of library calls (regularised.cpp) spent, at batch 8-16, more time in the calls
// around a step's product than in its arithmetic, where plain lf.LSTM's recurrence
// (small_batch.h) spends none.
//
// Raw pointers to contiguous row-major float tensors, no ATen: regularised.cpp checks the
// arguments and allocates. kernels/regularised_sequence.cpp holds the loops, compiled once per
// instruction set; the functions below call the ones capability.cpp chose.
#pragma once

#include <cstdint>

#include "small_batch.h"

namespace lstm_fused {
namespace cpu {
namespace regularised {

// The layer and the options of one layer and direction, shared by forward and backward. The
// layer-norm pointers are all four set or all null; a null mask: that option off (zoneout: the
// probability then weighs the old state, 0 in training without a mask).
struct Options {
  const RecurrenceStep* steps;
  int64_t num_steps;
  int64_t hidden_size;
  const float* layer_norm_ih;          // [4H]
  const float* layer_norm_hh;          // [4H]
  const float* layer_norm_cell_weight;  // [H]
  const float* layer_norm_cell_bias;    // [H]
  const float* recurrent_dropout_mask;  // [batch, H]
  const float* zoneout_cell_mask;       // [rows, H]
  const float* zoneout_hidden_mask;     // [rows, H]
  float zoneout_cell;
  float zoneout_hidden;
};

// Forward. gate_panels: weight_hh (weight drop applied) packed by small_batch::pack_gate_panels.
// Without layer norm gates holds on entry every row's x W_ih^T + b_ih + b_hh, and the recurrent
// product is added to it; with layer norm input_part holds x W_ih^T (normalised in place),
// hidden_part [rows, 4H] receives the normalised recurrent product, bias (may be null) is
// b_ih + b_hh, normalized_cell [rows, H] and layer_norm_rstd [rows, 3] what backward needs.
// With recurrent dropout masked_hidden [rows + batch, H] is scratch (every row's h * m_r, then
// h_0 * m_r).
struct SequenceForward {
  Options options;
  const float* gate_panels;
  const float* bias;
  const float* hx;
  const float* cx;
  float* input_part;
  float* hidden_part;
  float* gates;
  float* output;
  float* cell_states;
  float* hy;
  float* cy;
  float* normalized_cell;
  float* layer_norm_rstd;
  float* masked_hidden;
};
void sequence_forward(const SequenceForward& args, int threads);

// Backpropagation through time. unit_panels: weight_hh (dropped) packed by
// small_batch::pack_unit_panels. The incoming gradients may be null (zero). Writes every row's
// gate pre-activation gradient, with layer norm also those of both products (before their
// normalisations) and of LN(c~)'s output; grad_hidden and grad_cell are scratch [batch, H], and
// grad_masked_hidden too with recurrent dropout.
struct SequenceBackward {
  Options options;
  const float* unit_panels;
  const float* hx;
  const float* cx;
  const float* output;
  const float* cell_states;
  const float* gates;
  const float* input_part;  // the saved, normalised products (layer norm)
  const float* hidden_part;
  const float* normalized_cell;
  const float* layer_norm_rstd;
  const float* grad_output;
  const float* grad_cell_states;
  const float* grad_gates;
  const float* grad_hy;
  const float* grad_cy;
  float* grad_preactivations;
  float* grad_input_parts;   // layer norm
  float* grad_hidden_parts;  // layer norm
  float* grad_normalized_cell;  // layer norm
  float* grad_hx;
  float* grad_cx;
  float* grad_hidden;
  float* grad_cell;
  float* grad_masked_hidden;  // recurrent dropout
  // Every row's h_prev * m_r (h_prev without recurrent dropout), the rows that multiplied
  // weight_hh, for its gradient; null: not wanted.
  float* previous_masked_hidden;
  // Layer norm: [threads, 10 H], zero on entry; thread t adds to row t the sums over the rows it
  // ran of grad_a x^_ih (4H), grad_a x^_hh (4H), grad_n n^ and grad_n (H each): the normalisations'
  // parameter gradients once summed over the threads.
  float* layer_norm_grad_sums;
};
void sequence_backward(const SequenceBackward& args, int threads);

}  // namespace regularised
}  // namespace cpu
}  // namespace lstm_fused
