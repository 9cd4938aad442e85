// pair_products.h's products on the CPU's own bfloat16 instructions, in the AVX-512 compile only:
// - AVX512-BF16's vdpbf16ps: a pair of bfloat16 products added to a float accumulator in one
//   instruction, the state's pair broadcast as one 32-bit value;
// - AMX's tdpbf16ps where the CPU has AMX-BF16 (Sapphire Rapids and later): a [16 rows x 32] tile
//   of the states times a tile of 16 pairs of one panel, into [16 x 16] floats in one instruction.
//   The 16-bit panels' layout ([pair][lane][2]) is already the one AMX reads for its second
//   operand, so the same packed weights serve both.
// The whole file is compiled for these instruction sets (the target pragma below): the loops are
// templates, and a template compiled without the instruction set cannot inline its intrinsic.
// capability.cpp calls it only where the CPU has AVX512-BF16, and bfloat16_tiles() says
// where AMX is usable.
#if defined(CPU_CAPABILITY_AVX512)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512bf16,amx-tile,amx-bf16"))), apply_to = function)
#else
#pragma GCC target("avx512bf16,amx-tile,amx-bf16")
#endif
#endif

#include "kernels.h"
#include "pair_products.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX512)
namespace {

struct NativeBFloat16Pairs {
  using Storage = BFloat16Bits;
  using Factor = BFloat16Bits;
  using Weights = __m512i;
  static constexpr int kMaxRows = 6;
  // A pair takes one register: 6 rows x 4 panels is 24 accumulators, 4 weight registers and a
  // broadcast, and each broadcast serves 4 instructions instead of 2 (Zen 5, one thread, T = 64:
  // lf.LSTM's bfloat16 forward 6-9% less time at batch 8-64, hidden 512).
  static constexpr int kPanelGroup = 4;

  static Weights load(const BFloat16Bits* block) { return _mm512_loadu_si512(block); }

  // The row itself, zero past its end (an odd reduction's last pair).
  static void prepare(const BFloat16Bits* x, int64_t reduction, BFloat16Bits* out) {
    std::memcpy(out, x, reduction * sizeof(BFloat16Bits));
    out[reduction] = BFloat16Bits{0};
  }

  static LSTM_FUSED_ALWAYS_INLINE void multiply_add(Vec& acc, Weights w, const BFloat16Bits* pair) {
    uint32_t bits;
    std::memcpy(&bits, pair, sizeof(bits));
    acc.v = _mm512_dpbf16_ps(acc.v, (__m512bh)w, (__m512bh)_mm512_set1_epi32(static_cast<int>(bits)));
  }
};

// --- AMX ---
// Tiles tmm0-3 accumulate a block of up to 32 rows x 2 panels (tmm0/1: rows 0-15 against panel
// 0/1; tmm2/3: rows 16-31), tmm4/5 hold those rows' 32 reduction indices, tmm6/7 the 16 pairs of
// each panel: 8 tiles, every one the hardware has. A tile row is 64 bytes: 32 bfloat16 of a state
// row, 16 pairs of a panel's 16 lanes, or 16 floats of the accumulators.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTilePairs = 16;
constexpr int64_t kTileRowBytes = 64;
constexpr int64_t kBlockRows = 2 * kTileRows;
constexpr int64_t kBlockColumns = 2 * kPairLanes;
static_assert(kPairLanes == 16, "the AMX tiles read the avx512 compile's 16-lane panels");

// gcc's AMX intrinsics are asm statements that name no memory (ldtilecfg names 8 of its 64
// bytes): the compiler would see neither a tile load read what was just written, nor a tile store
// write what is read next, and may drop or move those plain accesses (found by the odd sizes'
// tests: the zeroed tail tiles came out NaN). This compiler barrier says both.
LSTM_FUSED_ALWAYS_INLINE void tile_memory_fence() {
  asm volatile("" ::: "memory");
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};
};

// The tiles for a block of first_rows (1-16) + second_rows (0-16) state rows; the second row
// tiles stay unconfigured when second_rows is 0.
TileConfig tile_config(int64_t first_rows, int64_t second_rows) {
  TileConfig config;
  const auto configure = [&](int tile, int64_t rows) {
    config.rows[tile] = static_cast<uint8_t>(rows);
    config.row_bytes[tile] = kTileRowBytes;
  };
  for (int tile : {0, 1, 4}) configure(tile, first_rows);
  if (second_rows > 0) {
    for (int tile : {2, 3, 5}) configure(tile, second_rows);
  }
  configure(6, kTilePairs);
  configure(7, kTilePairs);
  return config;
}

// acc[32][32] = the block's rows x one or two panels, the rows x_stride bytes apart and zero from
// the reduction's end to the next multiple of 32. A reduction that is not a whole number of tiles
// takes its last panel tiles from a zeroed copy: a full tile would read past the panel's end.
template <bool kSecondRows, bool kSecondPanel>
void tile_block(const BFloat16Bits* x, int64_t x_stride, int64_t pairs, const BFloat16Bits* panel, int64_t panel_size,
                float* acc) {
  tile_memory_fence();
  _tile_zero(0);
  if constexpr (kSecondPanel) _tile_zero(1);
  if constexpr (kSecondRows) {
    _tile_zero(2);
    if constexpr (kSecondPanel) _tile_zero(3);
  }
  const auto multiply = [&](const BFloat16Bits* a, const BFloat16Bits* b0, const BFloat16Bits* b1) {
    _tile_loadd(4, a, x_stride);
    _tile_loadd(6, b0, kTileRowBytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kSecondRows) {
      _tile_loadd(5, reinterpret_cast<const std::byte*>(a) + kTileRows * x_stride, x_stride);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (kSecondPanel) {
      _tile_loadd(7, b1, kTileRowBytes);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (kSecondRows) _tile_dpbf16ps(3, 5, 7);
    }
  };
  constexpr int64_t kPairElements = 2 * kPairLanes;  // one pair of a panel: 16 lanes x 2
  const int64_t whole = pairs / kTilePairs;
  for (int64_t block = 0; block < whole; ++block) {
    const int64_t pair = block * kTilePairs;
    multiply(x + 2 * pair, panel + pair * kPairElements, panel + panel_size + pair * kPairElements);
  }
  if (const int64_t left = pairs - whole * kTilePairs; left > 0) {
    const int64_t pair = whole * kTilePairs;
    alignas(64) BFloat16Bits tail[2][kTilePairs * kPairElements] = {};
    std::memcpy(tail[0], panel + pair * kPairElements, left * kPairElements * sizeof(BFloat16Bits));
    if constexpr (kSecondPanel) {
      std::memcpy(tail[1], panel + panel_size + pair * kPairElements, left * kPairElements * sizeof(BFloat16Bits));
    }
    tile_memory_fence();
    multiply(x + 2 * pair, tail[0], tail[1]);
  }
  constexpr int64_t kAccStride = kBlockColumns * sizeof(float);
  _tile_stored(0, acc, kAccStride);
  if constexpr (kSecondPanel) _tile_stored(1, acc + kPairLanes, kAccStride);
  if constexpr (kSecondRows) {
    _tile_stored(2, acc + kTileRows * kBlockColumns, kAccStride);
    if constexpr (kSecondPanel) _tile_stored(3, acc + kTileRows * kBlockColumns + kPairLanes, kAccStride);
  }
  tile_memory_fence();
}

// pair_products' contract on AMX. The rows are copied into scratch as whole tiles of reduction,
// zero-padded (fewer bytes than the float factor rows pair_products_per_thread sizes it for).
void tile_bfloat16_products(
    const BFloat16Bits* const* rows,
    int64_t batch,
    int64_t reduction,
    const BFloat16Bits* panels,
    int64_t columns,
    BFloat16Bits* out,
    int64_t out_stride,
    bool accumulate,
    std::byte* scratch) {
  const int64_t row_elements = (reduction + 2 * kTilePairs - 1) / (2 * kTilePairs) * (2 * kTilePairs);
  const int64_t x_stride = row_elements * static_cast<int64_t>(sizeof(BFloat16Bits));
  BFloat16Bits* x = reinterpret_cast<BFloat16Bits*>(scratch);
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(x + b * row_elements, rows[b], reduction * sizeof(BFloat16Bits));
    std::fill(x + b * row_elements + reduction, x + (b + 1) * row_elements, BFloat16Bits{0});
  }
  const int64_t pairs = pair_reduction(reduction) / 2;
  const int64_t panel_size = pair_panel_size(reduction);
  const int64_t panel_count = pair_panel_count(columns);
  alignas(64) float acc[kBlockRows * kBlockColumns];
  for (int64_t first_row = 0; first_row < batch; first_row += kBlockRows) {
    const int64_t block_rows = std::min(kBlockRows, batch - first_row);
    const int64_t first_rows = std::min(kTileRows, block_rows);
    const bool second_rows = block_rows > kTileRows;
    const TileConfig config = tile_config(first_rows, block_rows - first_rows);
    tile_memory_fence();
    _tile_loadconfig(&config);
    const BFloat16Bits* block_x = x + first_row * row_elements;
    for (int64_t panel = 0; panel < panel_count; panel += 2) {
      const bool second_panel = panel + 1 < panel_count;
      const BFloat16Bits* block_panels = panels + panel * panel_size;
      if (second_rows) {
        second_panel ? tile_block<true, true>(block_x, x_stride, pairs, block_panels, panel_size, acc)
                     : tile_block<true, false>(block_x, x_stride, pairs, block_panels, panel_size, acc);
      } else {
        second_panel ? tile_block<false, true>(block_x, x_stride, pairs, block_panels, panel_size, acc)
                     : tile_block<false, false>(block_x, x_stride, pairs, block_panels, panel_size, acc);
      }
      for (int64_t r = 0; r < block_rows; ++r) {
        BFloat16Bits* out_row = out + (first_row + r) * out_stride;
        for (int64_t p = panel; p < std::min(panel + 2, panel_count); ++p) {
          const int64_t column = p * kPairLanes;
          const Vec sum[1][1] = {{Vec::load(acc + r * kBlockColumns + (p - panel) * kPairLanes)}};
          const int64_t columns_left = columns - column;
          columns_left >= kPairLanes
              ? store_pair_tile<BFloat16Bits, 1, 1, false>(sum, out_row + column, out_stride, columns_left, accumulate)
              : store_pair_tile<BFloat16Bits, 1, 1, true>(sum, out_row + column, out_stride, columns_left, accumulate);
        }
      }
    }
  }
  // Leaves the tiles unconfigured: a thread holding configured tiles has their 8 KB saved and
  // restored at every context switch.
  _tile_release();
}

}  // namespace

void native_bfloat16_products(
    const BFloat16Bits* const* rows,
    int64_t batch,
    int64_t reduction,
    const BFloat16Bits* panels,
    int64_t columns,
    BFloat16Bits* out,
    int64_t out_stride,
    bool accumulate,
    std::byte* scratch) {
  if (bfloat16_tiles()) {
    return tile_bfloat16_products(rows, batch, reduction, panels, columns, out, out_stride, accumulate, scratch);
  }
  pair_products<NativeBFloat16Pairs>(rows, batch, reduction, panels, columns, out, out_stride, accumulate, scratch);
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused

#if defined(CPU_CAPABILITY_AVX512) && defined(__clang__)
#pragma clang attribute pop
#endif
