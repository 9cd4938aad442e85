// CPU kernels of the LSTM cell. Float32 at batch <= 16: small_batch.h's fused loops, no library
// call. Otherwise: two library products into one gate buffer, then one parallel
// pointwise pass (cell_units.h) that applies the cell math of lstm_cell_math.h in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <type_traits>

#include "../matmul.h"
#include "../ops.h"
#include "cell_units.h"
#include "kernels/kernels.h"
#include "small_batch.h"

namespace lstm_fused {
namespace {

using cpu::gate_rows;
using cpu::GateRows;
namespace small_batch = cpu::small_batch;

// input as the cell ops' checks left it: 2-D.
bool takes_small_batch_path(const at::Tensor& input) {
  return input.scalar_type() == at::kFloat && small_batch::handles_cell(input.size(0));
}

// The threads a cell step's products are worth, forward or backward (the same multiply-adds).
int small_batch_threads(int64_t batch, int64_t input_size, int64_t hidden_size) {
  return small_batch::threads_for(batch * 4 * hidden_size * (input_size + hidden_size), at::get_num_threads());
}

// A few ns of transcendental math per hidden unit: chunks of this many units keep the threads'
// start-up cost (a few microseconds) small against their work.
constexpr int64_t kUnitsPerTask = 4096;

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

// The vector loops of this CPU's kernel table for a dtype, over the storage type the kernels name
// it by (c10's types cannot appear there); float64 has none and leaves every unit to the scalar loop.
template <typename scalar_t>
struct VectorUnits {
  using storage = void;
};
template <>
struct VectorUnits<float> {
  using storage = float;
  static const cpu::PointwiseUnits<float>* of(const cpu::Kernels& k) { return k.float_units; }
};
template <>
struct VectorUnits<c10::BFloat16> {
  using storage = cpu::BFloat16Bits;
  static const cpu::PointwiseUnits<storage>* of(const cpu::Kernels& k) { return k.bfloat16_units; }
};
template <>
struct VectorUnits<c10::Half> {
  using storage = cpu::HalfBits;
  static const cpu::PointwiseUnits<storage>* of(const cpu::Kernels& k) { return k.half_units; }
};
static_assert(sizeof(c10::BFloat16) == sizeof(cpu::BFloat16Bits) && sizeof(c10::Half) == sizeof(cpu::HalfBits));

template <typename T, typename scalar_t>
T* as_storage(scalar_t* p) {
  return reinterpret_cast<T*>(p);
}
template <typename T, typename scalar_t>
const T* as_storage(const scalar_t* p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T, typename scalar_t>
GateRows<T> as_storage(GateRows<scalar_t> rows) {
  return {as_storage<T>(rows.input), as_storage<T>(rows.forget), as_storage<T>(rows.cell), as_storage<T>(rows.output)};
}
template <typename T, typename scalar_t>
GateRows<const T> as_storage(GateRows<const scalar_t> rows) {
  return {as_storage<T>(rows.input), as_storage<T>(rows.forget), as_storage<T>(rows.cell), as_storage<T>(rows.output)};
}

// Runs the vector forward loop where the table has one for scalar_t; returns the first unit left.
template <typename scalar_t>
int64_t forward_units_vectorized(
    GateRows<scalar_t> gates,
    GateRows<const scalar_t> bias,
    const scalar_t* cell_prev,
    scalar_t* cell_next,
    scalar_t* hidden_next,
    int64_t first,
    int64_t end) {
  using T = typename VectorUnits<scalar_t>::storage;
  if constexpr (std::is_void_v<T>) {
    return first;
  } else {
    const auto* units = VectorUnits<scalar_t>::of(cpu::kernels());
    if (units->forward == nullptr) {
      return first;
    }
    return units->forward(bias.input != nullptr, as_storage<T>(gates), as_storage<T>(bias), as_storage<T>(cell_prev),
                          as_storage<T>(cell_next), as_storage<T>(hidden_next), first, end);
  }
}

template <typename scalar_t>
int64_t backward_units_vectorized(
    GateRows<const scalar_t> gates,
    GateRows<const scalar_t> grad_gates,
    const scalar_t* cell_prev,
    const scalar_t* cell_next,
    const scalar_t* grad_hidden,
    const scalar_t* grad_cell,
    GateRows<scalar_t> grad_preactivation,
    scalar_t* grad_cell_prev,
    int64_t first,
    int64_t end) {
  using T = typename VectorUnits<scalar_t>::storage;
  if constexpr (std::is_void_v<T>) {
    return first;
  } else {
    const auto* units = VectorUnits<scalar_t>::of(cpu::kernels());
    if (units->backward == nullptr) {
      return first;
    }
    return units->backward(as_storage<T>(gates), as_storage<T>(grad_gates), as_storage<T>(cell_prev),
                           as_storage<T>(cell_next), as_storage<T>(grad_hidden), as_storage<T>(grad_cell),
                           as_storage<T>(grad_preactivation), as_storage<T>(grad_cell_prev), first, end);
  }
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
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_fused_cell_pointwise_cpu", [&] {
    scalar_t* gates_data = gates.data_ptr<scalar_t>();
    const scalar_t* bias_data = data_or_null<scalar_t>(bias_contiguous);
    const scalar_t* cx_data = cx_contiguous.const_data_ptr<scalar_t>();
    scalar_t* hy_data = hy.data_ptr<scalar_t>();
    scalar_t* cy_data = cy.data_ptr<scalar_t>();
    using Lanes = cpu::ScalarLanes<scalar_t, at::opmath_type<scalar_t>>;
    for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
      const GateRows<scalar_t> gates_row = gate_rows(gates_data + row * 4 * hidden_size, hidden_size);
      const GateRows<const scalar_t> bias_row = gate_rows(bias_data, hidden_size);
      const scalar_t* cx_row = cx_data + row * hidden_size;
      scalar_t* cy_row = cy_data + row * hidden_size;
      scalar_t* hy_row = hy_data + row * hidden_size;
      const int64_t done = forward_units_vectorized(gates_row, bias_row, cx_row, cy_row, hy_row, first, last);
      if (bias_data) {
        cpu::forward_units<Lanes, true>(gates_row, bias_row, cx_row, cy_row, hy_row, done, last);
      } else {
        cpu::forward_units<Lanes, false>(gates_row, bias_row, cx_row, cy_row, hy_row, done, last);
      }
    });
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
  const int64_t input_size = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();

  if (takes_small_batch_path(input)) {
    const at::Tensor input_c = input.contiguous(), hx_c = hx.contiguous(), cx_c = cx.contiguous();
    const at::Tensor weight_ih_c = weight_ih.contiguous(), weight_hh_c = weight_hh.contiguous();
    const at::Tensor bias_ih_c = contiguous_or_undefined(bias_ih), bias_hh_c = contiguous_or_undefined(bias_hh);
    at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
    at::Tensor hy = new_output({batch, hidden_size}, options);
    at::Tensor cy = new_output({batch, hidden_size}, options);
    small_batch::cell_forward(
        {batch, input_size, hidden_size, input_c.const_data_ptr<float>(), hx_c.const_data_ptr<float>(),
         cx_c.const_data_ptr<float>(), weight_ih_c.const_data_ptr<float>(), weight_hh_c.const_data_ptr<float>(),
         data_or_null<float>(bias_ih_c), data_or_null<float>(bias_hh_c), gates.mutable_data_ptr<float>(),
         hy.mutable_data_ptr<float>(), cy.mutable_data_ptr<float>()},
        small_batch_threads(batch, input_size, hidden_size));
    return {hy, cy, gates};
  }

  // Both products accumulate into one [batch, 4 * hidden] buffer: no per-gate products, no chunk
  // or cat copies. bias_ih rides on the first product; bias_hh is added in the pointwise pass.
  // matmul.h picks the library (oneDNN or BLAS) for each product's size.
  at::Tensor gates = linear_product(input, weight_ih, bias_ih);
  linear_product_into(gates, hx, weight_hh, /*accumulate=*/true);

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
  const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
  const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
  const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor cy_c = cy.contiguous();
  const at::Tensor gates_c = gates.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_fused_cell_gate_grads_cpu", [&] {
    const scalar_t* grad_hy_data = data_or_null<scalar_t>(grad_hy_c);
    const scalar_t* grad_cy_data = data_or_null<scalar_t>(grad_cy_c);
    const scalar_t* grad_gates_data = data_or_null<scalar_t>(grad_gates_c);
    const scalar_t* cx_data = cx_c.const_data_ptr<scalar_t>();
    const scalar_t* cy_data = cy_c.const_data_ptr<scalar_t>();
    const scalar_t* gates_data = gates_c.const_data_ptr<scalar_t>();
    scalar_t* grad_pre_data = grad_preactivation.data_ptr<scalar_t>();
    scalar_t* grad_cx_data = grad_cx.data_ptr<scalar_t>();
    using Lanes = cpu::ScalarLanes<scalar_t, at::opmath_type<scalar_t>>;
    const auto scalar_loop = cpu::backward_units_for<Lanes>(
        grad_hy_data != nullptr, grad_cy_data != nullptr, grad_gates_data != nullptr);
    for_each_unit_range(batch, hidden_size, [&](int64_t row, int64_t first, int64_t last) {
      const int64_t gate_offset = row * 4 * hidden_size;
      const int64_t offset = row * hidden_size;
      const auto shifted = [](const scalar_t* data, int64_t by) { return data ? data + by : nullptr; };
      const GateRows<const scalar_t> gates_row = gate_rows(gates_data + gate_offset, hidden_size);
      const GateRows<const scalar_t> grad_gates_row = gate_rows(shifted(grad_gates_data, gate_offset), hidden_size);
      const GateRows<scalar_t> grad_pre_row = gate_rows(grad_pre_data + gate_offset, hidden_size);
      const int64_t done = backward_units_vectorized(
          gates_row, grad_gates_row, cx_data + offset, cy_data + offset, shifted(grad_hy_data, offset),
          shifted(grad_cy_data, offset), grad_pre_row, grad_cx_data + offset, first, last);
      scalar_loop(
          gates_row, grad_gates_row, cx_data + offset, cy_data + offset, shifted(grad_hy_data, offset),
          shifted(grad_cy_data, offset), grad_pre_row, grad_cx_data + offset, done, last);
    });
  });
  return {grad_preactivation, grad_cx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_backward_cpu(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    std::array<bool, 6> output_mask) {
  // The composite checks its arguments itself; the path's test reads only input's dtype and size(0).
  if (input.dim() != 2 || !takes_small_batch_path(input)) {
    return cell_backward_composite(
        grad_hy, grad_cy, grad_gates, input, hx, cx, cy, gates, weight_ih, weight_hh, output_mask);
  }
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, std::nullopt, std::nullopt);
  auto [grad_preactivation, grad_cx] = cell_gate_grads_cpu(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const int64_t batch = input.size(0);
  const int64_t input_size = input.size(1);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();
  const auto output_if = [&](bool wanted, std::initializer_list<int64_t> sizes) {
    return wanted ? new_output(sizes, options) : at::Tensor();
  };
  at::Tensor grad_input = output_if(output_mask[0], {batch, input_size});
  at::Tensor grad_hx = output_if(output_mask[1], {batch, hidden_size});
  at::Tensor grad_weight_ih = output_if(output_mask[3], {4 * hidden_size, input_size});
  at::Tensor grad_weight_hh = output_if(output_mask[4], {4 * hidden_size, hidden_size});
  at::Tensor grad_bias = output_if(output_mask[5], {4 * hidden_size});
  const at::Tensor input_c = input.contiguous(), hx_c = hx.contiguous();
  const at::Tensor weight_ih_c = weight_ih.contiguous(), weight_hh_c = weight_hh.contiguous();
  small_batch::cell_backward_products(
      {batch, input_size, hidden_size, grad_preactivation.const_data_ptr<float>(), input_c.const_data_ptr<float>(),
       hx_c.const_data_ptr<float>(), weight_ih_c.const_data_ptr<float>(), weight_hh_c.const_data_ptr<float>(),
       mutable_data_or_null<float>(grad_input), mutable_data_or_null<float>(grad_hx),
       mutable_data_or_null<float>(grad_weight_ih), mutable_data_or_null<float>(grad_weight_hh),
       mutable_data_or_null<float>(grad_bias)},
      small_batch_threads(batch, input_size, hidden_size));
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, options); };
  return {or_empty(grad_input), or_empty(grad_hx), output_mask[2] ? grad_cx : at::empty({0}, options),
          or_empty(grad_weight_ih), or_empty(grad_weight_hh), or_empty(grad_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CPU, m) {
  m.impl("cell_forward", &cell_forward_cpu);
  m.impl("cell_pointwise_", &cell_pointwise_cpu);
  m.impl("cell_gate_grads", &cell_gate_grads_cpu);
  m.impl("cell_backward", &cell_backward_cpu);
}

}  // namespace lstm_fused
