// pair_products.h's loops with AVX512-BF16's vdpbf16ps: a pair of bfloat16 products added to a
// float accumulator in one instruction, the state's pair broadcast as one 32-bit value. Only the
// AVX-512 compile of this file has them, and the whole file is compiled for AVX512-BF16 (the
// target pragma below): the loops are templates, and a template compiled without the instruction
// set cannot inline its intrinsic. capability.cpp calls it only where the CPU has AVX512-BF16.
#if defined(CPU_CAPABILITY_AVX512)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512bf16"))), apply_to = function)
#else
#pragma GCC target("avx512bf16")
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
  pair_products<NativeBFloat16Pairs>(rows, batch, reduction, panels, columns, out, out_stride, accumulate, scratch);
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused

#if defined(CPU_CAPABILITY_AVX512) && defined(__clang__)
#pragma clang attribute pop
#endif
