// The table of the kernels that are compiled once per instruction set (every .cpp in this folder),
// and its entries. capability.cpp picks one table at run time; everything else calls through it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../cell_units.h"
#include "../regularised_sequence.h"
#include "../small_batch.h"

namespace lstm_fused {
namespace cpu {

// The pointwise loops of cell_units.h over whole vectors of units [first, end), for gates and
// states stored as T (float, BFloat16Bits, HalfBits) and computed in float vectors: they return the
// first unit they left for the scalar loop.
template <typename T>
using ForwardUnitsFn = int64_t(
    bool has_bias,
    GateRows<T> gates,
    GateRows<const T> bias,
    const T* cell_prev,
    T* cell_next,
    T* hidden_next,
    int64_t first,
    int64_t end);
template <typename T>
using BackwardUnitsFn = int64_t(
    GateRows<const T> gates,
    GateRows<const T> grad_gates,
    const T* cell_prev,
    const T* cell_next,
    const T* grad_hidden,
    const T* grad_cell,
    GateRows<T> grad_preactivation,
    T* grad_cell_prev,
    int64_t first,
    int64_t end);

// One dtype's pair of pointwise loops; null where this instruction set has no vector conversion
// for the dtype (the portable path's bfloat16 and float16), which leaves the row to the scalar loop.
template <typename T>
struct PointwiseUnits {
  ForwardUnitsFn<T>* forward;
  BackwardUnitsFn<T>* backward;
};

// The regularised LSTM's (regularised_cell.cpp): a row's activations in place (i, f, g, o of
// [4 * hidden]) with c~ = f c_prev + i g, and tanh of count values; each returns the first unit left
// for the scalar loop.
using RegularisedActivationsFn = int64_t(float* gates, const float* cell_prev, float* cell_new, int64_t hidden_size);
using TanhUnitsFn = int64_t(const float* in, float* out, int64_t count);
// Layer norm over a row of n: v normalised in place (biased variance), returning 1 / std; and the
// gradient of v from that of LN's output, rstd * (dy - mean(dy) - x_hat mean(dy x_hat)), dy = grad gamma.
using NormaliseRowFn = float(float* v, int64_t n, float epsilon);
using LayerNormBackwardRowFn = void(const float* grad, const float* gamma, const float* x_hat, float rstd, int64_t n,
                                    float* out);

struct Kernels {
  const char* name;  // "default", "avx2", "avx512", "neon": what lstm_fused.cpu_capability() says

  // small_batch.h's entries, for this instruction set's vector width.
  int64_t (*gate_panels_size)(int64_t hidden_size, int64_t state_size);
  int64_t (*row_panels_size)(int64_t rows, int64_t reduction);
  int64_t (*unit_panels_size)(int64_t rows, int64_t units);
  void (*pack_gate_panels)(const float* weight_hh, int64_t hidden_size, int64_t state_size, float* panels, int threads);
  void (*pack_row_panels)(const float* weight, int64_t rows, int64_t reduction, float* panels);
  void (*pack_unit_panels)(const float* weight, int64_t rows, int64_t units, float* panels, int threads);
  void (*cell_forward)(const small_batch::CellForward& args, int threads);
  void (*cell_backward_products)(const small_batch::CellBackwardProducts& args, int threads);
  void (*sequence_forward)(const small_batch::SequenceForward& args, int threads);
  void (*sequence_backward)(const small_batch::SequenceBackward& args, int threads);

  // The pointwise loops of cell_units.h over whole vectors of units, per storage dtype (pointers,
  // so that this table stays constant-initialised: capability.cpp may read it before dynamic
  // initialisation has reached this file).
  const PointwiseUnits<float>* float_units;
  const PointwiseUnits<BFloat16Bits>* bfloat16_units;
  const PointwiseUnits<HalfBits>* half_units;

  RegularisedActivationsFn* regularised_activations;
  TanhUnitsFn* tanh_units;
  NormaliseRowFn* normalise_row;
  LayerNormBackwardRowFn* layer_norm_backward_row;

  // regularised_sequence.h's entries (kernels/regularised_sequence.cpp).
  void (*regularised_sequence_forward)(const regularised::SequenceForward& args, int threads);
  void (*regularised_sequence_backward)(const regularised::SequenceBackward& args, int threads);
  // small_batch.h's bfloat16 and float16 recurrence, its 16-bit panels (pair_products.h); null
  // where this instruction set has no vector conversion for the dtypes (the portable path).
  // native_bfloat16: the products on AVX512-BF16, which only the avx512 table can use (and only
  // where the CPU has it: capability.cpp decides).
  int64_t (*pair_panels_size)(int64_t rows, int64_t reduction);
  void (*pack_bfloat16_pair_panels)(const BFloat16Bits* weight, int64_t rows, int64_t reduction, BFloat16Bits* panels);
  void (*pack_half_pair_panels)(const HalfBits* weight, int64_t rows, int64_t reduction, HalfBits* panels);
  void (*bfloat16_sequence_forward)(const small_batch::SequenceForwardOf<BFloat16Bits>& args, int threads,
                                    bool native_bfloat16);
  void (*half_sequence_forward)(const small_batch::SequenceForwardOf<HalfBits>& args, int threads);
  // The 16-bit gate panels: each gate's rows packed on their own (recurrence.h), as the float
  // gate panels are.
  int64_t (*pair_gate_panels_size)(int64_t hidden_size, int64_t state_size);
  void (*pack_bfloat16_pair_gate_panels)(const BFloat16Bits* weight_hh, int64_t hidden_size, int64_t state_size,
                                         BFloat16Bits* panels, int threads);
  void (*pack_half_pair_gate_panels)(const HalfBits* weight_hh, int64_t hidden_size, int64_t state_size,
                                     HalfBits* panels, int threads);
  // Their backward, over weight_hh's 16-bit unit panels.
  void (*pack_bfloat16_pair_unit_panels)(const BFloat16Bits* weight, int64_t rows, int64_t units, BFloat16Bits* panels,
                                         int threads);
  void (*pack_half_pair_unit_panels)(const HalfBits* weight, int64_t rows, int64_t units, HalfBits* panels,
                                     int threads);
  void (*bfloat16_sequence_backward)(const small_batch::SequenceBackwardOf<BFloat16Bits>& args, int threads,
                                     bool native_bfloat16);
  void (*half_sequence_backward)(const small_batch::SequenceBackwardOf<HalfBits>& args, int threads);
};

// The table in use (capability.cpp).
const Kernels& kernels();

// Whether the avx512 table's bfloat16 products run on AMX's tiles (bfloat16_products.cpp): where
// the CPU has AMX-BF16, unless the tests turned it off (capability.cpp).
bool bfloat16_tiles();

#if defined(CPU_CAPABILITY)
namespace CPU_CAPABILITY {
// This compile's table (small_batch.cpp).
extern const Kernels table;

// cell_units.cpp of this compile.
extern const PointwiseUnits<float> float_units;
extern const PointwiseUnits<BFloat16Bits> bfloat16_units;
extern const PointwiseUnits<HalfBits> half_units;

// regularised_units.cpp of this compile.
RegularisedActivationsFn regularised_activations;
TanhUnitsFn tanh_units;
NormaliseRowFn normalise_row;
LayerNormBackwardRowFn layer_norm_backward_row;

// small_batch.cpp of this compile: out[b, c] (+)= sum over k < reduction of x_b[k] w[k, c] for
// batch rows x[0 .. batch) and the `columns` columns whose panels (pack_*_panels' layout) start at
// `panels`; out rows out_stride apart. The regularised sequence's products use it too.
void panel_products(const float* const* x, int64_t batch, int64_t reduction, const float* panels, int64_t columns,
                    float* out, int64_t out_stride, bool accumulate);

// regularised_sequence.cpp of this compile.
void regularised_sequence_forward(const regularised::SequenceForward& args, int threads);
void regularised_sequence_backward(const regularised::SequenceBackward& args, int threads);
#if defined(CPU_CAPABILITY_AVX512)
// bfloat16_products.cpp of this compile: pair_products.h's products on AVX512-BF16 (only where the
// CPU has it).
void native_bfloat16_products(const BFloat16Bits* const* rows, int64_t batch, int64_t reduction,
                              const BFloat16Bits* panels, int64_t columns, BFloat16Bits* out, int64_t out_stride,
                              bool accumulate, std::byte* scratch);
#endif
}  // namespace CPU_CAPABILITY
#endif

}  // namespace cpu
}  // namespace lstm_fused
