// CPU kernels of the LSTM cell: two BLAS products into one gate buffer, then one parallel
// pointwise pass that applies the cell math of lstm_cell_math.h in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "../lstm_cell_math.h"
#include "../ops.h"

namespace lstm_fused {
namespace {

// About 20 ns of transcendental math per hidden unit: chunks of this many units keep the
// threads' start-up cost (a few microseconds) small against their work.
constexpr int64_t kUnitsPerTask = 2048;

// Runs fn(row, first_unit, end_unit) over the batch x hidden grid, split across threads by
// units rather than rows, so one long row (batch 1, hidden 1024) still uses every core.
template <typename Fn>
void for_each_unit_range(int64_t batch, int64_t hidden_size, const Fn& fn) {
  at::parallel_for(0, batch * hidden_size, kUnitsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end;) {
      const int64_t row = unit / hidden_size;
      const int64_t first = unit - row * hidden_size;
      const int64_t last = std::min(hidden_size, first + (end - unit));
      fn(row, first, last);
      unit += last - first;
    }
  });
}

// Pointers to one row segment of each gate's quarter of a [batch, 4 * hidden] buffer.
template <typename scalar_t>
struct GateRows {
  scalar_t* input;
  scalar_t* forget;
  scalar_t* cell;
  scalar_t* output;
};

// The row-segment loops are plain functions over restrict pointers so that GCC vectorises them
// (inside the parallel lambdas it cannot prove the streams disjoint).
template <typename scalar_t, bool kHasBias>
void forward_units(
    GateRows<scalar_t> gates,
    GateRows<const scalar_t> bias,
    const scalar_t* __restrict cell_prev,
    scalar_t* __restrict cell_next,
    scalar_t* __restrict hidden_next,
    int64_t count) {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* __restrict input_gate = gates.input;
  scalar_t* __restrict forget_gate = gates.forget;
  scalar_t* __restrict cell_gate = gates.cell;
  scalar_t* __restrict output_gate = gates.output;
  const scalar_t* __restrict bias_i = bias.input;
  const scalar_t* __restrict bias_f = bias.forget;
  const scalar_t* __restrict bias_g = bias.cell;
  const scalar_t* __restrict bias_o = bias.output;
  for (int64_t j = 0; j < count; ++j) {
    math::Gates<opmath_t> preactivation{
        opmath_t(input_gate[j]), opmath_t(forget_gate[j]), opmath_t(cell_gate[j]), opmath_t(output_gate[j])};
    if constexpr (kHasBias) {
      preactivation.input += opmath_t(bias_i[j]);
      preactivation.forget += opmath_t(bias_f[j]);
      preactivation.cell += opmath_t(bias_g[j]);
      preactivation.output += opmath_t(bias_o[j]);
    }
    const auto step = math::cell_forward(preactivation, opmath_t(cell_prev[j]));
    // The activated gates overwrite their pre-activations: the buffer becomes the saved state.
    input_gate[j] = step.gates.input;
    forget_gate[j] = step.gates.forget;
    cell_gate[j] = step.gates.cell;
    output_gate[j] = step.gates.output;
    cell_next[j] = step.cell_state;
    hidden_next[j] = step.hidden_state;
  }
}

// Which incoming gradients exist is a template parameter, so the loop has no per-element branch.
template <typename scalar_t, bool kHasGradHidden, bool kHasGradCell, bool kHasGradGates>
void backward_units(
    GateRows<const scalar_t> gates,
    GateRows<const scalar_t> grad_gates,
    const scalar_t* __restrict cell_prev,
    const scalar_t* __restrict cell_next,
    const scalar_t* __restrict grad_hidden,
    const scalar_t* __restrict grad_cell,
    GateRows<scalar_t> grad_preactivation,
    scalar_t* __restrict grad_cell_prev,
    int64_t count) {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict gi = gates.input;
  const scalar_t* __restrict gf = gates.forget;
  const scalar_t* __restrict gg = gates.cell;
  const scalar_t* __restrict go = gates.output;
  const scalar_t* __restrict dgi = grad_gates.input;
  const scalar_t* __restrict dgf = grad_gates.forget;
  const scalar_t* __restrict dgg = grad_gates.cell;
  const scalar_t* __restrict dgo = grad_gates.output;
  scalar_t* __restrict out_i = grad_preactivation.input;
  scalar_t* __restrict out_f = grad_preactivation.forget;
  scalar_t* __restrict out_g = grad_preactivation.cell;
  scalar_t* __restrict out_o = grad_preactivation.output;
  for (int64_t j = 0; j < count; ++j) {
    const auto grads = math::cell_backward(
        math::Gates<opmath_t>{opmath_t(gi[j]), opmath_t(gf[j]), opmath_t(gg[j]), opmath_t(go[j])},
        opmath_t(cell_prev[j]),
        opmath_t(cell_next[j]),
        kHasGradHidden ? opmath_t(grad_hidden[j]) : opmath_t(0),
        kHasGradCell ? opmath_t(grad_cell[j]) : opmath_t(0),
        kHasGradGates ? math::Gates<opmath_t>{opmath_t(dgi[j]), opmath_t(dgf[j]), opmath_t(dgg[j]), opmath_t(dgo[j])}
                      : math::Gates<opmath_t>{0, 0, 0, 0});
    out_i[j] = grads.grad_preactivation.input;
    out_f[j] = grads.grad_preactivation.forget;
    out_g[j] = grads.grad_preactivation.cell;
    out_o[j] = grads.grad_preactivation.output;
    grad_cell_prev[j] = grads.grad_cell_state_prev;
  }
}

template <typename T>
GateRows<T> gate_rows(T* row, int64_t hidden_size) {
  if (row == nullptr) {
    return {nullptr, nullptr, nullptr, nullptr};
  }
  return {row, row + hidden_size, row + 2 * hidden_size, row + 3 * hidden_size};
}

void cell_pointwise_cpu(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy) {
  check_cell_pointwise_args(gates, cx, bias, hy, cy);
  const int64_t batch = gates.size(0);
  const int64_t hidden_size = gates.size(1) / 4;
  const at::Tensor cx_contiguous = cx.contiguous();
  const at::Tensor bias_contiguous = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_fused_cell_pointwise_cpu", [&] {
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    const scalar_t* bias_data = bias_contiguous.defined() ? bias_contiguous.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* cx_data = cx_contiguous.const_data_ptr<scalar_t>();
    scalar_t* hy_data = hy.data_ptr<scalar_t>();
    scalar_t* cy_data = cy.data_ptr<scalar_t>();
    const auto run = [&](auto kernel) {
      for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
        const int64_t offset = row * hidden_size + first;
        kernel(
            gate_rows(gates_data + row * 4 * hidden_size + first, hidden_size),
            gate_rows(bias_data ? bias_data + first : nullptr, hidden_size),
            cx_data + offset,
            cy_data + offset,
            hy_data + offset,
            last - first);
      });
    };
    if (bias_data) {
      run(forward_units<scalar_t, true>);
    } else {
      run(forward_units<scalar_t, false>);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward_cpu(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t batch = input.size(0);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();

  // Both products accumulate into one [batch, 4 * hidden] buffer: no per-gate products, no chunk
  // or cat copies. bias_ih rides on the first product; bias_hh is added in the pointwise pass.
  at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
  if (bias_ih.has_value()) {
    at::addmm_out(gates, *bias_ih, input, weight_ih.t());
  } else {
    at::mm_out(gates, input, weight_ih.t());
  }
  gates.addmm_(hx, weight_hh.t());

  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  cell_pointwise_cpu(gates, cx, bias_hh, hy, cy);
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor> cell_gate_grads_cpu(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  check_cell_gate_grads_args(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const int64_t batch = cx.size(0);
  const int64_t hidden_size = cx.size(1);
  const auto options = cx.options();
  at::Tensor grad_preactivation = new_output({batch, 4 * hidden_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);

  // Gradients autograd leaves out (an output that was not used) read as zero.
  const auto contiguous_or_undefined = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->contiguous() : at::Tensor();
  };
  const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
  const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
  const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor cy_c = cy.contiguous();
  const at::Tensor gates_c = gates.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_fused_cell_gate_grads_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto data_or_null = [](const at::Tensor& t) -> const scalar_t* {
      return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
    };
    const scalar_t* grad_hy_data = data_or_null(grad_hy_c);
    const scalar_t* grad_cy_data = data_or_null(grad_cy_c);
    const scalar_t* grad_gates_data = data_or_null(grad_gates_c);
    const scalar_t* cx_data = cx_c.const_data_ptr<scalar_t>();
    const scalar_t* cy_data = cy_c.const_data_ptr<scalar_t>();
    const scalar_t* gates_data = gates_c.const_data_ptr<scalar_t>();
    scalar_t* grad_pre_data = grad_preactivation.data_ptr<scalar_t>();
    scalar_t* grad_cx_data = grad_cx.data_ptr<scalar_t>();
    const auto run = [&](auto kernel) {
      for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
        const int64_t gate_offset = row * 4 * hidden_size + first;
        const int64_t offset = row * hidden_size + first;
        const auto shifted = [](const scalar_t* data, int64_t by) { return data ? data + by : nullptr; };
        kernel(
            gate_rows(gates_data + gate_offset, hidden_size),
            gate_rows(shifted(grad_gates_data, gate_offset), hidden_size),
            cx_data + offset,
            cy_data + offset,
            shifted(grad_hy_data, offset),
            shifted(grad_cy_data, offset),
            gate_rows(grad_pre_data + gate_offset, hidden_size),
            grad_cx_data + offset,
            last - first);
      });
    };
    const int variant = (grad_hy_data ? 4 : 0) + (grad_cy_data ? 2 : 0) + (grad_gates_data ? 1 : 0);
    switch (variant) {
      case 0: run(backward_units<scalar_t, false, false, false>); break;
      case 1: run(backward_units<scalar_t, false, false, true>); break;
      case 2: run(backward_units<scalar_t, false, true, false>); break;
      case 3: run(backward_units<scalar_t, false, true, true>); break;
      case 4: run(backward_units<scalar_t, true, false, false>); break;
      case 5: run(backward_units<scalar_t, true, false, true>); break;
      case 6: run(backward_units<scalar_t, true, true, false>); break;
      default: run(backward_units<scalar_t, true, true, true>); break;
    }
  });
  return {grad_preactivation, grad_cx};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("cell_forward", &cell_forward_cpu);
  m.impl("cell_pointwise_", &cell_pointwise_cpu);
  m.impl("cell_gate_grads", &cell_gate_grads_cpu);
}

}  // namespace lstm_fused
