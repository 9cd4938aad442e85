// The loops of small_batch.h, written once over Vec (vec.h) and compiled once per instruction set:
// three product kernels over row-major weights, the pointwise cell math of cell_units.h, and the
// thread layout that fuses them. Entered through the capability's Kernels table (kernels.h).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../small_batch.h"
#include "../threads.h"
#include "kernels.h"
#include "pair_products.h"
#include "recurrence.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using small_batch::CellBackwardProducts;
using small_batch::kMaxBatch;
using small_batch::kMaxCellBatch;
using small_batch::CellForward;
using small_batch::SequenceBackward;
using small_batch::SequenceBackwardOf;
using small_batch::SequenceForward;
using small_batch::SequenceForwardOf;

constexpr int64_t kLanes = Vec::kWidth;

// --- out[b, r] = x_b . weight[r]: the forward products, dot products along contiguous weight rows ---

// kRows weight rows against kBatch rows of x: every weight vector loaded once serves kBatch rows,
// every x vector kRows; kRows * kBatch independent accumulators keep both FMA pipes busy.
// out[b * out_stride + row + r] becomes the dot product plus, when accumulate, its old value, or
// else plus bias[row + r] (bias may be null).
template <int kRows, int kBatch>
void dot_tile(
    const float* const* x,
    int64_t size,
    const float* weight,
    int64_t row,
    float* out,
    int64_t out_stride,
    const float* bias,
    bool accumulate) {
  Vec acc[kBatch][kRows];
  #pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      acc[b][r] = Vec(0.0f);
    }
  }
  const float* w = weight + row * size;
  int64_t k = 0;
  for (; k + kLanes <= size; k += kLanes) {
    Vec xv[kBatch];
    #pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
      xv[b] = Vec::load(x[b] + k);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      Vec wv = Vec::load(w + r * size + k);
      keep_in_register(wv);
      #pragma GCC unroll 16
      for (int b = 0; b < kBatch; ++b) {
        acc[b][r] = fma(wv, xv[b], acc[b][r]);
      }
    }
  }
  if (k < size) {
    const Mask mask(Tail{size - k});
    Vec xv[kBatch];
    #pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
      xv[b] = load(x[b] + k, mask);
    }
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      Vec wv = load(w + r * size + k, mask);
      keep_in_register(wv);
      #pragma GCC unroll 16
      for (int b = 0; b < kBatch; ++b) {
        acc[b][r] = fma(wv, xv[b], acc[b][r]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
    float sums[kRows];
    if constexpr (kRows % 4 == 0) {
      #pragma GCC unroll 16
      for (int r = 0; r < kRows; r += 4) {
        store_sums(sums + r, acc[b][r], acc[b][r + 1], acc[b][r + 2], acc[b][r + 3]);
      }
    } else {
      #pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        sums[r] = sum(acc[b][r]);
      }
    }
    float* o = out + b * out_stride + row;
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      o[r] = sums[r] + (accumulate ? o[r] : bias != nullptr ? bias[row + r] : 0.0f);
    }
  }
}

template <int kBatch>
void dot_rows(
    const float* const* x,
    int64_t size,
    const float* weight,
    int64_t first_row,
    int64_t end_row,
    float* out,
    int64_t out_stride,
    const float* bias,
    bool accumulate) {
  int64_t row = first_row;
  if constexpr (kBatch == 1) {
    for (; row + 8 <= end_row; row += 8) {
      dot_tile<8, 1>(x, size, weight, row, out, out_stride, bias, accumulate);
    }
  }
  for (; row + 4 <= end_row; row += 4) {
    dot_tile<4, kBatch>(x, size, weight, row, out, out_stride, bias, accumulate);
  }
  for (; row < end_row; ++row) {
    dot_tile<1, kBatch>(x, size, weight, row, out, out_stride, bias, accumulate);
  }
}

// out[b, r] (+)= x_b . weight[r] for weight rows [first_row, end_row) (each `size` long) and the
// batch rows x[0 .. batch).
void dot_products(
    const float* const* x,
    int64_t batch,
    int64_t size,
    const float* weight,
    int64_t first_row,
    int64_t end_row,
    float* out,
    int64_t out_stride,
    const float* bias,
    bool accumulate) {
  int64_t b = 0;
  for (; b + 2 <= batch; b += 2) {
    dot_rows<2>(x + b, size, weight, first_row, end_row, out + b * out_stride, out_stride, bias, accumulate);
  }
  if (b < batch) {
    dot_rows<1>(x + b, size, weight, first_row, end_row, out + b * out_stride, out_stride, bias, accumulate);
  }
}

// --- the two rows-scaled-and-summed kernels below share their epilogue and batch blocking ---

// out[b, v * 8 + lane] (+)= acc[b][v] for the first columns_left columns (all of them unless kMasked).
template <int kBatch, int kVectors, bool kMasked>
LSTM_FUSED_ALWAYS_INLINE void store_tile(
    const Vec (&acc)[kBatch][kVectors], float* out, int64_t out_stride, int64_t columns_left, bool accumulate) {
#pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      float* o = out + b * out_stride + v * kLanes;
      if constexpr (kMasked) {
        const Mask mask(Tail{columns_left - v * kLanes});
        store(o, accumulate ? acc[b][v] + load(o, mask) : acc[b][v], mask);
      } else {
        (accumulate ? acc[b][v] + Vec::load(o) : acc[b][v]).store(o);
      }
    }
  }
}

template <int kValue>
using Constant = std::integral_constant<int, kValue>;

// Calls fn(Constant<kBatch>, Constant<kVectors>, first_batch_row) over the batch in blocks of 4
// rows, then the 1-3 left: eight accumulators a block whatever its rows (fewer rows, wider column
// blocks).
template <typename Fn>
void for_batch_blocks(int64_t batch, const Fn& fn) {
  int64_t b = 0;
  for (; b + 4 <= batch; b += 4) {
    fn(Constant<4>{}, Constant<2>{}, b);
  }
  switch (batch - b) {
    case 3:
      fn(Constant<3>{}, Constant<2>{}, b);
      break;
    case 2:
      fn(Constant<2>{}, Constant<4>{}, b);
      break;
    case 1:
      fn(Constant<1>{}, Constant<8>{}, b);
      break;
    default:
      break;
  }
}

// --- out[b, k] = sum_r g[b, r] weight[r, k]: the backward products, weight rows scaled and summed ---

// kBatch rows of g against a column block of kVectors vectors (kMasked: the last block of the
// range, cut at end_column): each weight vector loaded once serves kBatch rows. The mask is a
// template parameter so that the accumulators stay in registers through the row loop.
template <int kBatch, int kVectors, bool kMasked>
void weighted_sum_tile(
    const float* const* g,
    const float* weight,
    int64_t size,
    int64_t first_row,
    int64_t end_row,
    int64_t column,
    int64_t end_column,
    float* out,
    int64_t out_stride,
    bool accumulate) {
  Vec acc[kBatch][kVectors];
  #pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
    #pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      acc[b][v] = Vec(0.0f);
    }
  }
  const float* w = weight + first_row * size + column;
  for (int64_t r = first_row; r < end_row; ++r, w += size) {
    Vec scale[kBatch];
    #pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
      scale[b] = Vec::broadcast(g[b] + r);
    }
    #pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      Vec wv;
      if constexpr (kMasked) {
        wv = load(w + v * kLanes, Mask(Tail{end_column - column - v * kLanes}));
      } else {
        wv = Vec::load(w + v * kLanes);
      }
      #pragma GCC unroll 16
      for (int b = 0; b < kBatch; ++b) {
        acc[b][v] = fma(scale[b], wv, acc[b][v]);
      }
    }
  }
  store_tile<kBatch, kVectors, kMasked>(acc, out + column, out_stride, end_column - column, accumulate);
}

template <int kBatch, int kVectors>
void weighted_sum_columns(
    const float* const* g,
    const float* weight,
    int64_t size,
    int64_t first_row,
    int64_t end_row,
    int64_t first_column,
    int64_t end_column,
    float* out,
    int64_t out_stride,
    bool accumulate) {
  constexpr int64_t kWidth = kVectors * kLanes;
  int64_t column = first_column;
  for (; column + kWidth <= end_column; column += kWidth) {
    weighted_sum_tile<kBatch, kVectors, false>(
        g, weight, size, first_row, end_row, column, end_column, out, out_stride, accumulate);
  }
  if (column < end_column) {
    weighted_sum_tile<kBatch, kVectors, true>(
        g, weight, size, first_row, end_row, column, end_column, out, out_stride, accumulate);
  }
}

constexpr int64_t kRowsPerChunk = 64;

// out[b, k] (+)= sum over r in [first_row, end_row) of g[b, r] weight[r, k], for columns k in
// [first_column, end_column) of a weight with rows `size` long.
void weighted_row_sums(
    const float* const* g,
    int64_t batch,
    const float* weight,
    int64_t size,
    int64_t first_row,
    int64_t end_row,
    int64_t first_column,
    int64_t end_column,
    float* out,
    int64_t out_stride,
    bool accumulate) {
  // Rows in chunks whose slice of the weight stays in cache while the column blocks sweep it: a
  // column block reads a short piece of every row, and over all of a large weight's rows those
  // pieces, a page apart, would come from memory once per block.
  if (end_row - first_row > kRowsPerChunk) {
    for (int64_t row = first_row; row < end_row; row += kRowsPerChunk) {
      weighted_row_sums(g, batch, weight, size, row, std::min(end_row, row + kRowsPerChunk), first_column,
                        end_column, out, out_stride, accumulate || row != first_row);
    }
    return;
  }
  for_batch_blocks(batch, [&](auto rows, auto vectors, int64_t b) {
    weighted_sum_columns<decltype(rows)::value, decltype(vectors)::value>(
        g + b, weight, size, first_row, end_row, first_column, end_column, out + b * out_stride, out_stride, accumulate);
  });
}

// --- out[b, c] = sum_k x[b, k] w[k, c] on packed panels: the sequence's recurrent products ---

// A panel holds one vector of output columns of a weight for every reduction index k, [reduction][lanes], zero
// past the weight's last column: the rows-scaled-and-summed form then reads each panel as one
// contiguous stream, where the plain layout gave it one short piece of every row (a page apart at
// hidden 1024, a TLB miss every few FMAs).
template <int kBatch, int kVectors, bool kMasked>
void panel_tile(
    const float* const* x,
    int64_t reduction,
    const float* panels,
    float* out,
    int64_t out_stride,
    int64_t columns_left,
    bool accumulate) {
  Vec acc[kBatch][kVectors];
#pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      acc[b][v] = Vec(0.0f);
    }
  }
  const int64_t panel_size = reduction * kLanes;
  for (int64_t k = 0; k < reduction; ++k) {
    Vec wv[kVectors];
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      wv[v] = Vec::load(panels + v * panel_size + k * kLanes);
    }
    // Row by row, each row's factor broadcast just before its FMAs: one register for it, where
    // broadcasting every row's first left 6 x 2 tiles short of registers.
#pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
      const Vec scale = Vec::broadcast(x[b] + k);
#pragma GCC unroll 16
      for (int v = 0; v < kVectors; ++v) {
        acc[b][v] = fma(scale, wv[v], acc[b][v]);
      }
    }
  }
  store_tile<kBatch, kVectors, kMasked>(acc, out, out_stride, columns_left, accumulate);
}

// The rows of x in blocks of at most kPanelRows, as even as can be (16 rows: 6, 5, 5; 8: 4, 4),
// against one group of kVectors panels: a block of 1 or 2 rows has too few accumulators to cover
// the FMA latency.
constexpr int64_t kPanelRows = 6;
// Panels a row block takes at a time: with 32 vector registers (AVX-512, NEON) a 6 x 4 tile's 24
// accumulators, 4 weight vectors and a broadcast fit, and each broadcast serves 4 FMAs instead of 2
// (B=64, H=512-1024, T=64, 1 thread, Zen 4: 5-12% less time than 6 x 2 tiles); 16 registers
// hold 6 x 2.
constexpr int kPanelGroup = Vec::kRegisters >= 32 ? 4 : 2;

template <int kVectors, bool kMasked>
void panel_row_blocks(
    const float* const* x,
    int64_t batch,
    int64_t reduction,
    const float* panels,
    float* out,
    int64_t out_stride,
    int64_t columns_left,
    bool accumulate) {
  const int64_t blocks = (batch + kPanelRows - 1) / kPanelRows;
  for (int64_t block = 0, b = 0; block < blocks; ++block) {
    const int64_t rows = (batch - b) / (blocks - block) + ((batch - b) % (blocks - block) != 0);
    const auto tile = [&](auto kRows) {
      panel_tile<decltype(kRows)::value, kVectors, kMasked>(
          x + b, reduction, panels, out + b * out_stride, out_stride, columns_left, accumulate);
    };
    switch (rows) {
      case 6: tile(Constant<6>{}); break;
      case 5: tile(Constant<5>{}); break;
      case 4: tile(Constant<4>{}); break;
      case 3: tile(Constant<3>{}); break;
      case 2: tile(Constant<2>{}); break;
      default: tile(Constant<1>{}); break;
    }
    b += rows;
  }
}

template <int kBatch, int kVectors>
void panel_columns(
    const float* const* x,
    int64_t reduction,
    const float* panels,
    int64_t columns,
    float* out,
    int64_t out_stride,
    bool accumulate) {
  constexpr int64_t kWidth = kVectors * kLanes;
  const int64_t panel_size = reduction * kLanes;
  int64_t column = 0;
  for (; column + kWidth <= columns; column += kWidth) {
    panel_tile<kBatch, kVectors, false>(
        x, reduction, panels + column / kLanes * panel_size, out + column, out_stride, kWidth, accumulate);
  }
  // The last panels one at a time: a group of kVectors would read panels past the last.
  for (; column < columns; column += kLanes) {
    panel_tile<kBatch, 1, true>(
        x, reduction, panels + column / kLanes * panel_size, out + column, out_stride, columns - column, accumulate);
  }
}

}  // namespace

// out[b, c] (+)= sum over k < reduction of x_b[k] w[k, c], for the `columns` columns whose panels
// start at `panels`.
void panel_products(
    const float* const* x,
    int64_t batch,
    int64_t reduction,
    const float* panels,
    int64_t columns,
    float* out,
    int64_t out_stride,
    bool accumulate) {
  if (batch < 4) {
    // One row block: it sweeps the panels once whatever the order; wider column blocks give its
    // few rows enough accumulators.
    for_batch_blocks(batch, [&](auto rows, auto vectors, int64_t b) {
      panel_columns<decltype(rows)::value, decltype(vectors)::value>(
          x + b, reduction, panels, columns, out + b * out_stride, out_stride, accumulate);
    });
    return;
  }
  // Columns outer, rows inner: a group of panels (16 KB at reduction 256 on AVX2) is read from
  // memory by the first row block and from L1 or L2 by the others, where rows outer streamed every
  // panel once per row block.
  const int64_t panel_size = reduction * kLanes;
  int64_t column = 0;
  for (; column + kPanelGroup * kLanes <= columns; column += kPanelGroup * kLanes) {
    panel_row_blocks<kPanelGroup, false>(x, batch, reduction, panels + column / kLanes * panel_size, out + column,
                                         out_stride, kPanelGroup * kLanes, accumulate);
  }
  for (; column + 2 * kLanes <= columns; column += 2 * kLanes) {
    panel_row_blocks<2, false>(x, batch, reduction, panels + column / kLanes * panel_size, out + column, out_stride,
                               2 * kLanes, accumulate);
  }
  for (; column < columns; column += kLanes) {
    panel_row_blocks<1, true>(x, batch, reduction, panels + column / kLanes * panel_size, out + column, out_stride,
                              columns - column, accumulate);
  }
}

namespace {

// grad_weight[r, k] (+)= sum over kBatch rows of g[b, r] x_b[k], for rows [first_row, end_row):
// each row's kBatch factors broadcast once, then one pass along the row.
template <int kBatch>
void outer_product_tile(
    const float* g,
    int64_t g_stride,
    const float* const* x,
    int64_t size,
    int64_t first_row,
    int64_t end_row,
    float* grad_weight,
    bool accumulate) {
  for (int64_t r = first_row; r < end_row; ++r) {
    float* out = grad_weight + r * size;
    Vec scale[kBatch];
#pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
      scale[b] = Vec::broadcast(g + b * g_stride + r);
    }
    int64_t k = 0;
    for (; k + kLanes <= size; k += kLanes) {
      Vec acc = accumulate ? Vec::load(out + k) : Vec(0.0f);
#pragma GCC unroll 16
      for (int b = 0; b < kBatch; ++b) {
        acc = fma(scale[b], Vec::load(x[b] + k), acc);
      }
      acc.store(out + k);
    }
    if (k < size) {
      const Mask mask(Tail{size - k});
      Vec acc = accumulate ? load(out + k, mask) : Vec(0.0f);
#pragma GCC unroll 16
      for (int b = 0; b < kBatch; ++b) {
        acc = fma(scale[b], load(x[b] + k, mask), acc);
      }
      store(out + k, acc, mask);
    }
  }
}

// grad_weight[r, k] = sum_b g[b, r] x_b[k] for rows [first_row, end_row): a weight gradient, written
// once (not accumulated; autograd adds it to .grad). The batch in chunks of at most 8 rows.
void outer_product_rows(
    const float* g,
    int64_t g_stride,
    int64_t batch,
    const float* const* x,
    int64_t size,
    int64_t first_row,
    int64_t end_row,
    float* grad_weight) {
  using Tile = void (*)(const float*, int64_t, const float* const*, int64_t, int64_t, int64_t, float*, bool);
  static constexpr Tile tiles[8] = {outer_product_tile<1>, outer_product_tile<2>, outer_product_tile<3>,
                                    outer_product_tile<4>, outer_product_tile<5>, outer_product_tile<6>,
                                    outer_product_tile<7>, outer_product_tile<8>};
  if (batch == 0) {
    std::fill(grad_weight + first_row * size, grad_weight + end_row * size, 0.0f);
    return;
  }
  for (int64_t b = 0; b < batch; b += 8) {
    const int64_t rows = std::min<int64_t>(8, batch - b);
    tiles[rows - 1](g + b * g_stride, g_stride, x + b, size, first_row, end_row, grad_weight, /*accumulate=*/b > 0);
  }
}

// --- the pointwise cell math over one row's units [first, end) ---

// Units after the last full vector go through the same vector code on a zero-padded copy, so the
// path never runs a scalar formula compiled for this instruction set that a file without it might
// share. T: the storage dtype (float, BFloat16Bits or HalfBits).
template <typename T = float>
struct PaddedUnitsOf {
  T gates[kGates][kLanes] = {};
  T bias[kGates][kLanes] = {};
  T grad_gates[kGates][kLanes] = {};
  T grad_preactivation[kGates][kLanes] = {};
  T cell_prev[kLanes] = {};
  T cell_next[kLanes] = {};
  T hidden_next[kLanes] = {};
  T grad_hidden[kLanes] = {};
  T grad_cell[kLanes] = {};
  T grad_cell_prev[kLanes] = {};
};

template <typename T>
GateRows<T> padded_rows(T (&rows)[kGates][kLanes]) {
  return {rows[0], rows[1], rows[2], rows[3]};
}

template <typename T>
void copy_gates_in(T (&to)[kGates][kLanes], GateRows<const T> from, int64_t first, int64_t count) {
  const T* rows[kGates] = {from.input, from.forget, from.cell, from.output};
  for (int gate = 0; gate < kGates; ++gate) {
    std::memcpy(to[gate], rows[gate] + first, count * sizeof(T));
  }
}

template <typename T>
void copy_gates_out(GateRows<T> to, const T (&from)[kGates][kLanes], int64_t first, int64_t count) {
  T* rows[kGates] = {to.input, to.forget, to.cell, to.output};
  for (int gate = 0; gate < kGates; ++gate) {
    std::memcpy(rows[gate] + first, from[gate], count * sizeof(T));
  }
}

// Adds bias_hh (may be null), activates the gates in place (unless !kStoresGates: then gates_row
// keeps the pre-activations) and writes the new cell and hidden state.
template <typename T, bool kStoresGates = true>
void pointwise_forward(
    T* gates_row,
    const T* bias,
    const T* cell_prev,
    T* cell_next,
    T* hidden_next,
    int64_t hidden_size,
    int64_t first,
    int64_t end) {
  using Lanes = VecLanesOf<T>;
  const GateRows<T> gates = gate_rows(gates_row, hidden_size);
  const GateRows<const T> bias_rows = gate_rows(bias, hidden_size);
  const int64_t done = bias != nullptr
      ? cpu::forward_units<Lanes, true, kStoresGates>(gates, bias_rows, cell_prev, cell_next, hidden_next, first, end)
      : cpu::forward_units<Lanes, false, kStoresGates>(gates, bias_rows, cell_prev, cell_next, hidden_next, first, end);
  const int64_t count = end - done;
  if (count == 0) {
    return;
  }
  PaddedUnitsOf<T> pad;
  copy_gates_in(pad.gates, as_const(gates), done, count);
  if (bias != nullptr) {
    copy_gates_in(pad.bias, bias_rows, done, count);
  }
  std::memcpy(pad.cell_prev, cell_prev + done, count * sizeof(T));
  cpu::forward_units<Lanes, true>(
      padded_rows(pad.gates), as_const(padded_rows(pad.bias)), pad.cell_prev, pad.cell_next, pad.hidden_next, 0, kLanes);
  if constexpr (kStoresGates) {
    copy_gates_out(gates, pad.gates, done, count);
  }
  std::memcpy(cell_next + done, pad.cell_next, count * sizeof(T));
  std::memcpy(hidden_next + done, pad.hidden_next, count * sizeof(T));
}

// Gate pre-activation gradients and grad_cell_prev (which may be grad_cell itself: each unit is
// read before it is written). grad_gates may be null.
// T: the storage dtype, as pointwise_forward's.
template <typename T>
void pointwise_backward(
    const T* gates_row,
    const T* grad_gates_row,
    const T* cell_prev,
    const T* cell_next,
    const T* grad_hidden,
    const T* grad_cell,
    T* grad_preactivation_row,
    T* grad_cell_prev,
    int64_t hidden_size,
    int64_t first,
    int64_t end) {
  const GateRows<const T> gates = gate_rows(gates_row, hidden_size);
  const GateRows<const T> grad_gates = gate_rows(grad_gates_row, hidden_size);
  const GateRows<T> grad_preactivation = gate_rows(grad_preactivation_row, hidden_size);
  const auto units = backward_units_for<VecLanesOf<T>>(true, true, grad_gates_row != nullptr);
  const int64_t done =
      units(gates, grad_gates, cell_prev, cell_next, grad_hidden, grad_cell, grad_preactivation, grad_cell_prev, first, end);
  const int64_t count = end - done;
  if (count == 0) {
    return;
  }
  PaddedUnitsOf<T> pad;
  copy_gates_in(pad.gates, gates, done, count);
  if (grad_gates_row != nullptr) {
    copy_gates_in(pad.grad_gates, grad_gates, done, count);
  }
  std::memcpy(pad.cell_prev, cell_prev + done, count * sizeof(T));
  std::memcpy(pad.cell_next, cell_next + done, count * sizeof(T));
  std::memcpy(pad.grad_hidden, grad_hidden + done, count * sizeof(T));
  std::memcpy(pad.grad_cell, grad_cell + done, count * sizeof(T));
  cpu::backward_units<VecLanesOf<T>, true, true, true>(
      as_const(padded_rows(pad.gates)), as_const(padded_rows(pad.grad_gates)), pad.cell_prev, pad.cell_next,
      pad.grad_hidden, pad.grad_cell, padded_rows(pad.grad_preactivation), pad.grad_cell_prev, 0, kLanes);
  copy_gates_out(grad_preactivation, pad.grad_preactivation, done, count);
  std::memcpy(grad_cell_prev + done, pad.grad_cell_prev, count * sizeof(T));
}

// to[j] += from[j] for j < count (nothing where from is null), added in float and rounded to T once.
template <typename T>
void add_into(T* to, const T* from, int64_t count) {
  if (from == nullptr) {
    return;
  }
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    store_narrowed(to + j, load_widened(to + j) + load_widened(from + j));
  }
  if (j < count) {
    T sum[kLanes] = {}, addend[kLanes] = {};
    std::memcpy(sum, to + j, (count - j) * sizeof(T));
    std::memcpy(addend, from + j, (count - j) * sizeof(T));
    store_narrowed(sum, load_widened(sum) + load_widened(addend));
    std::memcpy(to + j, sum, (count - j) * sizeof(T));
  }
}

// --- threads ---

// The hidden units [first, end) a thread owns: equal shares in whole vectors.
std::pair<int64_t, int64_t> unit_range(int64_t hidden_size, int thread, int num_threads) {
  return even_share(hidden_size, kLanes, thread, num_threads);
}

// The rows of 4H-row weights that belong to units [first, end): one range per gate.
template <typename Fn>
void for_each_gate_rows(int64_t hidden_size, int64_t first, int64_t end, const Fn& fn) {
  for (int gate = 0; gate < kGates; ++gate) {
    fn(gate * hidden_size + first, gate * hidden_size + end);
  }
}

int64_t panel_count(int64_t columns) {
  return (columns + kLanes - 1) / kLanes;
}

int64_t row_panels_size(int64_t rows, int64_t reduction) {
  return panel_count(rows) * reduction * kLanes;
}

int64_t unit_panels_size(int64_t rows, int64_t units) {
  return panel_count(units) * rows * kLanes;
}

void pack_row_panels(const float* weight, int64_t rows, int64_t reduction, float* panels) {
  for (int64_t panel = 0; panel < panel_count(rows); ++panel) {
    // Lane `lane` of the panel is one row of the weight.
    transpose_rows<float>(reinterpret_cast<const std::byte*>(weight + panel * kLanes * reduction),
                          reduction * static_cast<int64_t>(sizeof(float)), rows - panel * kLanes, reduction,
                          reinterpret_cast<std::byte*>(panels + panel * reduction * kLanes));
  }
}

// Panel by panel, the threads sharing them: each row's piece of a whole panel is one vector.
void pack_unit_panels(const float* weight, int64_t rows, int64_t units, float* panels, int threads) {
  run_team(threads, [&](int thread, int num_threads) {
    const auto [first, end] = even_share(panel_count(units), 1, thread, num_threads);
    for (int64_t panel = first; panel < end; ++panel) {
      float* to = panels + panel * rows * kLanes;
      const float* from = weight + panel * kLanes;
      const int64_t lanes = std::min<int64_t>(kLanes, units - panel * kLanes);
      if (lanes == kLanes) {
        for (int64_t r = 0; r < rows; ++r) {
          Vec::load(from + r * units).store(to + r * kLanes);
        }
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          to[r * kLanes + lane] = lane < lanes ? from[r * units + lane] : 0.0f;
        }
      }
    }
  });
}

void cell_forward(const CellForward& a, int threads) {
  const int64_t gate_width = 4 * a.hidden_size;
  const float* input_rows[kMaxBatch];
  const float* hidden_rows[kMaxBatch];
  for (int64_t b = 0; b < a.batch; ++b) {
    input_rows[b] = a.input + b * a.input_size;
    hidden_rows[b] = a.hx + b * a.hidden_size;
  }
  run_team(threads, [&](int thread, int num_threads) {
    const auto [first, end] = unit_range(a.hidden_size, thread, num_threads);
    if (first >= end) {
      return;
    }
    for_each_gate_rows(a.hidden_size, first, end, [&](int64_t first_row, int64_t end_row) {
      dot_products(input_rows, a.batch, a.input_size, a.weight_ih, first_row, end_row, a.gates, gate_width,
                   a.bias_ih, /*accumulate=*/false);
      dot_products(hidden_rows, a.batch, a.hidden_size, a.weight_hh, first_row, end_row, a.gates, gate_width,
                   nullptr, /*accumulate=*/true);
    });
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t state = b * a.hidden_size;
      pointwise_forward(a.gates + b * gate_width, a.bias_hh, a.cx + state, a.cy + state, a.hy + state, a.hidden_size,
                        first, end);
    }
  });
}

void cell_backward_products(const CellBackwardProducts& a, int threads) {
  const int64_t gate_width = 4 * a.hidden_size;
  const float* input_rows[kMaxBatch];
  const float* hidden_rows[kMaxBatch];
  for (int64_t b = 0; b < a.batch; ++b) {
    input_rows[b] = a.input + b * a.input_size;
    hidden_rows[b] = a.hx + b * a.hidden_size;
  }
  const float* g = a.grad_preactivation;
  const float* g_rows[kMaxBatch];
  for (int64_t b = 0; b < a.batch; ++b) {
    g_rows[b] = g + b * gate_width;
  }
  // No barrier needed: a thread writes its own weight-gradient rows, its own columns of
  // grad_input and grad_hx, and its own share of grad_bias; everything it reads is input.
  run_team(threads, [&](int thread, int num_threads) {
    const auto share = [&](int64_t n) { return even_share(n, 1, thread, num_threads); };
    const auto [first_row, end_row] = share(gate_width);
    if (a.grad_weight_ih != nullptr) {
      outer_product_rows(g, gate_width, a.batch, input_rows, a.input_size, first_row, end_row, a.grad_weight_ih);
    }
    if (a.grad_weight_hh != nullptr) {
      outer_product_rows(g, gate_width, a.batch, hidden_rows, a.hidden_size, first_row, end_row, a.grad_weight_hh);
    }
    if (a.grad_bias != nullptr) {
      for (int64_t r = first_row; r < end_row; ++r) {
        float sum = 0.0f;
        for (int64_t b = 0; b < a.batch; ++b) {
          sum += g[b * gate_width + r];
        }
        a.grad_bias[r] = sum;
      }
    }
    if (a.grad_input != nullptr) {
      const auto [first_column, end_column] = share(a.input_size);
      weighted_row_sums(g_rows, a.batch, a.weight_ih, a.input_size, 0, gate_width, first_column, end_column,
                        a.grad_input, a.input_size, /*accumulate=*/false);
    }
    if (a.grad_hx != nullptr) {
      const auto [first_column, end_column] = share(a.hidden_size);
      weighted_row_sums(g_rows, a.batch, a.weight_hh, a.hidden_size, 0, gate_width, first_column, end_column,
                        a.grad_hx, a.hidden_size, /*accumulate=*/false);
    }
  });
}

// How a sequence's threads share its work, the same for every step.
struct SequenceShare {
  int64_t first_unit, end_unit;      // hidden units (all four gate rows of each)
  int64_t first_output, end_output;  // features of the hidden state (proj_size of them with a projection)
  int64_t first_row, end_row;        // batch rows, of the widest step
  bool meets_every_step;             // whether step k + 1 reads what other threads wrote at step k

  // The rows of this step the thread works on: none where it owns no units...
  int64_t rows_at(const RecurrenceStep& step) const {
    return first_unit >= end_unit ? 0 : std::max<int64_t>(0, std::min(end_row, step.batch) - first_row);
  }

  // ...and those whose hidden-state features it works on: none where it owns no features. With a
  // projection a thread may own features but no units (proj_size's share rounds up differently).
  int64_t output_rows_at(const RecurrenceStep& step) const {
    return first_output >= end_output ? 0 : std::max<int64_t>(0, std::min(end_row, step.batch) - first_row);
  }
};

// By rows or by units as recurrence.h's splits_by_rows says (its team_size assumes the same rule).
// Split by units, a projection's output features are split the same way (in whole vectors): the
// projection reads every unit of o * tanh(c), so threads also meet between the cell and it.
SequenceShare share_sequence(int64_t batch, int64_t hidden_size, int64_t output_size, int thread, int num_threads) {
  if (num_threads > 1 && splits_by_rows(batch, hidden_size, num_threads)) {
    const auto [first_row, end_row] = even_share(batch, 1, thread, num_threads);
    return {0, hidden_size, 0, output_size, first_row, end_row, false};
  }
  const auto [first, end] = unit_range(hidden_size, thread, num_threads);
  const auto [first_output, end_output] = unit_range(output_size, thread, num_threads);
  return {first, end, first_output, end_output, 0, batch, num_threads > 1};
}

// A thread with every unit (one thread, or a split by rows) takes the four gates as one run of
// 4 * hidden columns, consecutive in the panels and in the row when no gate ends in a partial
// panel: its rows (and AMX's tiles) are prepared once a step, not four times. Only while the
// panels are small: a row block then sweeps all four gates' panels before the next block reads
// them again, which at 2 MB (bfloat16, H = 512) no longer stays in L2. Intel Xeon, T = 64, 1 thread,
// in turn in one process: bfloat16 hidden 128 4-10% less time at batch 8-64, float32 -1.5 to
// +6.5%; bfloat16 hidden 512 10% more time merged (so not), hidden 256 (512 KB) even.
constexpr int64_t kMaxMergedGatePanelBytes = 256 * 1024;

// The recurrence for storage T: make_products() gives each thread its products,
// products(rows, batch, reduction, panels, columns, out, out_stride, accumulate) as panel_products
// does them, over panels of panel_size(reduction) elements each.
template <typename T, typename PanelSize, typename MakeProducts>
void sequence_forward_with(const SequenceForwardOf<T>& a, int threads, PanelSize panel_size, const MakeProducts& make_products) {
  const int64_t hidden_size = a.hidden_size;
  const int64_t output_size = a.output_size;
  const int64_t gate_width = 4 * hidden_size;
  const bool projecting = a.projection_panels != nullptr;
  const int64_t batch = widest_step(a.steps, a.num_steps);
  threads = team_size(batch, hidden_size, threads);
  run_team(threads, [&](int thread, int num_threads) {
    const SequenceShare share = share_sequence(batch, hidden_size, output_size, thread, num_threads);
    const int64_t first = share.first_unit, end = share.end_unit;
    auto panel_products = make_products();
    const bool merges_gates = first == 0 && end == hidden_size && hidden_size % kLanes == 0 &&
        gate_width * output_size * static_cast<int64_t>(sizeof(T)) <= kMaxMergedGatePanelBytes;
    const T* hidden_prev[kMaxBatch];
    for (int64_t k = 0; k < a.num_steps; ++k) {
      const RecurrenceStep& step = a.steps[k];
      // Step k reads every unit of the hidden states step k - 1 wrote, whichever thread wrote them.
      // Every thread passes every barrier, including one that owns no units.
      if (k > 0 && share.meets_every_step) {
        team_barrier();
      }
      const int64_t rows = share.rows_at(step);
      if (rows > 0) {
        for (int64_t i = 0; i < rows; ++i) {
          hidden_prev[i] = state_row<T>(step, share.first_row + i, a.output, a.hx, output_size);
        }
        T* step_gates = a.gates + (step.offset + share.first_row) * gate_width;
        if (merges_gates) {
          // One product call for the four gates (merges_gates says when).
          panel_products(hidden_prev, rows, output_size, a.gate_panels, gate_width, step_gates, gate_width,
                         /*accumulate=*/true);
        } else {
          for (int64_t gate = 0; gate < kGates; ++gate) {
            const T* panels = gate_panels_from(a.gate_panels, hidden_size, panel_size(output_size), gate, first);
            panel_products(hidden_prev, rows, output_size, panels, end - first, step_gates + gate * hidden_size + first,
                           gate_width, /*accumulate=*/true);
          }
        }
        for (int64_t b = share.first_row; b < share.first_row + rows; ++b) {
          const T* cell_prev = state_row<T>(step, b, a.cell_states, a.cx, hidden_size);
          const int64_t row = (step.offset + b) * hidden_size;
          // With a projection the cell's o * tanh(c) goes to scratch, the output row is its product.
          T* hidden_next = projecting ? a.unprojected + b * hidden_size : a.output + row;
          (a.keeps_gates ? pointwise_forward<T, true> : pointwise_forward<T, false>)(
              a.gates + (step.offset + b) * gate_width, a.bias_hh, cell_prev, a.cell_states + row, hidden_next,
              hidden_size, first, end);
          if (b >= step.ending) {
            std::memcpy(a.cy + b * hidden_size + first, a.cell_states + row + first, (end - first) * sizeof(T));
          }
        }
      }
      const int64_t output_rows = share.output_rows_at(step);
      const int64_t first_output = share.first_output, end_output = share.end_output;
      if (projecting) {
        // The projection reads every unit of o * tanh(c), whichever thread wrote them.
        if (share.meets_every_step) {
          team_barrier();
        }
        if (output_rows > 0) {
          const T* unprojected[kMaxBatch];
          for (int64_t i = 0; i < output_rows; ++i) {
            unprojected[i] = a.unprojected + (share.first_row + i) * hidden_size;
          }
          panel_products(unprojected, output_rows, hidden_size,
                         a.projection_panels + first_output / kLanes * panel_size(hidden_size), end_output - first_output,
                         a.output + (step.offset + share.first_row) * output_size + first_output, output_size,
                         /*accumulate=*/false);
        }
      }
      for (int64_t b = std::max(step.ending, share.first_row); b < share.first_row + output_rows; ++b) {
        std::memcpy(a.hy + b * output_size + first_output, a.output + (step.offset + b) * output_size + first_output,
                    (end_output - first_output) * sizeof(T));
      }
    }
  });
}

void sequence_forward(const SequenceForward& a, int threads) {
  sequence_forward_with(
      a, threads, [](int64_t reduction) { return reduction * kLanes; },
      [] { return [](auto&&... args) { panel_products(args...); }; });
}

// --- the bfloat16 and float16 recurrence: 16-bit panels, products through pair_products.h ---

template <typename T>
using PairProductsFn = void(const T* const* rows, int64_t batch, int64_t reduction, const T* panels, int64_t columns,
                            T* out, int64_t out_stride, bool accumulate, std::byte* scratch);

// Each thread's products through `products`, its rows widened (or copied) once per call into
// scratch of most_rows rows (the widest step's) of the longest reduction, longest_reduction.
template <typename T>
auto pair_products_per_thread(PairProductsFn<T>* products, int64_t longest_reduction, int64_t most_rows) {
  const int64_t scratch_bytes = most_rows * factor_stride(longest_reduction) * static_cast<int64_t>(sizeof(float));
  return [products, scratch_bytes] {
    return [products, scratch = std::vector<std::byte>(scratch_bytes)](
               const T* const* rows, int64_t batch, int64_t reduction, const T* panels, int64_t columns, T* out,
               int64_t out_stride, bool accumulate) mutable {
      products(rows, batch, reduction, panels, columns, out, out_stride, accumulate, scratch.data());
    };
  };
}

int64_t pair_panels_size(int64_t rows, int64_t reduction) {
  return pair_panel_count(rows) * pair_panel_size(reduction);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_NEON)
constexpr bool kHasPairProducts = true;

// AVX512-BF16's products for bfloat16 where asked (capability.cpp asks only where the CPU has
// them), the widened ones otherwise.
template <typename T>
PairProductsFn<T>* pair_products_for(bool native_bfloat16) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, BFloat16Bits>) {
    if (native_bfloat16) {
      return native_bfloat16_products;
    }
  }
#endif
  (void)native_bfloat16;
  return pair_products<WidenedPairs<T>>;
}

void bfloat16_sequence_forward(const SequenceForwardOf<BFloat16Bits>& a, int threads, bool native_bfloat16) {
  sequence_forward_with(a, threads, pair_panel_size,
                        pair_products_per_thread(pair_products_for<BFloat16Bits>(native_bfloat16),
                                                 std::max(a.hidden_size, a.output_size), widest_step(a.steps, a.num_steps)));
}

void half_sequence_forward(const SequenceForwardOf<HalfBits>& a, int threads) {
  sequence_forward_with(a, threads, pair_panel_size,
                        pair_products_per_thread(pair_products_for<HalfBits>(false), std::max(a.hidden_size, a.output_size),
                                                 widest_step(a.steps, a.num_steps)));
}
#else
constexpr bool kHasPairProducts = false;
constexpr void (*bfloat16_sequence_forward)(const SequenceForwardOf<BFloat16Bits>&, int, bool) = nullptr;
constexpr void (*half_sequence_forward)(const SequenceForwardOf<HalfBits>&, int) = nullptr;
#endif

// The backward for storage T: make_products() gives each thread its products, as
// sequence_forward_with's, over unit panels of panel_size(reduction) elements each.
template <typename T, typename PanelSize, typename MakeProducts>
void sequence_backward_with(const SequenceBackwardOf<T>& a, int threads, PanelSize panel_size,
                            const MakeProducts& make_products) {
  const int64_t hidden_size = a.hidden_size;
  const int64_t output_size = a.output_size;
  const int64_t gate_width = 4 * hidden_size;
  const bool projecting = a.projection_unit_panels != nullptr;
  const int64_t batch = widest_step(a.steps, a.num_steps);
  threads = team_size(batch, hidden_size, threads);
  run_team(threads, [&](int thread, int num_threads) {
    // A thread owns its share's units of its share's rows: their gradients in grad_cell (and
    // grad_unprojected), their gate columns of grad_preactivations, the same part of grad_cx; and
    // its share's features of grad_hidden and grad_hx (the same units without a projection).
    const SequenceShare share = share_sequence(batch, hidden_size, output_size, thread, num_threads);
    const int64_t first = share.first_unit, end = share.end_unit;
    const int64_t first_output = share.first_output, end_output = share.end_output;
    const int64_t width = end - first, output_width = end_output - first_output;
    auto panel_products = make_products();
    const T* grad_rows[kMaxBatch];
    for (int64_t k = a.num_steps - 1; k >= 0; --k) {
      const RecurrenceStep& step = a.steps[k];
      const int64_t rows = share.rows_at(step);
      const int64_t end_row = share.first_row + rows;
      const int64_t output_rows = share.output_rows_at(step);
      const int64_t end_output_row = share.first_row + output_rows;
      // A sequence's last step: its gradients start from h_n's and c_n's.
      for (int64_t b = std::max(step.ending, share.first_row); b < end_output_row; ++b) {
        T* grad_hidden = a.grad_hidden + b * output_size + first_output;
        a.grad_hy ? (void)std::memcpy(grad_hidden, a.grad_hy + b * output_size + first_output, output_width * sizeof(T))
                  : (void)std::fill(grad_hidden, grad_hidden + output_width, T{});
      }
      for (int64_t b = std::max(step.ending, share.first_row); b < end_row; ++b) {
        T* grad_cell = a.grad_cell + b * hidden_size + first;
        a.grad_cy ? (void)std::memcpy(grad_cell, a.grad_cy + b * hidden_size + first, width * sizeof(T))
                  : (void)std::fill(grad_cell, grad_cell + width, T{});
      }
      for (int64_t b = share.first_row; b < end_output_row; ++b) {
        const int64_t row = step.offset + b;
        T* grad_hidden = a.grad_hidden + b * output_size;
        add_into(grad_hidden + first_output, a.grad_output ? a.grad_output + row * output_size + first_output : nullptr,
                 output_width);
        if (projecting) {
          // Kept for the projection's weight gradient, one product over all steps afterwards.
          std::memcpy(a.grad_outputs + row * output_size + first_output, grad_hidden + first_output,
                      output_width * sizeof(T));
        }
      }
      for (int64_t b = share.first_row; b < end_row; ++b) {
        const int64_t row = step.offset + b;
        add_into(a.grad_cell + b * hidden_size + first,
                 a.grad_cell_states ? a.grad_cell_states + row * hidden_size + first : nullptr, width);
      }
      if (projecting) {
        // The gradient of o * tanh(c) for this thread's units reads every feature of grad_hidden.
        if (share.meets_every_step) {
          team_barrier();
        }
        if (rows > 0) {
          for (int64_t i = 0; i < rows; ++i) {
            grad_rows[i] = a.grad_hidden + (share.first_row + i) * output_size;
          }
          panel_products(grad_rows, rows, output_size, a.projection_unit_panels + first / kLanes * panel_size(output_size),
                         width, a.grad_unprojected + share.first_row * hidden_size + first, hidden_size,
                         /*accumulate=*/false);
        }
      }
      for (int64_t b = share.first_row; b < end_row; ++b) {
        const int64_t row = step.offset + b;
        const T* grad_cell_output = projecting ? a.grad_unprojected + b * hidden_size : a.grad_hidden + b * hidden_size;
        T* grad_cell = a.grad_cell + b * hidden_size;
        const T* cell_prev = state_row(step, b, a.cell_states, a.cx, hidden_size);
        pointwise_backward(a.gates + row * gate_width, a.grad_gates ? a.grad_gates + row * gate_width : nullptr,
                           cell_prev, a.cell_states + row * hidden_size, grad_cell_output, grad_cell,
                           a.grad_preactivations + row * gate_width, grad_cell, hidden_size, first, end);
      }
      // The product below reads every gate column of this step's gradients.
      if (share.meets_every_step) {
        team_barrier();
      }
      // The gradient of the hidden state this step started from, for the features this thread
      // owns: the rows of weight_hh scaled by the gate gradients and summed.
      if (output_rows > 0) {
        for (int64_t i = 0; i < output_rows; ++i) {
          grad_rows[i] = a.grad_preactivations + (step.offset + share.first_row + i) * gate_width;
        }
        panel_products(grad_rows, output_rows, gate_width, a.unit_panels + first_output / kLanes * panel_size(gate_width),
                       output_width, a.grad_hidden + share.first_row * output_size + first_output, output_size,
                       /*accumulate=*/false);
      }
      // Sequences that start here: their gradient is the initial state's.
      for (int64_t b = std::max(step.carried, share.first_row); b < end_output_row; ++b) {
        std::memcpy(a.grad_hx + b * output_size + first_output, a.grad_hidden + b * output_size + first_output,
                    output_width * sizeof(T));
      }
      for (int64_t b = std::max(step.carried, share.first_row); b < end_row; ++b) {
        std::memcpy(a.grad_cx + b * hidden_size + first, a.grad_cell + b * hidden_size + first, width * sizeof(T));
      }
    }
  });
}

void sequence_backward(const SequenceBackward& a, int threads) {
  sequence_backward_with(
      a, threads, [](int64_t reduction) { return reduction * kLanes; },
      [] { return [](auto&&... args) { panel_products(args...); }; });
}

// The bfloat16 and float16 backward: 16-bit unit panels, products through pair_products.h (the
// longest reduction: the gate gradients' 4 * hidden).
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_NEON)
void bfloat16_sequence_backward(const SequenceBackwardOf<BFloat16Bits>& a, int threads, bool native_bfloat16) {
  sequence_backward_with(a, threads, pair_panel_size,
                         pair_products_per_thread(pair_products_for<BFloat16Bits>(native_bfloat16),
                                                  std::max(4 * a.hidden_size, a.output_size),
                                                  widest_step(a.steps, a.num_steps)));
}

void half_sequence_backward(const SequenceBackwardOf<HalfBits>& a, int threads) {
  sequence_backward_with(a, threads, pair_panel_size,
                         pair_products_per_thread(pair_products_for<HalfBits>(false),
                                                  std::max(4 * a.hidden_size, a.output_size),
                                                  widest_step(a.steps, a.num_steps)));
}
#else
constexpr void (*bfloat16_sequence_backward)(const SequenceBackwardOf<BFloat16Bits>&, int, bool) = nullptr;
constexpr void (*half_sequence_backward)(const SequenceBackwardOf<HalfBits>&, int) = nullptr;
#endif

}  // namespace

const Kernels table = {
    kCapabilityName,
    gate_panels_size_of<row_panels_size>,
    row_panels_size,
    unit_panels_size,
    pack_gate_panels_of<float, row_panels_size, pack_row_panels>,
    pack_row_panels,
    pack_unit_panels,
    cell_forward,
    cell_backward_products,
    sequence_forward,
    sequence_backward,
    &float_units,
    &bfloat16_units,
    &half_units,
    regularised_activations,
    tanh_units,
    normalise_row,
    layer_norm_backward_row,
    regularised_sequence_forward,
    regularised_sequence_backward,
    pair_panels_size,
    kHasPairProducts ? pack_pair_panels<BFloat16Bits> : nullptr,
    kHasPairProducts ? pack_pair_panels<HalfBits> : nullptr,
    bfloat16_sequence_forward,
    half_sequence_forward,
    gate_panels_size_of<pair_panels_size>,
    kHasPairProducts ? pack_gate_panels_of<BFloat16Bits, pair_panels_size, pack_pair_panels<BFloat16Bits>> : nullptr,
    kHasPairProducts ? pack_gate_panels_of<HalfBits, pair_panels_size, pack_pair_panels<HalfBits>> : nullptr,
    kHasPairProducts ? pack_pair_unit_panels<BFloat16Bits> : nullptr,
    kHasPairProducts ? pack_pair_unit_panels<HalfBits> : nullptr,
    bfloat16_sequence_backward,
    half_sequence_backward,
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
