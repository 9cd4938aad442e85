// The float pointwise loops of the library path (lstm_cell.cpp): cell_units.h's templates over
// Vec, whole vectors of units; the scalar loop finishes a row.
#include "kernels.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {

int64_t forward_units(
    bool has_bias,
    GateRows<float> gates,
    GateRows<const float> bias,
    const float* cell_prev,
    float* cell_next,
    float* hidden_next,
    int64_t first,
    int64_t end) {
  return has_bias ? cpu::forward_units<VecLanes, true>(gates, bias, cell_prev, cell_next, hidden_next, first, end)
                  : cpu::forward_units<VecLanes, false>(gates, bias, cell_prev, cell_next, hidden_next, first, end);
}

int64_t backward_units(
    GateRows<const float> gates,
    GateRows<const float> grad_gates,
    const float* cell_prev,
    const float* cell_next,
    const float* grad_hidden,
    const float* grad_cell,
    GateRows<float> grad_preactivation,
    float* grad_cell_prev,
    int64_t first,
    int64_t end) {
  const auto loop = backward_units_for<VecLanes>(grad_hidden != nullptr, grad_cell != nullptr, grad_gates.input != nullptr);
  return loop(gates, grad_gates, cell_prev, cell_next, grad_hidden, grad_cell, grad_preactivation, grad_cell_prev, first, end);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
