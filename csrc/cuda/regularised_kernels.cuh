// Device code of the regularised LSTM step (issue 16: layer normalisation, zoneout), the CUDA
// kernels of the ops regularised_pointwise_ and regularised_gate_grads_ (schemas and the sequence
// loop: csrc/regularised.cpp; the CPU's kernels: csrc/cpu/regularised_cell.cpp, whose outputs these
// reproduce). Compiled by nvcc (csrc/cuda/regularised.cu) and for the host against the tests'
// emulation (tests/emulated_cuda/emulated_ops.cpp), as cell_kernels.cuh is, whose launch macros and
// helpers this header uses.
//
// Layer norm normalises each row over its 4H pre-activations (twice: the input's and the recurrent
// product) and over its H values of c-tilde, so a batch row is the unit of work: a block holds
// blockDim.y rows, blockDim.x threads (whole warps) a row, and the row's sums are a block
// reduction (warp shuffles, then one shared slot per warp). Thread x of a row owns units x,
// x + blockDim.x, ... in every pass, and all four gates of each, so the only exchange between
// threads is the reductions. Means and variances are two-pass, as the CPU's. Compute in
// at::opmath_type (float for float/half/bfloat16 storage, double for double); indices 64-bit.
// Values kept between passes go through the op's own outputs (c-tilde through cy, the activated
// gates, the gradients) in the storage type, as the CPU kernels keep them.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "../regularised_cell_math.h"
#include "cell_kernels.cuh"

namespace lstm_fused {
namespace cuda {

constexpr int kRegularisedThreads = 256;
constexpr int kRegularisedWarps = kRegularisedThreads / kWarpSize;
// Grid-stride over row groups past this many blocks.
constexpr int64_t kRegularisedMaxBlocks = 65535;

struct RegularisedLaunch {
  dim3 grid;
  dim3 block;
};

// Whole warps per row, as few as cover the row's units (up to 256 threads); the rest of the 256
// threads take more rows, so a block of a small hidden size is not mostly idle.
inline RegularisedLaunch regularised_launch(int64_t batch, int64_t hidden_size) {
  const int threads_x =
      static_cast<int>(std::min<int64_t>(kRegularisedThreads, ceil_div(hidden_size, kWarpSize) * kWarpSize));
  const int rows = static_cast<int>(std::min<int64_t>(kRegularisedThreads / threads_x, batch));
  const int64_t blocks = std::min<int64_t>(ceil_div(batch, rows), kRegularisedMaxBlocks);
  return {dim3(static_cast<unsigned int>(blocks)),
          dim3(static_cast<unsigned int>(threads_x), static_cast<unsigned int>(rows))};
}

// Sums each of v[0..N) over the threads of this thread's row (threadIdx.y); every thread of the row
// gets the same sums. Every thread of the block must call it (it holds barriers), active row or
// not. partial: kRegularisedWarps x N shared slots.
template <int N, typename T>
__device__ __forceinline__ void row_sums(T (&v)[N], T (*partial)[4]) {
  static_assert(N <= 4, "four shared slots a warp");
  for (int n = 0; n < N; ++n) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v[n] += __shfl_xor_sync(0xffffffffu, v[n], offset);
    }
  }
  const int warps_per_row = static_cast<int>(blockDim.x) / kWarpSize;
  if (warps_per_row == 1) {
    return;
  }
  const int first_warp = static_cast<int>(threadIdx.y) * warps_per_row;
  if (threadIdx.x % kWarpSize == 0) {
    for (int n = 0; n < N; ++n) {
      partial[first_warp + threadIdx.x / kWarpSize][n] = v[n];
    }
  }
  __syncthreads();
  for (int n = 0; n < N; ++n) {
    T sum = T(0);
    for (int w = 0; w < warps_per_row; ++w) {
      sum += partial[first_warp + w][n];
    }
    v[n] = sum;
  }
  __syncthreads();  // before the slots are written again
}

// regularised_pointwise_'s tensors as the kernel reads them: rows dense, absent ones null.
template <typename scalar_t>
struct RegularisedForwardPointers {
  scalar_t* input_part;   // [B, 4H]: x W_ih^T in, LN of it out (layer norm)
  scalar_t* hidden_part;  // [B, 4H]: h-bar W_hh^T in, LN of it out (layer norm)
  const scalar_t* bias;   // [4H]
  const scalar_t* layer_norm_ih;  // [4H]; null without layer norm (then so are the next three)
  const scalar_t* layer_norm_hh;
  const scalar_t* layer_norm_cell_weight;  // [H]
  const scalar_t* layer_norm_cell_bias;    // [H]
  const scalar_t* hx;                      // [B, H]
  const scalar_t* cx;                      // [B, H]
  const scalar_t* zoneout_cell_mask;       // [B, H]; null: the probability weighs the old state
  const scalar_t* zoneout_hidden_mask;
  scalar_t* gates;            // [B, 4H] activated
  scalar_t* hy;               // [B, H]
  scalar_t* cy;               // [B, H]
  scalar_t* normalized_cell;  // [B, H] LN(c-tilde) before its scale and shift (layer norm)
  scalar_t* layer_norm_rstd;  // [B, 3]: 1 / std of input_part, hidden_part, c-tilde (layer norm)
};

template <typename scalar_t, bool kLayerNorm>
__global__ void __launch_bounds__(kRegularisedThreads) regularised_pointwise_kernel(
    RegularisedForwardPointers<scalar_t> p, int64_t batch, int64_t hidden_size, double zoneout_cell,
    double zoneout_hidden) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t partial[kRegularisedWarps][4];
  const int64_t H = hidden_size, width = 4 * hidden_size;
  const auto load = [](const scalar_t* data, int64_t index) { return static_cast<opmath_t>(data[index]); };
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * blockDim.y; first_row < batch;
       first_row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool active = row < batch;  // inactive threads still meet the reductions' barriers
    scalar_t* input_part = p.input_part + row * width;
    scalar_t* hidden_part = p.hidden_part + row * width;
    opmath_t mean_ih = 0, mean_hh = 0, rstd_ih = 0, rstd_hh = 0;
    if constexpr (kLayerNorm) {
      opmath_t sums[2] = {0, 0};
      for (int64_t k = threadIdx.x; active && k < width; k += blockDim.x) {
        sums[0] += load(input_part, k);
        sums[1] += load(hidden_part, k);
      }
      row_sums(sums, partial);
      mean_ih = sums[0] / opmath_t(width);
      mean_hh = sums[1] / opmath_t(width);
      opmath_t squares[2] = {0, 0};
      for (int64_t k = threadIdx.x; active && k < width; k += blockDim.x) {
        const opmath_t centred_ih = load(input_part, k) - mean_ih, centred_hh = load(hidden_part, k) - mean_hh;
        squares[0] += centred_ih * centred_ih;
        squares[1] += centred_hh * centred_hh;
      }
      row_sums(squares, partial);
      rstd_ih = math::layer_norm_rstd(squares[0], opmath_t(width));
      rstd_hh = math::layer_norm_rstd(squares[1], opmath_t(width));
      if (active && threadIdx.x == 0) {
        p.layer_norm_rstd[row * 3 + 0] = static_cast<scalar_t>(rstd_ih);
        p.layer_norm_rstd[row * 3 + 1] = static_cast<scalar_t>(rstd_hh);
      }
    }
    const opmath_t z_c = static_cast<opmath_t>(zoneout_cell), z_h = static_cast<opmath_t>(zoneout_hidden);
    // c_t and h_t through zoneout, from c-tilde and h-tilde.
    const auto store_states = [&](int64_t state, opmath_t c_prev, opmath_t cell_tilde, opmath_t h_new) {
      const opmath_t d_c = p.zoneout_cell_mask != nullptr ? load(p.zoneout_cell_mask, state) : z_c;
      const opmath_t d_h = p.zoneout_hidden_mask != nullptr ? load(p.zoneout_hidden_mask, state) : z_h;
      p.cy[state] = static_cast<scalar_t>(math::zoneout(d_c, c_prev, cell_tilde));
      p.hy[state] = static_cast<scalar_t>(math::zoneout(d_h, load(p.hx, state), h_new));
    };
    // Pass 1: pre-activations (normalised), gates, c-tilde; without layer norm, the new states.
    opmath_t cell_sum = 0;
    for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
      opmath_t preactivation[4];
      for (int gate = 0; gate < 4; ++gate) {
        const int64_t k = gate * H + j;
        opmath_t a;
        if constexpr (kLayerNorm) {
          const opmath_t x_hat = (load(input_part, k) - mean_ih) * rstd_ih;
          const opmath_t h_hat = (load(hidden_part, k) - mean_hh) * rstd_hh;
          input_part[k] = static_cast<scalar_t>(x_hat);
          hidden_part[k] = static_cast<scalar_t>(h_hat);
          a = load(p.layer_norm_ih, k) * x_hat + load(p.layer_norm_hh, k) * h_hat;
        } else {
          a = load(input_part, k) + load(hidden_part, k);
        }
        preactivation[gate] = a + (p.bias != nullptr ? load(p.bias, k) : opmath_t(0));
      }
      const int64_t state = row * H + j;
      const opmath_t c_prev = load(p.cx, state);
      const auto unit = math::regularised_activation(
          math::Gates<opmath_t>{preactivation[0], preactivation[1], preactivation[2], preactivation[3]}, c_prev);
      scalar_t* gates = p.gates + row * width;
      gates[j] = static_cast<scalar_t>(unit.gates.input);
      gates[H + j] = static_cast<scalar_t>(unit.gates.forget);
      gates[2 * H + j] = static_cast<scalar_t>(unit.gates.cell);
      gates[3 * H + j] = static_cast<scalar_t>(unit.gates.output);
      if constexpr (kLayerNorm) {
        p.cy[state] = static_cast<scalar_t>(unit.cell_tilde);  // until pass 2
        cell_sum += load(p.cy, state);
      } else {
        const opmath_t h_new = unit.gates.output * math::tanh_(unit.cell_tilde);
        store_states(state, c_prev, unit.cell_tilde, h_new);
      }
    }
    if constexpr (kLayerNorm) {
      // Pass 2: LN(c-tilde), h, zoneout.
      opmath_t sums[1] = {cell_sum};
      row_sums(sums, partial);
      const opmath_t mean_c = sums[0] / opmath_t(H);
      opmath_t squares[1] = {0};
      for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
        const opmath_t centred = load(p.cy, row * H + j) - mean_c;
        squares[0] += centred * centred;
      }
      row_sums(squares, partial);
      const opmath_t rstd_c = math::layer_norm_rstd(squares[0], opmath_t(H));
      if (active && threadIdx.x == 0) {
        p.layer_norm_rstd[row * 3 + 2] = static_cast<scalar_t>(rstd_c);
      }
      for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
        const int64_t state = row * H + j;
        const opmath_t cell_tilde = load(p.cy, state);
        const opmath_t n_hat = (cell_tilde - mean_c) * rstd_c;
        p.normalized_cell[state] = static_cast<scalar_t>(n_hat);
        const opmath_t tanh_n =
            math::tanh_(load(p.layer_norm_cell_weight, j) * n_hat + load(p.layer_norm_cell_bias, j));
        const opmath_t h_new = load(p.gates, row * width + 3 * H + j) * tanh_n;
        store_states(state, load(p.cx, state), cell_tilde, h_new);
      }
    }
  }
}

// regularised_gate_grads_'s tensors.
template <typename scalar_t>
struct RegularisedBackwardPointers {
  scalar_t* grad_hy;              // [B, H]: grad h_t in, d_h * grad h_t out
  scalar_t* grad_cy;              // [B, H]: grad c_t in, grad c_{t-1} out
  const scalar_t* grad_gates;     // [B, 4H] of the activated gates; null when none
  const scalar_t* gates;          // [B, 4H] activated
  const scalar_t* cx;             // [B, H]
  const scalar_t* layer_norm_ih;  // [4H]; null without layer norm (then so are the next three)
  const scalar_t* layer_norm_hh;
  const scalar_t* layer_norm_cell_weight;
  const scalar_t* layer_norm_cell_bias;
  const scalar_t* input_part;       // [B, 4H] normalised (layer norm)
  const scalar_t* hidden_part;      // [B, 4H] normalised (layer norm)
  const scalar_t* normalized_cell;  // [B, H] (layer norm)
  const scalar_t* layer_norm_rstd;  // [B, 3] (layer norm)
  const scalar_t* zoneout_cell_mask;
  const scalar_t* zoneout_hidden_mask;
  scalar_t* grad_preactivation;    // [B, 4H]
  scalar_t* grad_input_part;       // [B, 4H] (layer norm)
  scalar_t* grad_hidden_part;      // [B, 4H] (layer norm)
  scalar_t* grad_normalized_cell;  // [B, H] (layer norm)
};

template <typename scalar_t, bool kLayerNorm>
__global__ void __launch_bounds__(kRegularisedThreads) regularised_gate_grads_kernel(
    RegularisedBackwardPointers<scalar_t> p, int64_t batch, int64_t hidden_size, double zoneout_cell,
    double zoneout_hidden) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t partial[kRegularisedWarps][4];
  const int64_t H = hidden_size, width = 4 * hidden_size;
  const auto load = [](const scalar_t* data, int64_t index) { return static_cast<opmath_t>(data[index]); };
  const opmath_t z_c = static_cast<opmath_t>(zoneout_cell), z_h = static_cast<opmath_t>(zoneout_hidden);
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * blockDim.y; first_row < batch;
       first_row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const bool active = row < batch;
    const scalar_t* gates = p.gates + row * width;
    const scalar_t* grad_gates = p.grad_gates != nullptr ? p.grad_gates + row * width : nullptr;
    const auto grad_gate = [&](int64_t k) { return grad_gates != nullptr ? load(grad_gates, k) : opmath_t(0); };
    // Through h: recomputed where needed (pass 2 again with layer norm) rather than kept, since
    // grad_hy is overwritten in place.
    const auto through_hidden = [&](int64_t j) {
      const int64_t state = row * H + j;
      opmath_t tanh_n;
      if constexpr (kLayerNorm) {
        tanh_n = math::tanh_(load(p.layer_norm_cell_weight, j) * load(p.normalized_cell, state) +
                             load(p.layer_norm_cell_bias, j));
      } else {
        const math::Gates<opmath_t> activated{load(gates, j), load(gates, H + j), load(gates, 2 * H + j),
                                              load(gates, 3 * H + j)};
        tanh_n = math::tanh_(math::cell_tilde(activated, load(p.cx, state)));
      }
      const opmath_t d_h = p.zoneout_hidden_mask != nullptr ? load(p.zoneout_hidden_mask, state) : z_h;
      return math::regularised_hidden_backward(load(gates, 3 * H + j), tanh_n, d_h, load(p.grad_hy, state),
                                               grad_gate(3 * H + j));
    };
    opmath_t mean_dy = 0, mean_dy_n_hat = 0, rstd_c = 0;
    if constexpr (kLayerNorm) {
      // Pass 1: the sums of LN(c-tilde)'s backward.
      opmath_t sums[2] = {0, 0};
      for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
        const opmath_t dy = through_hidden(j).grad_normalized * load(p.layer_norm_cell_weight, j);
        sums[0] += dy;
        sums[1] += dy * load(p.normalized_cell, row * H + j);
      }
      row_sums(sums, partial);
      mean_dy = sums[0] / opmath_t(H);
      mean_dy_n_hat = sums[1] / opmath_t(H);
      rstd_c = active ? load(p.layer_norm_rstd, row * 3 + 2) : opmath_t(0);
    }
    // Pass 2: every gate's pre-activation gradient and grad c_{t-1}; with layer norm the sums of
    // the two products' LN backward.
    scalar_t* grad_preactivation = p.grad_preactivation + row * width;
    opmath_t part_sums[4] = {0, 0, 0, 0};  // dy and dy * x_hat, of input_part then hidden_part
    for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
      const int64_t state = row * H + j;
      const auto hidden = through_hidden(j);
      opmath_t grad_from_hidden = hidden.grad_normalized;
      if constexpr (kLayerNorm) {
        p.grad_normalized_cell[state] = static_cast<scalar_t>(hidden.grad_normalized);
        grad_from_hidden = math::layer_norm_input_grad(
            rstd_c, hidden.grad_normalized * load(p.layer_norm_cell_weight, j), mean_dy, load(p.normalized_cell, state),
            mean_dy_n_hat);
      }
      const opmath_t d_c = p.zoneout_cell_mask != nullptr ? load(p.zoneout_cell_mask, state) : z_c;
      const auto cell = math::regularised_cell_backward(
          math::Gates<opmath_t>{load(gates, j), load(gates, H + j), load(gates, 2 * H + j), load(gates, 3 * H + j)},
          load(p.cx, state), d_c, grad_from_hidden, load(p.grad_cy, state), grad_gate(j), grad_gate(H + j),
          grad_gate(2 * H + j));
      p.grad_hy[state] = static_cast<scalar_t>(hidden.grad_hidden_prev);
      p.grad_cy[state] = static_cast<scalar_t>(cell.grad_cell_prev);
      const opmath_t grads[4] = {cell.grad_input_preact, cell.grad_forget_preact, cell.grad_cell_preact,
                                 hidden.grad_output_preact};
      for (int gate = 0; gate < 4; ++gate) {
        const int64_t k = gate * H + j;
        grad_preactivation[k] = static_cast<scalar_t>(grads[gate]);
        if constexpr (kLayerNorm) {
          const opmath_t dy_ih = grads[gate] * load(p.layer_norm_ih, k);
          const opmath_t dy_hh = grads[gate] * load(p.layer_norm_hh, k);
          part_sums[0] += dy_ih;
          part_sums[1] += dy_ih * load(p.input_part, row * width + k);
          part_sums[2] += dy_hh;
          part_sums[3] += dy_hh * load(p.hidden_part, row * width + k);
        }
      }
    }
    if constexpr (kLayerNorm) {
      // Pass 3: both products' gradients through their normalisations.
      row_sums(part_sums, partial);
      const opmath_t rstd_ih = active ? load(p.layer_norm_rstd, row * 3 + 0) : opmath_t(0);
      const opmath_t rstd_hh = active ? load(p.layer_norm_rstd, row * 3 + 1) : opmath_t(0);
      const opmath_t n = opmath_t(width);
      for (int64_t j = threadIdx.x; active && j < H; j += blockDim.x) {
        for (int gate = 0; gate < 4; ++gate) {
          const int64_t k = gate * H + j;
          const opmath_t grad = load(grad_preactivation, k);
          p.grad_input_part[row * width + k] = static_cast<scalar_t>(math::layer_norm_input_grad(
              rstd_ih, grad * load(p.layer_norm_ih, k), part_sums[0] / n, load(p.input_part, row * width + k),
              part_sums[1] / n));
          p.grad_hidden_part[row * width + k] = static_cast<scalar_t>(math::layer_norm_input_grad(
              rstd_hh, grad * load(p.layer_norm_hh, k), part_sums[2] / n, load(p.hidden_part, row * width + k),
              part_sums[3] / n));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launches, shared by the GPU build and the emulated one. batch and hidden_size > 0.
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
void launch_regularised_pointwise(
    const RegularisedForwardPointers<scalar_t>& p, int64_t batch, int64_t hidden_size, double zoneout_cell,
    double zoneout_hidden, cudaStream_t stream) {
  const RegularisedLaunch launch = regularised_launch(batch, hidden_size);
  if (p.layer_norm_ih != nullptr) {
    const auto kernel = regularised_pointwise_kernel<scalar_t, true>;
    LSTM_FUSED_LAUNCH(
        kernel, launch.grid, launch.block, 0, stream, p, batch, hidden_size, zoneout_cell, zoneout_hidden);
  } else {
    const auto kernel = regularised_pointwise_kernel<scalar_t, false>;
    LSTM_FUSED_LAUNCH(
        kernel, launch.grid, launch.block, 0, stream, p, batch, hidden_size, zoneout_cell, zoneout_hidden);
  }
}

template <typename scalar_t>
void launch_regularised_gate_grads(
    const RegularisedBackwardPointers<scalar_t>& p, int64_t batch, int64_t hidden_size, double zoneout_cell,
    double zoneout_hidden, cudaStream_t stream) {
  const RegularisedLaunch launch = regularised_launch(batch, hidden_size);
  if (p.layer_norm_ih != nullptr) {
    const auto kernel = regularised_gate_grads_kernel<scalar_t, true>;
    LSTM_FUSED_LAUNCH(
        kernel, launch.grid, launch.block, 0, stream, p, batch, hidden_size, zoneout_cell, zoneout_hidden);
  } else {
    const auto kernel = regularised_gate_grads_kernel<scalar_t, false>;
    LSTM_FUSED_LAUNCH(
        kernel, launch.grid, launch.block, 0, stream, p, batch, hidden_size, zoneout_cell, zoneout_hidden);
  }
}

}  // namespace cuda
}  // namespace lstm_fused
