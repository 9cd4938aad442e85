// The float32 path for small batches: a step's matrix products as hand-written vector loops over
// the weights, fused with the pointwise cell math, threads kept across a whole sequence.
//
// Why: at batch 1-16 a step's products are matrix-vector work of microseconds, and each library
// call (ATen dispatch, MKL or oneDNN set-up, a fresh output) costs as much again; a cell step made
// of ten such calls spends most of its time outside arithmetic, and a sequence pays it every step.
// Here a step is one parallel region (a sequence: one region for all its steps), with the
// recurrent weight packed once into panels that each product streams. A sequence's threads split
// the batch rows when each gets at least 4 (each then runs its own sequences and never waits on
// another) and otherwise the hidden units (all four gate rows of each), meeting at one barrier per
// step; the cell splits the units.
//
// Raw pointers, contiguous row-major tensors, no ATen: the callers (lstm_cell.cpp, sequence.cpp)
// check the arguments and allocate. kernels/small_batch.cpp holds the loops, compiled once per
// instruction set; the functions below call the ones capability.cpp chose.
#pragma once

#include <cstdint>

namespace lstm_fused {
namespace cpu {

// bfloat16 and float16 by their bits (cell_units.h).
struct BFloat16Bits;
struct HalfBits;

// One time step of a packed sequence as the recurrence visits it (last step first when reverse):
// rows [offset, offset + batch) of the packed tensors; rows [0, carried) continue from the step
// visited before (at previous_offset), rows [carried, batch) start from the initial state, rows
// [ending, batch) end here (their state is the final one).
struct RecurrenceStep {
  int64_t offset;
  int64_t batch;
  int64_t carried;
  int64_t previous_offset;
  int64_t ending;
};

namespace small_batch {

// The largest batches the path takes: above them the library's blocked GEMMs win. A sequence keeps
// its threads and the packed weight across steps and gains up to batch 64 (2 threads, T = 64,
// against the loop of library products: 1.0-1.5x at batch 24-64, hidden 128-1024). On AVX-512
// (32 registers: 6 x 4 tiles of 16 lanes) a float32 sequence gains up to batch 256 (AMD EPYC
// Zen 5, T = 16-32, nn.LSTM's time over lf.LSTM's at batch 128-256, hidden 64-1024, 1 and 2
// threads: 0.54-1.32x through the library loop, 0.71-1.40x fused with vec.h's exp and tanh, no
// row lower). So does a bfloat16 sequence on AMX (Xeon, 2 threads, T = 32, batch 128-256, hidden
// 128-512: 5-40% less time than the library loop, forward and training). The regularised and the
// other 16-bit recurrences keep 64: float16 there (widened FMAs against the library's AVX512-FP16
// GEMM) was within 5% of the loop either way, and bfloat16 without AMX is not measured.
constexpr int64_t kMaxCellBatch = 16;
constexpr int64_t kMaxSequenceBatch = 64;
constexpr int64_t kMaxWideSequenceBatch = 256;
constexpr int64_t kMaxBatch = kMaxWideSequenceBatch > kMaxCellBatch ? kMaxWideSequenceBatch : kMaxCellBatch;

// Whether the path takes a cell step, a sequence (the regularised and 16-bit recurrences), or a
// float32 sequence of plain lf.LSTM, of this many rows.
bool handles_cell(int64_t batch);
bool handles_sequence(int64_t batch);
bool handles_float32_sequence(int64_t batch);

// How many threads, of at most max_threads, a step of this many multiply-adds is worth: below
// tens of thousands, waking a second thread costs more than it saves.
int threads_for(int64_t multiply_adds, int max_threads);

// The recurrent weight [4 * hidden, state] (state: hidden, or proj_size with a projection)
// re-laid once per sequence for its per-step products: in panels of as many columns as the vector
// has lanes, each [reduction][lanes] contiguous, zero-padded past the last column. Gate panels
// serve the forward (columns: the 4 * hidden gate rows, one vector of units of one gate a panel;
// reduction: state), unit panels the backward (columns: the state's features; reduction:
// 4 * hidden). A projection weight_hr [proj_size, hidden] is packed the same ways: as row panels
// (the forward's; columns: its proj_size rows, reduction: hidden) and as unit panels (rows
// proj_size, units hidden: the backward's). The sizes are in floats.
int64_t gate_panels_size(int64_t hidden_size, int64_t state_size);
int64_t row_panels_size(int64_t rows, int64_t reduction);
int64_t unit_panels_size(int64_t rows, int64_t units);
void pack_gate_panels(const float* weight_hh, int64_t hidden_size, int64_t state_size, float* panels);
void pack_row_panels(const float* weight, int64_t rows, int64_t reduction, float* panels);
void pack_unit_panels(const float* weight, int64_t rows, int64_t units, float* panels);

// One cell step, forward: gates [batch, 4 * hidden] receives the activated gates (i, f, g, o).
struct CellForward {
  int64_t batch;
  int64_t input_size;
  int64_t hidden_size;
  const float* input;
  const float* hx;
  const float* cx;
  const float* weight_ih;
  const float* weight_hh;
  const float* bias_ih;  // either bias may be null
  const float* bias_hh;
  float* gates;
  float* hy;
  float* cy;
};
void cell_forward(const CellForward& args, int threads);

// One cell step's backward products, from the gate pre-activation gradients: grad_input = G W_ih,
// grad_hx = G W_hh, grad_weight_ih = G^T input, grad_weight_hh = G^T hx, grad_bias = the column
// sums of G. An output left null is not computed.
struct CellBackwardProducts {
  int64_t batch;
  int64_t input_size;
  int64_t hidden_size;
  const float* grad_preactivation;
  const float* input;
  const float* hx;
  const float* weight_ih;
  const float* weight_hh;
  float* grad_input;
  float* grad_hx;
  float* grad_weight_ih;
  float* grad_weight_hh;
  float* grad_bias;
};
void cell_backward_products(const CellBackwardProducts& args, int threads);

// The recurrence of one layer in one direction: on entry gates holds every row's input projection
// (bias_ih included), on return the activated gates; output and cell_states get every row's h and
// c, hy and cy each sequence's last. gate_panels: weight_hh packed by pack_gate_panels. With a
// projection (projection_panels: weight_hr packed by pack_row_panels; null: none), h is
// weight_hr (o * tanh(c)), of output_size = proj_size features, and unprojected is scratch of
// [batch, hidden]; without, output_size is hidden_size.
//
// The same recurrence stored in bfloat16 or float16 (T: BFloat16Bits, HalfBits): every tensor in
// the dtype, the panels packed by pack_pair_panels, the products accumulated in float32 and the
// cell math in float32, each result rounded to the dtype once on store (the gates' pre-activations
// too, as the library loop's product into the gate buffer does).
template <typename T>
struct SequenceForwardOf {
  const RecurrenceStep* steps;
  int64_t num_steps;
  int64_t hidden_size;
  int64_t output_size;
  const T* gate_panels;
  const T* projection_panels;  // may be null
  T* unprojected;              // with projection_panels
  const T* bias_hh;  // may be null
  const T* hx;
  const T* cx;
  T* gates;
  T* output;
  T* cell_states;
  T* hy;
  T* cy;
  // False where nothing reads the activated gates afterwards (inference): the pointwise pass then
  // leaves the pre-activations in gates rather than storing the gates over them (bfloat16, Xeon
  // with AMX, 1 thread, T = 64, batch 64, hidden 128: 6% less time).
  bool keeps_gates = true;
};
using SequenceForward = SequenceForwardOf<float>;
void sequence_forward(const SequenceForward& args, int threads);
void sequence_forward(const SequenceForwardOf<BFloat16Bits>& args, int threads);
void sequence_forward(const SequenceForwardOf<HalfBits>& args, int threads);

// Whether the path takes a bfloat16 (bfloat16 true) or float16 sequence of this many rows (the
// vector paths; the portable one has no vector conversions): up to kMaxSequenceBatch, and up to
// kMaxWideSequenceBatch for bfloat16 on AMX's tiles.
bool handles_reduced_sequence(int64_t batch, bool bfloat16);

// A 16-bit weight [rows, reduction] as the reduced-precision recurrence multiplies it: panels of
// as many columns (its rows) as a float vector has lanes, the reduction index in pairs (odd
// reductions padded with a zero). Sizes in elements. The gate panels pack each gate's rows on their
// own, as pack_gate_panels does.
int64_t pair_panels_size(int64_t rows, int64_t reduction);
int64_t pair_gate_panels_size(int64_t hidden_size, int64_t state_size);
void pack_pair_panels(const BFloat16Bits* weight, int64_t rows, int64_t reduction, BFloat16Bits* panels);
void pack_pair_panels(const HalfBits* weight, int64_t rows, int64_t reduction, HalfBits* panels);
void pack_pair_gate_panels(const BFloat16Bits* weight_hh, int64_t hidden_size, int64_t state_size, BFloat16Bits* panels);
void pack_pair_gate_panels(const HalfBits* weight_hh, int64_t hidden_size, int64_t state_size, HalfBits* panels);

// Whether bfloat16 products use the CPU's AVX512-BF16 dot products (where it has them and the
// avx512 path runs); the tests switch it off to run the widened products on the same CPU.
bool native_bfloat16_products();

// Backpropagation through time of that recurrence: every row's gate pre-activation gradients, and
// the initial states' gradients. unit_panels: weight_hh packed by pack_unit_panels. The incoming
// gradients may be null (absent: zero). grad_hidden and grad_cell are scratch of [batch,
// output_size] and [batch, hidden]. With a projection (projection_unit_panels: weight_hr packed by
// pack_unit_panels; null: none) grad_unprojected is scratch of [batch, hidden] and grad_outputs
// receives every row's gradient of its (projected) hidden state, [rows, output_size], for the
// projection's weight gradient.
//
// In bfloat16 and float16 (T: BFloat16Bits, HalfBits) every tensor, the scratch too, is in the
// dtype and the panels are packed by pack_pair_unit_panels: each step's products accumulate in
// float32 and its cell math runs in float32, each result rounded to the dtype once on store, as
// the library loop's ops round theirs.
template <typename T>
struct SequenceBackwardOf {
  const RecurrenceStep* steps;
  int64_t num_steps;
  int64_t hidden_size;
  int64_t output_size;
  const T* unit_panels;
  const T* projection_unit_panels;  // may be null
  T* grad_unprojected;              // with projection_unit_panels
  T* grad_outputs;                  // with projection_unit_panels
  const T* cx;
  const T* cell_states;
  const T* gates;
  const T* grad_output;
  const T* grad_cell_states;
  const T* grad_gates;
  const T* grad_hy;
  const T* grad_cy;
  T* grad_preactivations;
  T* grad_hx;
  T* grad_cx;
  T* grad_hidden;
  T* grad_cell;
};
using SequenceBackward = SequenceBackwardOf<float>;
void sequence_backward(const SequenceBackward& args, int threads);
void sequence_backward(const SequenceBackwardOf<BFloat16Bits>& args, int threads);
void sequence_backward(const SequenceBackwardOf<HalfBits>& args, int threads);

// A 16-bit weight [rows, units] as the reduced-precision backward multiplies it, out[b, unit] =
// sum over r of g_b[r] weight[r, unit]: panels of a float vector's lanes of units, the reduction
// over its rows in pairs. pair_panels_size(units, rows) elements.
void pack_pair_unit_panels(const BFloat16Bits* weight, int64_t rows, int64_t units, BFloat16Bits* panels);
void pack_pair_unit_panels(const HalfBits* weight, int64_t rows, int64_t units, HalfBits* panels);

}  // namespace small_batch
}  // namespace cpu
}  // namespace lstm_fused
