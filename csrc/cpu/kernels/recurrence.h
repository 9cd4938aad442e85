// What the fused recurrences (small_batch.cpp's sequences, regularised_sequence.cpp's) share
// around each step's recurrent product: how a team splits a sequence, the gate panels' layout
// (written once per call, read every step), and which state row each row of a step multiplies.
// Internal linkage, for vec.h's reason.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../capability.h"
#include "../small_batch.h"
#include "../threads.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kGates = 4;

// --- the team ---

// Items [first, end) of n for thread `thread` of num_threads: equal shares in whole granules
// (granule 1: rows; a vector's lanes: units, so that no vector straddles two threads).
inline std::pair<int64_t, int64_t> even_share(int64_t n, int64_t granule, int thread, int num_threads) {
  const int64_t per_thread = ((n + num_threads - 1) / num_threads + granule - 1) / granule * granule;
  const int64_t first = std::min(n, thread * per_thread);
  return {first, std::min(n, first + per_thread)};
}

// By batch rows where every thread gets enough rows for a panel tile (4) and the whole recurrent
// weight stays in cache: each thread then runs its own sequences' recurrences start to end and
// never waits on another, where a split by units meets at a barrier every step and reads the
// other threads' share of the hidden state from their caches.
// - Hidden <= 256 (float32 weight <= 1 MB): by rows (at batch 8-16 10-40% less time a step than by
//   units, AMD EPYC).
// - Hidden 1024 (16 MB): by units; every thread streaming all the weight each step costs more
//   than the barrier (2 threads, batch 8: 610 against 470 us a step).
// - Hidden 257-512 (4 MB at 512): by units where each thread's share of the float32 weight fits
//   its L2 and the threads have fewer than 16 rows each, else by rows. On a Xeon with 2 MB of L2
//   (2 threads, T = 64) the split by units took lf.LSTM's float32 forward at batch 8 from 0.92x
//   nn.LSTM to 1.16x (training 0.87x to 1.17x), batch 16 0.89x to 1.03x, and bfloat16 (AMX) at batch
//   8 from 1.0x to 1.55x; at batch 64 (32 rows a thread, two whole AMX tiles) the rows were as fast
//   in float32 and 10% faster in bfloat16. With 1 MB of L2 (AMD EPYC Zen 4/5) the share does not
//   fit and the rows stay.
constexpr int64_t kMinRowsPerThread = 4;
constexpr int64_t kMaxHiddenAlwaysByRows = 256;
constexpr int64_t kMaxHiddenForRowSplit = 512;
constexpr int64_t kRowsPerThreadAlwaysByRows = 16;

inline bool splits_by_rows(int64_t batch, int64_t hidden_size, int num_threads) {
  if (batch < num_threads * kMinRowsPerThread || hidden_size > kMaxHiddenForRowSplit) {
    return false;
  }
  if (hidden_size <= kMaxHiddenAlwaysByRows || batch >= num_threads * kRowsPerThreadAlwaysByRows) {
    return true;
  }
  const int64_t unit_share_bytes = 4 * hidden_size * hidden_size * static_cast<int64_t>(sizeof(float)) / num_threads;
  const int64_t l2_bytes = l2_cache_bytes();
  return l2_bytes == 0 || unit_share_bytes > l2_bytes;
}

// A split whose threads meet every step (by units, on more than one thread) needs threads that
// wait for each other: where the threading has none (a build without OpenMP), the sequence runs
// on one thread.
inline int team_size(int64_t batch, int64_t hidden_size, int threads) {
  const bool meets_every_step = threads > 1 && !splits_by_rows(batch, hidden_size, threads);
  return meets_every_step && !teams_can_meet() ? 1 : threads;
}

// The most rows any step has: the threads share the rows of the widest.
inline int64_t widest_step(const RecurrenceStep* steps, int64_t num_steps) {
  int64_t batch = 0;
  for (int64_t k = 0; k < num_steps; ++k) {
    batch = std::max(batch, steps[k].batch);
  }
  return batch;
}

// --- a step's rows ---

// The state row (of `stride` elements) that row b of a step starts from: a row continuing a
// sequence reads what the step visited before wrote to `previous`, a row starting one its row of
// `initial`.
template <typename T>
inline const T* state_row(const RecurrenceStep& step, int64_t b, const T* previous, const T* initial, int64_t stride) {
  return b < step.carried ? previous + (step.previous_offset + b) * stride : initial + b * stride;
}

// --- the gate panels ---

// A panel is kLanes weight rows transposed: to[j * kLanes + lane] = rows[lane][j] (Element: a
// float, a 16-bit value, or a pair of them as one 32-bit word), for j < count, lanes past `lanes`
// zero. A whole panel of 32-bit elements goes as square blocks transposed in registers (vec.h's
// transpose_words; a word at a time, the packing was a tenth of a T = 1-16 call at hidden 256 on
// an Intel Xeon). The rest (a partial panel, 16-bit elements, a reduction's tail) goes in blocks
// of 16 j, which keep the stores of every lane inside 16 cache lines, where writing each lane's
// whole column at once strode over the panel (32 KB at reduction 512) once per lane. Bytes
// through memcpy: the same loop reads BFloat16Bits pairs as words.
template <typename Element>
void transpose_rows(const std::byte* rows, int64_t row_bytes, int64_t lanes, int64_t count, std::byte* to) {
  constexpr int64_t kBlock = 16;
  constexpr int64_t kSize = sizeof(Element);
  const auto block = [&](int64_t first, auto n) {
    for (int64_t lane = 0; lane < Vec::kWidth; ++lane) {
      std::byte* out = to + (first * Vec::kWidth + lane) * kSize;
      const bool zero = lane >= lanes;  // past the weight's last row
      const std::byte* from = zero ? nullptr : rows + lane * row_bytes + first * kSize;
      for (int64_t j = 0; j < n; ++j) {
        Element value{};
        if (!zero) {
          std::memcpy(&value, from + j * kSize, kSize);
        }
        std::memcpy(out + j * Vec::kWidth * kSize, &value, kSize);
      }
    }
  };
  int64_t first = 0;
  if constexpr (kSize == 4) {
    if (lanes >= Vec::kWidth) {  // a whole panel: square blocks in registers (vec.h)
      for (; first + Vec::kWidth <= count; first += Vec::kWidth) {
        transpose_words(rows + first * kSize, row_bytes, to + first * Vec::kWidth * kSize);
      }
    }
  }
  for (; first + kBlock <= count; first += kBlock) {
    block(first, std::integral_constant<int64_t, kBlock>{});
  }
  if (first < count) {
    block(first, count - first);
  }
}

// weight_hh [4 * hidden, state] with each gate's rows packed on their own by PackRows (a [rows,
// reduction] weight into panels of RowsSize(rows, reduction) elements: small_batch.cpp's float
// row panels, pair_products.h's 16-bit pair panels), so that a vector of units never straddles
// two gates.
template <auto RowsSize>
int64_t gate_panels_size_of(int64_t hidden_size, int64_t state_size) {
  return kGates * RowsSize(hidden_size, state_size);
}

// `threads` share the gates: every call packs the weight anew (a cache keyed on the weight's
// version would miss writes through .data), so at T = 1-16 the packing is a large part of the call.
template <typename T, auto RowsSize, auto PackRows>
void pack_gate_panels_of(const T* weight_hh, int64_t hidden_size, int64_t state_size, T* panels, int threads) {
  run_team(std::min<int>(threads, kGates), [&](int thread, int num_threads) {
    const auto [first, end] = even_share(kGates, 1, thread, num_threads);
    for (int64_t gate = first; gate < end; ++gate) {
      PackRows(weight_hh + gate * hidden_size * state_size, hidden_size, state_size,
               panels + gate * RowsSize(hidden_size, state_size));
    }
  });
}

// The panels of gate `gate` from unit `first` on (first: a multiple of the vector's lanes), each
// panel panel_elements long.
template <typename T>
const T* gate_panels_from(const T* panels, int64_t hidden_size, int64_t panel_elements, int64_t gate, int64_t first) {
  const int64_t panel_count = (hidden_size + Vec::kWidth - 1) / Vec::kWidth;
  return panels + (gate * panel_count + first / Vec::kWidth) * panel_elements;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
