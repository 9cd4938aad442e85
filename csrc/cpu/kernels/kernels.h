// The table of the kernels that are compiled once per instruction set (every .cpp in this folder),
// and its entries. capability.cpp picks one table at run time; everything else calls through it.
#pragma once

#include <cstdint>

#include "../cell_units.h"
#include "../small_batch.h"

namespace lstm_fused {
namespace cpu {

// The float pointwise loops of cell_units.h over whole vectors of units [first, end): they return
// the first unit they left for the scalar loop.
using ForwardUnitsFn = int64_t(
    bool has_bias,
    GateRows<float> gates,
    GateRows<const float> bias,
    const float* cell_prev,
    float* cell_next,
    float* hidden_next,
    int64_t first,
    int64_t end);
using BackwardUnitsFn = int64_t(
    GateRows<const float> gates,
    GateRows<const float> grad_gates,
    const float* cell_prev,
    const float* cell_next,
    const float* grad_hidden,
    const float* grad_cell,
    GateRows<float> grad_preactivation,
    float* grad_cell_prev,
    int64_t first,
    int64_t end);

struct Kernels {
  const char* name;  // "default", "avx2", "avx512", "neon": what lstm_fused.cpu_capability() says

  // small_batch.h's entries, for this instruction set's vector width.
  int64_t (*gate_panels_size)(int64_t hidden_size, int64_t state_size);
  int64_t (*row_panels_size)(int64_t rows, int64_t reduction);
  int64_t (*unit_panels_size)(int64_t rows, int64_t units);
  void (*pack_gate_panels)(const float* weight_hh, int64_t hidden_size, int64_t state_size, float* panels);
  void (*pack_row_panels)(const float* weight, int64_t rows, int64_t reduction, float* panels);
  void (*pack_unit_panels)(const float* weight, int64_t rows, int64_t units, float* panels);
  void (*cell_forward)(const small_batch::CellForward& args, int threads);
  void (*cell_backward_products)(const small_batch::CellBackwardProducts& args, int threads);
  void (*sequence_forward)(const small_batch::SequenceForward& args, int threads);
  void (*sequence_backward)(const small_batch::SequenceBackward& args, int threads);

  // The float pointwise loops of cell_units.h over whole vectors of units.
  ForwardUnitsFn* forward_units;
  BackwardUnitsFn* backward_units;
};

// The table in use (capability.cpp).
const Kernels& kernels();

#if defined(CPU_CAPABILITY)
namespace CPU_CAPABILITY {
// This compile's table (small_batch.cpp).
extern const Kernels table;

// cell_units.cpp of this compile.
ForwardUnitsFn forward_units;
BackwardUnitsFn backward_units;
}  // namespace CPU_CAPABILITY
#endif

}  // namespace cpu
}  // namespace lstm_fused
