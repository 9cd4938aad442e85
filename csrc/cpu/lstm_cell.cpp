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

  // Both products accumulate into one [batch, 4 * hidden] buffer that starts as the bias:
  // no per-gate products, no chunk or cat copies, biases added once.
  at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
  if (auto bias = combined_bias(bias_ih, bias_hh)) {
    at::addmm_out(gates, *bias, input, weight_ih.t());
  } else {
    at::mm_out(gates, input, weight_ih.t());
  }
  gates.addmm_(hx, weight_hh.t());

  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  const at::Tensor cx_contiguous = cx.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_cell_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    const scalar_t* cx_data = cx_contiguous.const_data_ptr<scalar_t>();
    scalar_t* hy_data = hy.data_ptr<scalar_t>();
    scalar_t* cy_data = cy.data_ptr<scalar_t>();
    for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
      // The activated gates overwrite their pre-activations: the buffer becomes the saved state.
      scalar_t* gate_row = gates_data + row * 4 * hidden_size;
      const int64_t state_offset = row * hidden_size;
      for (int64_t j = first; j < last; ++j) {
        const math::Gates<opmath_t> preactivation{
            opmath_t(gate_row[j]),
            opmath_t(gate_row[hidden_size + j]),
            opmath_t(gate_row[2 * hidden_size + j]),
            opmath_t(gate_row[3 * hidden_size + j])};
        const auto step = math::cell_forward(preactivation, opmath_t(cx_data[state_offset + j]));
        gate_row[j] = step.gates.input;
        gate_row[hidden_size + j] = step.gates.forget;
        gate_row[2 * hidden_size + j] = step.gates.cell;
        gate_row[3 * hidden_size + j] = step.gates.output;
        cy_data[state_offset + j] = step.cell_state;
        hy_data[state_offset + j] = step.hidden_state;
      }
    });
  });
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
    const auto load_gates = [hidden_size](const scalar_t* row, int64_t j) {
      return math::Gates<opmath_t>{
          opmath_t(row[j]),
          opmath_t(row[hidden_size + j]),
          opmath_t(row[2 * hidden_size + j]),
          opmath_t(row[3 * hidden_size + j])};
    };
    for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
      const int64_t gate_offset = row * 4 * hidden_size;
      const int64_t state_offset = row * hidden_size;
      for (int64_t j = first; j < last; ++j) {
        const int64_t k = state_offset + j;
        const auto grads = math::cell_backward(
            load_gates(gates_data + gate_offset, j),
            opmath_t(cx_data[k]),
            opmath_t(cy_data[k]),
            grad_hy_data ? opmath_t(grad_hy_data[k]) : opmath_t(0),
            grad_cy_data ? opmath_t(grad_cy_data[k]) : opmath_t(0),
            grad_gates_data ? load_gates(grad_gates_data + gate_offset, j) : math::Gates<opmath_t>{0, 0, 0, 0});
        scalar_t* out = grad_pre_data + gate_offset;
        out[j] = grads.grad_preactivation.input;
        out[hidden_size + j] = grads.grad_preactivation.forget;
        out[2 * hidden_size + j] = grads.grad_preactivation.cell;
        out[3 * hidden_size + j] = grads.grad_preactivation.output;
        grad_cx_data[k] = grads.grad_cell_state_prev;
      }
    });
  });
  return {grad_preactivation, grad_cx};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("cell_forward", &cell_forward_cpu);
  m.impl("cell_gate_grads", &cell_gate_grads_cpu);
}

}  // namespace lstm_fused
