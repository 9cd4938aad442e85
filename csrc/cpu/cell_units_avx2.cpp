// The float pointwise loops, 8 units at a time with AVX2 and Sleef's vector exp/tanh (exported by
// libtorch_cpu, the library ATen's own vectorised math uses; exp 1-ulp, tanh 3.5-ulp). The AVX2 variants
// are called directly: Sleef's own dispatching entry point costs an indirect call per vector. Compiled for
// AVX2+FMA by the pragma; called only after have_avx2() said yes. This file includes no ATen or
// c10 header, so no shared inline function is ever compiled here with instructions another file
// could pick up on a CPU without them.
#pragma GCC target("avx2,fma")

#include "float8_avx2.h"

namespace lstm_fused {
namespace cpu {

bool have_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

int64_t forward_units_avx2(
    bool has_bias,
    GateRows<float> gates,
    GateRows<const float> bias,
    const float* cell_prev,
    float* cell_next,
    float* hidden_next,
    int64_t first,
    int64_t end) {
  if (!have_avx2()) {
    return first;
  }
  return has_bias ? forward_units<Float8Lanes, true>(gates, bias, cell_prev, cell_next, hidden_next, first, end)
                  : forward_units<Float8Lanes, false>(gates, bias, cell_prev, cell_next, hidden_next, first, end);
}

int64_t backward_units_avx2(
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
  if (!have_avx2()) {
    return first;
  }
  const auto loop = backward_units_for<Float8Lanes>(grad_hidden != nullptr, grad_cell != nullptr, grad_gates.input != nullptr);
  return loop(gates, grad_gates, cell_prev, cell_next, grad_hidden, grad_cell, grad_preactivation, grad_cell_prev, first, end);
}

}  // namespace cpu
}  // namespace lstm_fused
