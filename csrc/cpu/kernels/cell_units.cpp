// The pointwise loops of the library path (lstm_cell.cpp): cell_units.h's templates over Vec,
// whole vectors of units, for each storage dtype; the scalar loop finishes a row. bfloat16 and
// float16 are widened to float vectors on load and rounded to nearest even on store, so their
// math runs in float32 as the scalar loop's does.
#include <type_traits>

#include "kernels.h"
#include "vec.h"

namespace lstm_fused {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
int64_t forward_units(
    bool has_bias,
    GateRows<T> gates,
    GateRows<const T> bias,
    const T* cell_prev,
    T* cell_next,
    T* hidden_next,
    int64_t first,
    int64_t end) {
  return has_bias ? cpu::forward_units<VecLanesOf<T>, true>(gates, bias, cell_prev, cell_next, hidden_next, first, end)
                  : cpu::forward_units<VecLanesOf<T>, false>(gates, bias, cell_prev, cell_next, hidden_next, first, end);
}

template <typename T>
int64_t backward_units(
    GateRows<const T> gates,
    GateRows<const T> grad_gates,
    const T* cell_prev,
    const T* cell_next,
    const T* grad_hidden,
    const T* grad_cell,
    GateRows<T> grad_preactivation,
    T* grad_cell_prev,
    int64_t first,
    int64_t end) {
  const auto loop =
      backward_units_for<VecLanesOf<T>>(grad_hidden != nullptr, grad_cell != nullptr, grad_gates.input != nullptr);
  return loop(gates, grad_gates, cell_prev, cell_next, grad_hidden, grad_cell, grad_preactivation, grad_cell_prev, first, end);
}

template <typename T>
constexpr PointwiseUnits<T> units_of() {
  if constexpr (kConvertsReducedFloats || std::is_same_v<T, float>) {
    return {forward_units<T>, backward_units<T>};
  } else {
    return {nullptr, nullptr};
  }
}

}  // namespace

constinit const PointwiseUnits<float> float_units = units_of<float>();
constinit const PointwiseUnits<BFloat16Bits> bfloat16_units = units_of<BFloat16Bits>();
constinit const PointwiseUnits<HalfBits> half_units = units_of<HalfBits>();

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace lstm_fused
