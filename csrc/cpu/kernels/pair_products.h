// The recurrent products of bfloat16 and float16 sequences, out[b, c] (+)= sum_k x_b[k] w[k, c]:
// small_batch.cpp's panel products for weights stored in 16 bits, written once over a "pairs"
// policy that multiplies one pair of reduction indices (k = 2p, 2p + 1) of a panel into float
// accumulators.
//
// Two policies: WidenedPairs (below: the pair's weights widened to float, two FMAs; every
// instruction set with conversions, every 16-bit dtype) and NativeBFloat16Pairs
// (bfloat16_products.cpp: AVX512-BF16's vdpbf16ps, the pair in one instruction). The loops are
// templates with internal linkage, so that the file compiled for AVX512-BF16 gets its own copy.
//
// Why 16-bit panels: a step streams the whole recurrent weight; half the bytes of float32's.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <type_traits>

#include "../small_batch.h"
#include "recurrence.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kPairLanes = Vec::kWidth;

// The reduction rounded up to whole pairs; the panels hold zeros past the weight's last index.
inline int64_t pair_reduction(int64_t reduction) {
  return (reduction + 1) / 2 * 2;
}

// One panel of kPairLanes columns: [pairs][2 * kPairLanes], in elements.
inline int64_t pair_panel_size(int64_t reduction) {
  return pair_reduction(reduction) * kPairLanes;
}

inline int64_t pair_panel_count(int64_t columns) {
  return (columns + kPairLanes - 1) / kPairLanes;
}

// The factor rows (each state row, as the policy multiplies it) are this long: whole vectors.
inline int64_t factor_stride(int64_t reduction) {
  return (reduction + kPairLanes - 1) / kPairLanes * kPairLanes + kPairLanes;
}

// A [rows, reduction] weight (row-major, T = BFloat16Bits or HalfBits) as panels of kPairLanes of
// its rows: the forward's gate and projection panels (rows: output columns).
template <typename T>
void pack_pair_panels(const T* weight, int64_t rows, int64_t reduction, T* panels) {
  for (int64_t panel = 0; panel < pair_panel_count(rows); ++panel) {
    const T* from = weight + panel * kPairLanes * reduction;
    T* to = panels + panel * pair_panel_size(reduction);
    const int64_t lanes = rows - panel * kPairLanes;
    const int64_t row_bytes = reduction * static_cast<int64_t>(sizeof(T));
    // pair_slot's two layouts as transposes: bfloat16's [pair][lane][2] of whole pairs (one 32-bit
    // word each), float16's [k][lane] of single values.
    const bool word_pairs = pair_slot(to, 1, 0) == 2;
    const int64_t whole = word_pairs ? reduction / 2 : reduction;
    if (word_pairs) {
      transpose_rows<uint32_t>(reinterpret_cast<const std::byte*>(from), row_bytes, lanes, whole,
                               reinterpret_cast<std::byte*>(to));
    } else {
      transpose_rows<uint16_t>(reinterpret_cast<const std::byte*>(from), row_bytes, lanes, whole,
                               reinterpret_cast<std::byte*>(to));
    }
    // An odd reduction's last pair: its one index, then zero.
    for (int64_t k = word_pairs ? 2 * whole : whole; k < pair_reduction(reduction); ++k) {
      for (int64_t lane = 0; lane < kPairLanes; ++lane) {
        to[k / 2 * 2 * kPairLanes + pair_slot(to, lane, k % 2)] =
            lane < lanes && k < reduction ? from[lane * reduction + k] : T{0};
      }
    }
  }
}

// A [rows, units] weight (row-major) as panels of kPairLanes of its units, the reduction over its
// rows: the backward's panels of weight_hh, read along its rows (no transposing copy).
// Panel by panel, the threads sharing them; a whole pair of rows at a time through a loop of
// constant trip count the compiler vectorises (the scalar loop with its bounds checks was 11% of
// a bfloat16 training call at T = 16, batch 1, hidden 512 on 2 threads).
template <typename T>
void pack_pair_unit_panels(const T* weight, int64_t rows, int64_t units, T* panels, int threads) {
  run_team(threads, [&](int thread, int num_threads) {
    const auto [first, end] = even_share(pair_panel_count(units), 1, thread, num_threads);
    for (int64_t panel = first; panel < end; ++panel) {
      T* to = panels + panel * pair_panel_size(rows);
      const T* from = weight + panel * kPairLanes;
      const int64_t lanes = std::min<int64_t>(kPairLanes, units - panel * kPairLanes);
      for (int64_t k = 0; k < pair_reduction(rows); k += 2) {
        T* block = to + k * kPairLanes;
        if (lanes == kPairLanes && k + 1 < rows) {
          const T* even = from + k * units;
          const T* odd = even + units;
          for (int64_t lane = 0; lane < kPairLanes; ++lane) {
            block[pair_slot(to, lane, 0)] = even[lane];
            block[pair_slot(to, lane, 1)] = odd[lane];
          }
          continue;
        }
        for (int64_t parity = 0; parity < 2; ++parity) {
          for (int64_t lane = 0; lane < kPairLanes; ++lane) {
            block[pair_slot(to, lane, parity)] = k + parity < rows && lane < lanes ? from[(k + parity) * units + lane] : T{0};
          }
        }
      }
    }
  });
}

// Pairs of any 16-bit dtype widened to float: two FMAs a pair, each state value broadcast as a
// float (the state rows are widened once per product call).
template <typename T>
struct WidenedPairs {
  using Storage = T;
  using Factor = float;
  struct Weights {
    Vec even, odd;
  };
  // A widened pair takes two registers: AVX2's 16 fit 4 rows x 2 vectors of accumulators, and
  // AVX-512's 32 fit 6 x 2 but not 6 x 4 (24 accumulators and 8 weight registers).
  static constexpr int kMaxRows = Vec::kRegisters >= 32 ? 6 : 4;
  static constexpr int kPanelGroup = 2;

  static Weights load(const T* block) {
    Weights w;
    widen_pairs(block, w.even, w.odd);
    return w;
  }

  // out[0, factor_stride(reduction)) = x widened, zero past its end.
  static void prepare(const T* x, int64_t reduction, float* out) {
    int64_t k = 0;
    for (; k + kPairLanes <= reduction; k += kPairLanes) {
      load_widened(x + k).store(out + k);
    }
    T tail[kPairLanes] = {};
    std::memcpy(tail, x + k, (reduction - k) * sizeof(T));
    // An odd reduction's last pair reads out[reduction]: zero here.
    load_widened(tail).store(out + k);
  }

  static LSTM_FUSED_ALWAYS_INLINE void multiply_add(Vec& acc, const Weights& w, const float* pair) {
    acc = fma(Vec::broadcast(pair), w.even, acc);
    acc = fma(Vec::broadcast(pair + 1), w.odd, acc);
  }
};

// out[b * out_stride + v * kPairLanes + lane] = acc (+ its old value when accumulate), rounded to
// T, for the first columns_left columns (all of them unless kMasked).
template <typename T, int kBatch, int kVectors, bool kMasked>
LSTM_FUSED_ALWAYS_INLINE void store_pair_tile(
    const Vec (&acc)[kBatch][kVectors], T* out, int64_t out_stride, int64_t columns_left, bool accumulate) {
#pragma GCC unroll 16
  for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      T* o = out + b * out_stride + v * kPairLanes;
      if constexpr (kMasked) {
        // Through a zeroed buffer: exactly the lanes asked are read and written.
        const int64_t count = std::clamp<int64_t>(columns_left - v * kPairLanes, 0, kPairLanes);
        T lanes[kPairLanes] = {};
        std::memcpy(lanes, o, count * sizeof(T));
        store_narrowed(lanes, accumulate ? acc[b][v] + load_widened(lanes) : acc[b][v]);
        std::memcpy(o, lanes, count * sizeof(T));
      } else {
        store_narrowed(o, accumulate ? acc[b][v] + load_widened(o) : acc[b][v]);
      }
    }
  }
}

// kBatch factor rows against kVectors panels: each pair's weights loaded once serve every row.
template <typename Pairs, int kBatch, int kVectors, bool kMasked>
void pair_tile(
    const typename Pairs::Factor* const* x,
    int64_t reduction,
    const typename Pairs::Storage* panels,
    typename Pairs::Storage* out,
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
  const int64_t panel_size = pair_panel_size(reduction);
  const int64_t pairs = pair_reduction(reduction) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    typename Pairs::Weights w[kVectors];
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      w[v] = Pairs::load(panels + v * panel_size + p * 2 * kPairLanes);
    }
#pragma GCC unroll 16
    for (int b = 0; b < kBatch; ++b) {
#pragma GCC unroll 16
      for (int v = 0; v < kVectors; ++v) {
        Pairs::multiply_add(acc[b][v], w[v], x[b] + 2 * p);
      }
    }
  }
  store_pair_tile<typename Pairs::Storage, kBatch, kVectors, kMasked>(acc, out, out_stride, columns_left, accumulate);
}

template <int kValue>
using PairConstant = std::integral_constant<int, kValue>;

// Calls fn(PairConstant<rows>) for rows in [1, kMaxRows].
template <int kMaxRows, typename Fn>
void with_rows(int64_t rows, const Fn& fn) {
  static_assert(kMaxRows >= 4 && kMaxRows <= 6);
  switch (rows) {
    case 6: if constexpr (kMaxRows >= 6) { fn(PairConstant<6>{}); } break;
    case 5: if constexpr (kMaxRows >= 5) { fn(PairConstant<5>{}); } break;
    case 4: fn(PairConstant<4>{}); break;
    case 3: fn(PairConstant<3>{}); break;
    case 2: fn(PairConstant<2>{}); break;
    default: fn(PairConstant<1>{}); break;
  }
}

// Columns in groups of kVectors panels, the last panels one at a time (masked), for one block of
// kBatch rows.
template <typename Pairs, int kBatch, int kVectors>
void pair_columns(
    const typename Pairs::Factor* const* x,
    int64_t reduction,
    const typename Pairs::Storage* panels,
    int64_t columns,
    typename Pairs::Storage* out,
    int64_t out_stride,
    bool accumulate) {
  constexpr int64_t kWidth = kVectors * kPairLanes;
  const int64_t panel_size = pair_panel_size(reduction);
  int64_t column = 0;
  for (; column + kWidth <= columns; column += kWidth) {
    pair_tile<Pairs, kBatch, kVectors, false>(
        x, reduction, panels + column / kPairLanes * panel_size, out + column, out_stride, kWidth, accumulate);
  }
  for (; column < columns; column += kPairLanes) {
    pair_tile<Pairs, kBatch, 1, true>(x, reduction, panels + column / kPairLanes * panel_size, out + column,
                                      out_stride, columns - column, accumulate);
  }
}

// out[b, c] (+)= sum over k < reduction of x_b[k] w[k, c] for the `columns` columns whose panels
// start at `panels`, x being the rows as the policy multiplies them. The same blocking as the float
// panel products: under 4 rows one row block with wider column groups; else columns outer in groups
// of the policy's kPanelGroup panels (read from memory by the first row block, from L1 or L2 by the
// others), rows inner in blocks as even as can be.
template <typename Pairs>
void pair_panel_products(
    const typename Pairs::Factor* const* x,
    int64_t batch,
    int64_t reduction,
    const typename Pairs::Storage* panels,
    int64_t columns,
    typename Pairs::Storage* out,
    int64_t out_stride,
    bool accumulate) {
  switch (batch) {
    case 0: return;
    case 1: return pair_columns<Pairs, 1, 8>(x, reduction, panels, columns, out, out_stride, accumulate);
    case 2: return pair_columns<Pairs, 2, 4>(x, reduction, panels, columns, out, out_stride, accumulate);
    case 3: return pair_columns<Pairs, 3, 2>(x, reduction, panels, columns, out, out_stride, accumulate);
    default: break;
  }
  constexpr int kMaxRows = Pairs::kMaxRows;
  const int64_t panel_size = pair_panel_size(reduction);
  const int64_t blocks = (batch + kMaxRows - 1) / kMaxRows;
  constexpr int kGroup = Pairs::kPanelGroup;
  for (int64_t column = 0; column < columns; column += kGroup * kPairLanes) {
    const bool whole = column + kGroup * kPairLanes <= columns;
    for (int64_t block = 0, b = 0; block < blocks; ++block) {
      const int64_t rows = (batch - b) / (blocks - block) + ((batch - b) % (blocks - block) != 0);
      with_rows<kMaxRows>(rows, [&](auto kRows) {
        constexpr int kBatch = decltype(kRows)::value;
        const auto* block_panels = panels + column / kPairLanes * panel_size;
        if (whole) {
          pair_tile<Pairs, kBatch, kGroup, false>(x + b, reduction, block_panels, out + b * out_stride + column, out_stride,
                                             kGroup * kPairLanes, accumulate);
        } else {
          pair_columns<Pairs, kBatch, 1>(x + b, reduction, block_panels, columns - column,
                                         out + b * out_stride + column, out_stride, accumulate);
        }
      });
      b += rows;
    }
  }
}

// The products from the state rows themselves (T): each row prepared once into scratch (at least
// batch * factor_stride(reduction) floats' bytes), then multiplied.
template <typename Pairs>
void pair_products(
    const typename Pairs::Storage* const* rows,
    int64_t batch,
    int64_t reduction,
    const typename Pairs::Storage* panels,
    int64_t columns,
    typename Pairs::Storage* out,
    int64_t out_stride,
    bool accumulate,
    std::byte* scratch) {
  using Factor = typename Pairs::Factor;
  static_assert(sizeof(Factor) <= sizeof(float));
  const Factor* factors[small_batch::kMaxBatch];
  for (int64_t b = 0; b < batch; ++b) {
    Factor* row = reinterpret_cast<Factor*>(scratch) + b * factor_stride(reduction);
    Pairs::prepare(rows[b], reduction, row);
    factors[b] = row;
  }
  pair_panel_products<Pairs>(factors, batch, reduction, panels, columns, out, out_stride, accumulate);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
