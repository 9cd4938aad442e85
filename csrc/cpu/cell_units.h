// The CPU pointwise loops over one row segment of hidden units, written once over a "lanes"
// policy: Scalar (one unit at a time, any dtype) here, and the float vector of each instruction
// set in kernels/ (VecLanes, vec.h). Both apply the same lstm_cell_math.h formulas.
#pragma once

#include <cstdint>

#include "../lstm_cell_math.h"

namespace lstm_fused {
namespace cpu {

// bfloat16 and float16 by their bits: layout-compatible with c10::BFloat16 and c10::Half, which the
// per-instruction-set kernels may not include (kernels/vec.h says why).
struct BFloat16Bits {
  uint16_t bits;
};
struct HalfBits {
  uint16_t bits;
};

// Pointers to one row segment of each gate's quarter of a [batch, 4 * hidden] buffer.
template <typename T>
struct GateRows {
  T* input;
  T* forget;
  T* cell;
  T* output;
};

template <typename T>
GateRows<T> gate_rows(T* row, int64_t hidden_size) {
  if (row == nullptr) {
    return {nullptr, nullptr, nullptr, nullptr};
  }
  return {row, row + hidden_size, row + 2 * hidden_size, row + 3 * hidden_size};
}

// Storage type scalar_t, computed one unit at a time in compute_t (float for half/bfloat16).
template <typename scalar_t, typename compute_t>
struct ScalarLanes {
  using storage = scalar_t;
  using value = compute_t;
  static constexpr int64_t width = 1;
  static value load(const storage* p) { return value(*p); }
  static void store(storage* p, value v) { *p = storage(v); }
};

template <typename Lanes>
math::Gates<typename Lanes::value> load_gates(GateRows<const typename Lanes::storage> rows, int64_t j) {
  return {Lanes::load(rows.input + j), Lanes::load(rows.forget + j), Lanes::load(rows.cell + j), Lanes::load(rows.output + j)};
}

template <typename Lanes>
void store_gates(GateRows<typename Lanes::storage> rows, int64_t j, const math::Gates<typename Lanes::value>& g) {
  Lanes::store(rows.input + j, g.input);
  Lanes::store(rows.forget + j, g.forget);
  Lanes::store(rows.cell + j, g.cell);
  Lanes::store(rows.output + j, g.output);
}

template <typename T>
GateRows<const T> as_const(GateRows<T> rows) {
  return {rows.input, rows.forget, rows.cell, rows.output};
}

// Adds the bias, activates the gates in place (the buffer becomes what backward reads) and
// writes the new states, for units [first, end) in steps of Lanes::width. Returns the first
// unit it left for a narrower policy to finish.
template <typename Lanes, bool kHasBias, bool kStoresGates = true>
int64_t forward_units(
    GateRows<typename Lanes::storage> gates,
    GateRows<const typename Lanes::storage> bias,
    const typename Lanes::storage* cell_prev,
    typename Lanes::storage* cell_next,
    typename Lanes::storage* hidden_next,
    int64_t first,
    int64_t end) {
  using value = typename Lanes::value;
  int64_t j = first;
  for (; j + Lanes::width <= end; j += Lanes::width) {
    math::Gates<value> preactivation = load_gates<Lanes>(as_const(gates), j);
    if constexpr (kHasBias) {
      const math::Gates<value> b = load_gates<Lanes>(bias, j);
      preactivation = {
          preactivation.input + b.input,
          preactivation.forget + b.forget,
          preactivation.cell + b.cell,
          preactivation.output + b.output};
    }
    const auto step = math::cell_forward(preactivation, Lanes::load(cell_prev + j));
    if constexpr (kStoresGates) {
      store_gates<Lanes>(gates, j, step.gates);
    }
    Lanes::store(cell_next + j, step.cell_state);
    Lanes::store(hidden_next + j, step.hidden_state);
  }
  return j;
}

// Gradients of the gate pre-activations and of c0 for units [first, end). Which incoming
// gradients exist is a template parameter, so the loop has no per-element branch.
template <typename Lanes, bool kHasGradHidden, bool kHasGradCell, bool kHasGradGates>
int64_t backward_units(
    GateRows<const typename Lanes::storage> gates,
    GateRows<const typename Lanes::storage> grad_gates,
    const typename Lanes::storage* cell_prev,
    const typename Lanes::storage* cell_next,
    const typename Lanes::storage* grad_hidden,
    const typename Lanes::storage* grad_cell,
    GateRows<typename Lanes::storage> grad_preactivation,
    typename Lanes::storage* grad_cell_prev,
    int64_t first,
    int64_t end) {
  using value = typename Lanes::value;
  int64_t j = first;
  for (; j + Lanes::width <= end; j += Lanes::width) {
    const auto grads = math::cell_backward(
        load_gates<Lanes>(gates, j),
        Lanes::load(cell_prev + j),
        Lanes::load(cell_next + j),
        kHasGradHidden ? Lanes::load(grad_hidden + j) : value(0),
        kHasGradCell ? Lanes::load(grad_cell + j) : value(0),
        kHasGradGates ? load_gates<Lanes>(grad_gates, j) : math::Gates<value>{value(0), value(0), value(0), value(0)});
    store_gates<Lanes>(grad_preactivation, j, grads.grad_preactivation);
    Lanes::store(grad_cell_prev + j, grads.grad_cell_state_prev);
  }
  return j;
}

// The backward loop for the incoming gradients that are present, chosen once per call.
template <typename Lanes>
using BackwardUnits = decltype(&backward_units<Lanes, false, false, false>);

template <typename Lanes>
BackwardUnits<Lanes> backward_units_for(bool has_grad_hidden, bool has_grad_cell, bool has_grad_gates) {
  static constexpr BackwardUnits<Lanes> variants[8] = {
      backward_units<Lanes, false, false, false>, backward_units<Lanes, false, false, true>,
      backward_units<Lanes, false, true, false>,  backward_units<Lanes, false, true, true>,
      backward_units<Lanes, true, false, false>,  backward_units<Lanes, true, false, true>,
      backward_units<Lanes, true, true, false>,   backward_units<Lanes, true, true, true>};
  return variants[(has_grad_hidden ? 4 : 0) + (has_grad_cell ? 2 : 0) + (has_grad_gates ? 1 : 0)];
}

}  // namespace cpu
}  // namespace lstm_fused
