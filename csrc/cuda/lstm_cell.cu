// CUDA kernels of the LSTM cell.
//
// Forward, small batch (the common recurrent-inference and training-step case): ONE launch per
// step. A block owns a tile of batch rows x hidden units and accumulates, over K = input_size +
// hidden_size, the four gate pre-activations of those units (rows j, H+j, 2H+j, 3H+j of W_ih, then
// of W_hh), so all four gates of a unit meet in one block and the cell update runs in the same
// kernel's epilogue. The K loop runs over input/W_ih and then over hx/W_hh: no [input, hx]
// concatenation is ever written to global memory.
//
// Forward, large batch: the step is then a compute-bound GEMM that cuBLAS (tensor cores for
// half/bf16, TF32 when the user allows it) does better than a SIMT kernel, so the products go
// through cuBLAS into the gates buffer and one pointwise kernel (cell_pointwise_) finishes the step.
// use_fused_forward() picks between the two.
//
// Backward: one pointwise kernel for the gate gradients; the products are cell_backward's at::mm
// calls in ops.cpp, shared with the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../lstm_cell_math.h"
#include "../ops.h"

namespace lstm_fused {
namespace {

constexpr int kWarpSize = 32;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// ------------------------------------------------------------------------------------------------
// Fused forward
// ------------------------------------------------------------------------------------------------

// 256 threads: enough warps to keep many weight loads in flight per block, few enough that a block
// of a small hidden size does not idle most of its threads.
constexpr int kForwardWarps = 8;
constexpr int kForwardThreads = kForwardWarps * kWarpSize;

// Bytes of activations ([batch_tile, chunk] of input or hx) staged in shared memory per K chunk.
// 32 KiB holds a whole segment (input or hx) of a batch-1 step up to 8192 fp32 features (one chunk,
// two barriers per segment), and
// leaves room for several resident blocks per SM on sm_80..sm_90 (at most 48 KiB of dynamic shared
// memory per block without an opt-in).
constexpr int kStageBytes = 32 * 1024;

// 16-byte vectors: the widest global load, and one bank-conflict-free shared-memory access per
// quarter warp.
template <typename scalar_t>
constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  T values[N];
};

// Batch rows per block, at most. Each lane keeps 4 * kBatchTile accumulators beside the unpacked
// weights; the caps keep them in registers without spills (ptxas, sm_90): double's accumulators
// take two registers each, and half/bfloat16 unpack 8 weights per 16-byte vector.
template <typename scalar_t>
constexpr int kMaxBatchTile = std::is_same_v<scalar_t, double> ? 4 : (sizeof(scalar_t) == 2 ? 8 : 16);

// Weight vectors loaded per gate row before the first of them is consumed: memory-level
// parallelism for the weight stream (steps x 4 rows x 16 bytes in flight per lane), bounded by
// registers: a 16-byte vector of half/bfloat16 unpacks into 8 floats, and a 16-row tile holds 64
// accumulators, so those take 2 steps.
template <typename scalar_t, int kBatchTile>
constexpr int kUnroll = (kBatchTile >= 16 || sizeof(scalar_t) == 2) ? 2 : 4;
static_assert(kMaxBatchTile<double> == 4 && kMaxBatchTile<float> == 16, "tiles instantiated: 1, 4, max");

template <typename scalar_t, int kBatchTile>
constexpr int64_t kChunkElements = kStageBytes / (kBatchTile * static_cast<int64_t>(sizeof(scalar_t)));

struct ForwardShape {
  int64_t batch;
  int64_t hidden_size;
  int64_t input_size;
  int64_t batch_tiles;        // ceil(batch / kBatchTile)
  int units_per_block;        // hidden units of one block = kForwardWarps / warps_per_unit
  int warps_per_unit;         // the warps that split one unit's K range (1, 2, 4 or 8)
  int chunk_elements;         // staged K elements per chunk (a multiple of the vector width)
  bool vectorized_ih;         // whether the W_ih / input segment allows 16-byte loads
  bool vectorized_hh;
};

// Copies rows [batch_begin, batch_begin + kBatchTile) x columns [k_begin, k_begin + length) of a
// contiguous [batch, row_length] activation into the shared tile; rows past the batch read as 0 so
// the accumulation needs no bounds test. Row loop outside, so no division per element.
template <int kVec, int kBatchTile, typename scalar_t>
__device__ __forceinline__ void stage_activations(
    scalar_t* __restrict__ tile,
    int tile_stride,
    const scalar_t* __restrict__ activations,
    int64_t batch,
    int64_t row_length,
    int64_t batch_begin,
    int64_t k_begin,
    int length) {
  using vector_t = Vector<scalar_t, kVec>;
  const int vectors_per_row = length / kVec;
#pragma unroll
  for (int row = 0; row < kBatchTile; ++row) {
    const bool row_in_batch = batch_begin + row < batch;
    const scalar_t* source = activations + (batch_begin + row) * row_length + k_begin;
    for (int vector = threadIdx.x; vector < vectors_per_row; vector += blockDim.x) {
      vector_t value;
      if (row_in_batch) {
        value = *reinterpret_cast<const vector_t*>(source + vector * kVec);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          value.values[e] = scalar_t(0);
        }
      }
      *reinterpret_cast<vector_t*>(tile + row * tile_stride + vector * kVec) = value;
    }
  }
}

// One warp's share of a staged chunk: the lanes (and, with warps_per_unit > 1, the unit's warps)
// stride over the chunk's vectors; each lane multiplies the vectors of the unit's four gate rows
// that it loaded with the same K positions of every batch row of the tile. A weight element is thus
// read from global memory once per block and reused kBatchTile times from registers; it never goes
// through shared memory because no other thread needs it.
template <int kVec, int kBatchTile, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void accumulate_chunk(
    opmath_t (&accumulators)[4][kBatchTile],
    const scalar_t* __restrict__ weight_rows,  // row j of the segment's weight, at the chunk's start
    int64_t gate_row_stride,                   // elements from gate row g to gate row g + 1 (H * K_segment)
    const scalar_t* __restrict__ tile,
    int tile_stride,
    int length,
    int first_vector,
    int vector_stride) {
  using vector_t = Vector<scalar_t, kVec>;
  constexpr int kSteps = kUnroll<scalar_t, kBatchTile>;
  const scalar_t* gate_rows[4];
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
    gate_rows[gate] = weight_rows + gate * gate_row_stride;
  }
  const int vectors = length / kVec;
  for (int base = first_vector; base < vectors; base += kSteps * vector_stride) {
    vector_t weights[kSteps][4];
    // All loads first, so kSteps * 4 of them are in flight before the first multiply waits.
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int vector = base + step * vector_stride;
      if (vector < vectors) {
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
          weights[step][gate] = *reinterpret_cast<const vector_t*>(gate_rows[gate] + vector * kVec);
        }
      }
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      const int vector = base + step * vector_stride;
      if (vector < vectors) {
        // Converted once here, not once per batch row.
        opmath_t weight_values[4][kVec];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            weight_values[gate][e] = static_cast<opmath_t>(weights[step][gate].values[e]);
          }
        }
#pragma unroll
        for (int row = 0; row < kBatchTile; ++row) {
          const vector_t x = *reinterpret_cast<const vector_t*>(tile + row * tile_stride + vector * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const opmath_t x_e = static_cast<opmath_t>(x.values[e]);
#pragma unroll
            for (int gate = 0; gate < 4; ++gate) {
              accumulators[gate][row] += weight_values[gate][e] * x_e;
            }
          }
        }
      }
    }
  }
}

// Accumulates one K segment (input with W_ih, or hx with W_hh), chunk by chunk through the shared
// tile. Every thread of the block runs the same chunk loop: the barriers must be uniform.
template <int kVec, int kBatchTile, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void accumulate_segment(
    opmath_t (&accumulators)[4][kBatchTile],
    scalar_t* __restrict__ tile,
    const scalar_t* __restrict__ activations,  // [batch, segment_length]
    const scalar_t* __restrict__ weight,       // [4 * H, segment_length]
    int64_t segment_length,
    const ForwardShape& shape,
    int64_t batch_begin,
    int64_t unit,
    bool unit_in_range,
    int first_vector,
    int vector_stride) {
  const int tile_stride = shape.chunk_elements;
  const int64_t gate_row_stride = shape.hidden_size * segment_length;
  for (int64_t k_begin = 0; k_begin < segment_length; k_begin += shape.chunk_elements) {
    const int64_t remaining = segment_length - k_begin;
    const int length = remaining < shape.chunk_elements ? static_cast<int>(remaining) : shape.chunk_elements;
    __syncthreads();  // the previous chunk has been consumed by every warp
    stage_activations<kVec, kBatchTile>(
        tile, tile_stride, activations, shape.batch, segment_length, batch_begin, k_begin, length);
    __syncthreads();
    if (unit_in_range) {
      accumulate_chunk<kVec, kBatchTile>(
          accumulators, weight + unit * segment_length + k_begin, gate_row_stride, tile, tile_stride, length,
          first_vector, vector_stride);
    }
  }
}

template <typename scalar_t, int kBatchTile>
__global__ void __launch_bounds__(kForwardThreads) cell_forward_fused_kernel(
    const scalar_t* __restrict__ input,      // [B, I]
    const scalar_t* __restrict__ hx,         // [B, H]
    const scalar_t* __restrict__ cx,         // [B, H]
    const scalar_t* __restrict__ weight_ih,  // [4H, I]
    const scalar_t* __restrict__ weight_hh,  // [4H, H]
    const scalar_t* __restrict__ bias_ih,    // [4H] or null
    const scalar_t* __restrict__ bias_hh,    // [4H] or null
    scalar_t* __restrict__ hy,               // [B, H]
    scalar_t* __restrict__ cy,               // [B, H]
    scalar_t* __restrict__ gates,            // [B, 4H], activated i, f, g, o
    const ForwardShape shape) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorWidth<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  scalar_t* tile = reinterpret_cast<scalar_t*>(shared_bytes);
  // Per-warp sums of the four gates, [warp_in_unit][row][gate][unit_in_block].
  __shared__ opmath_t partial_sums[kForwardWarps * kBatchTile * 4];

  // Consecutive blocks share their units and differ in batch tile, so the blocks that read the same
  // weight rows run together and all but the first find them in L2.
  const int64_t batch_tile = blockIdx.x % shape.batch_tiles;
  const int64_t unit_block = blockIdx.x / shape.batch_tiles;
  const int64_t batch_begin = batch_tile * kBatchTile;

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int unit_in_block = warp / shape.warps_per_unit;
  const int warp_in_unit = warp % shape.warps_per_unit;
  const int64_t unit = unit_block * shape.units_per_block + unit_in_block;
  const bool unit_in_range = unit < shape.hidden_size;
  const int first_vector = warp_in_unit * kWarpSize + lane;
  const int vector_stride = shape.warps_per_unit * kWarpSize;

  opmath_t accumulators[4][kBatchTile];
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
    for (int row = 0; row < kBatchTile; ++row) {
      accumulators[gate][row] = opmath_t(0);
    }
  }

  // K, first part: input x W_ih^T. The branch is uniform over the grid.
  if (shape.vectorized_ih) {
    accumulate_segment<kVec, kBatchTile>(
        accumulators, tile, input, weight_ih, shape.input_size, shape, batch_begin, unit, unit_in_range,
        first_vector, vector_stride);
  } else {
    accumulate_segment<1, kBatchTile>(
        accumulators, tile, input, weight_ih, shape.input_size, shape, batch_begin, unit, unit_in_range,
        first_vector, vector_stride);
  }
  // K, second part: hx x W_hh^T.
  if (shape.vectorized_hh) {
    accumulate_segment<kVec, kBatchTile>(
        accumulators, tile, hx, weight_hh, shape.hidden_size, shape, batch_begin, unit, unit_in_range,
        first_vector, vector_stride);
  } else {
    accumulate_segment<1, kBatchTile>(
        accumulators, tile, hx, weight_hh, shape.hidden_size, shape, batch_begin, unit, unit_in_range,
        first_vector, vector_stride);
  }

  // Butterfly reduction over the lanes: every lane ends with the warp's sums. Lanes of an
  // out-of-range unit hold zeros and take part, since the shuffles need the full warp.
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
    for (int row = 0; row < kBatchTile; ++row) {
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        accumulators[gate][row] += __shfl_xor_sync(0xffffffffu, accumulators[gate][row], offset);
      }
    }
  }
  // Each of the warp's 4 * kBatchTile sums is stored by one lane (compile-time indices, so the
  // accumulators stay in registers).
#pragma unroll
  for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
    for (int row = 0; row < kBatchTile; ++row) {
      if ((gate * kBatchTile + row) % kWarpSize == lane) {
        partial_sums[((warp_in_unit * kBatchTile + row) * 4 + gate) * shape.units_per_block + unit_in_block] =
            accumulators[gate][row];
      }
    }
  }
  __syncthreads();

  // Epilogue: one thread per (row, unit) of the tile; consecutive threads take consecutive units of
  // a row, so the cx reads and the hy, cy and gate writes are coalesced segments.
  const int tile_elements = kBatchTile * shape.units_per_block;
  if (threadIdx.x < tile_elements) {
    const int row = threadIdx.x / shape.units_per_block;
    const int epilogue_unit_in_block = threadIdx.x % shape.units_per_block;
    const int64_t batch_row = batch_begin + row;
    const int64_t epilogue_unit = unit_block * shape.units_per_block + epilogue_unit_in_block;
    if (batch_row < shape.batch && epilogue_unit < shape.hidden_size) {
      const int64_t H = shape.hidden_size;
      opmath_t preactivation[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        opmath_t sum = opmath_t(0);
        for (int part = 0; part < shape.warps_per_unit; ++part) {
          sum += partial_sums[((part * kBatchTile + row) * 4 + gate) * shape.units_per_block + epilogue_unit_in_block];
        }
        if (bias_ih != nullptr) {
          sum += static_cast<opmath_t>(bias_ih[gate * H + epilogue_unit]);
        }
        if (bias_hh != nullptr) {
          sum += static_cast<opmath_t>(bias_hh[gate * H + epilogue_unit]);
        }
        preactivation[gate] = sum;
      }
      const int64_t state_offset = batch_row * H + epilogue_unit;
      const auto step = math::cell_forward(
          math::Gates<opmath_t>{preactivation[0], preactivation[1], preactivation[2], preactivation[3]},
          static_cast<opmath_t>(cx[state_offset]));
      scalar_t* gate_row = gates + batch_row * 4 * H + epilogue_unit;
      gate_row[0] = static_cast<scalar_t>(step.gates.input);
      gate_row[H] = static_cast<scalar_t>(step.gates.forget);
      gate_row[2 * H] = static_cast<scalar_t>(step.gates.cell);
      gate_row[3 * H] = static_cast<scalar_t>(step.gates.output);
      cy[state_offset] = static_cast<scalar_t>(step.cell_state);
      hy[state_offset] = static_cast<scalar_t>(step.hidden_state);
    }
  }
}

bool aligned_16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

template <typename scalar_t, int kBatchTile>
void launch_fused_forward(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const at::Tensor& bias_ih,
    const at::Tensor& bias_hh,
    at::Tensor& hy,
    at::Tensor& cy,
    at::Tensor& gates) {
  constexpr int kVec = kVectorWidth<scalar_t>;
  ForwardShape shape;
  shape.batch = input.size(0);
  shape.input_size = input.size(1);
  shape.hidden_size = hx.size(1);
  shape.batch_tiles = ceil_div(shape.batch, kBatchTile);

  const scalar_t* input_data = input.const_data_ptr<scalar_t>();
  const scalar_t* hx_data = hx.const_data_ptr<scalar_t>();
  const scalar_t* weight_ih_data = weight_ih.const_data_ptr<scalar_t>();
  const scalar_t* weight_hh_data = weight_hh.const_data_ptr<scalar_t>();
  // 16-byte loads need every row of the segment to start on a 16-byte boundary.
  shape.vectorized_ih = shape.input_size % kVec == 0 && aligned_16(input_data) && aligned_16(weight_ih_data);
  shape.vectorized_hh = shape.hidden_size % kVec == 0 && aligned_16(hx_data) && aligned_16(weight_hh_data);

  // A chunk holds the longer segment whole when it fits; a multiple of the vector width so every
  // chunk of a vectorised segment starts aligned.
  const int64_t longest_segment = std::max(shape.input_size, shape.hidden_size);
  shape.chunk_elements =
      static_cast<int>(std::min(kChunkElements<scalar_t, kBatchTile>, ceil_div(longest_segment, kVec) * kVec));

  // Split a unit's K range over several warps of the block when there would otherwise be too few
  // blocks to occupy the GPU (small hidden sizes) and K is long enough for each warp to get at
  // least two 32-lane vector steps. To be tuned by measurement on the GPU.
  const int64_t target_blocks = 2 * static_cast<int64_t>(multiprocessor_count());
  const int64_t k_vectors = ceil_div(shape.input_size, kVec) + ceil_div(shape.hidden_size, kVec);
  const auto blocks_for = [&](int warps_per_unit) {
    return ceil_div(shape.hidden_size, kForwardWarps / warps_per_unit) * shape.batch_tiles;
  };
  int warps_per_unit = 1;
  while (warps_per_unit < kForwardWarps && blocks_for(warps_per_unit) < target_blocks &&
         k_vectors >= 2 * kWarpSize * (2 * warps_per_unit)) {
    warps_per_unit *= 2;
  }
  shape.warps_per_unit = warps_per_unit;
  shape.units_per_block = kForwardWarps / warps_per_unit;

  const int64_t blocks = blocks_for(warps_per_unit);
  TORCH_INTERNAL_ASSERT(blocks > 0 && blocks <= INT_MAX, "use_fused_forward must exclude this grid");
  const size_t shared_bytes = static_cast<size_t>(kBatchTile) * shape.chunk_elements * sizeof(scalar_t);

  cell_forward_fused_kernel<scalar_t, kBatchTile>
      <<<static_cast<unsigned int>(blocks), kForwardThreads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(
          input_data,
          hx_data,
          cx.const_data_ptr<scalar_t>(),
          weight_ih_data,
          weight_hh_data,
          data_or_null<scalar_t>(bias_ih),
          data_or_null<scalar_t>(bias_hh),
          hy.mutable_data_ptr<scalar_t>(),
          cy.mutable_data_ptr<scalar_t>(),
          gates.mutable_data_ptr<scalar_t>(),
          shape);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The batch tile of a launch: the smallest instantiated tile that covers the batch, else the largest
// (several batch tiles then re-read the weights, from L2 when they run together). A template, so
// that `if constexpr` keeps tiles a dtype does not use from being instantiated.
template <typename scalar_t>
void launch_fused_forward_for_batch(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const at::Tensor& bias_ih,
    const at::Tensor& bias_hh,
    at::Tensor& hy,
    at::Tensor& cy,
    at::Tensor& gates) {
  constexpr int kMaxTile = kMaxBatchTile<scalar_t>;
  const int64_t batch = input.size(0);
  if (batch <= 1) {
    launch_fused_forward<scalar_t, 1>(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, hy, cy, gates);
  } else if (batch <= 4 || kMaxTile == 4) {
    launch_fused_forward<scalar_t, 4>(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, hy, cy, gates);
  } else {
    if constexpr (kMaxTile > 4) {
      launch_fused_forward<scalar_t, kMaxTile>(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, hy, cy, gates);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Pointwise kernels (fallback forward and backward)
// ------------------------------------------------------------------------------------------------

// Pointwise kernels walk a 2-D grid (rows x units) with grid-stride loops in both directions: no
// 64-bit division per element, coalesced along the units, any size within the grid limits.
struct PointwiseLaunch {
  dim3 grid;
  dim3 block;
};

PointwiseLaunch pointwise_launch(int64_t batch, int64_t hidden_size) {
  constexpr int kThreads = 256;
  const int threads_x = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(hidden_size, kWarpSize) * kWarpSize));
  const int threads_y = kThreads / threads_x;
  // A few waves of resident blocks; the loops cover the rest.
  const int64_t max_blocks = 32 * static_cast<int64_t>(multiprocessor_count());
  const int64_t blocks_x = std::min<int64_t>(ceil_div(hidden_size, threads_x), max_blocks);
  const int64_t blocks_y = std::min<int64_t>({ceil_div(batch, threads_y), 65535, std::max<int64_t>(1, max_blocks / blocks_x)});
  return {
      dim3(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(blocks_y)),
      dim3(static_cast<unsigned int>(threads_x), static_cast<unsigned int>(threads_y))};
}

#define LSTM_FUSED_FOR_EACH_UNIT(batch, hidden_size, row, unit)                                              \
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < (batch);             \
       row += static_cast<int64_t>(gridDim.y) * blockDim.y)                                                   \
    for (int64_t unit = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; unit < (hidden_size); \
         unit += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename scalar_t, bool kHasBias>
__global__ void cell_pointwise_kernel(
    scalar_t* __restrict__ gates,           // [B, 4H]: pre-activations in, activated gates out
    const scalar_t* __restrict__ cx,        // [B, H]
    const scalar_t* __restrict__ bias,      // [4H] (kHasBias)
    scalar_t* __restrict__ hy,              // [B, H]
    scalar_t* __restrict__ cy,              // [B, H]
    int64_t batch,
    int64_t hidden_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = hidden_size;
  LSTM_FUSED_FOR_EACH_UNIT(batch, hidden_size, row, unit) {
    scalar_t* gate_row = gates + row * 4 * H + unit;
    math::Gates<opmath_t> preactivation{
        static_cast<opmath_t>(gate_row[0]),
        static_cast<opmath_t>(gate_row[H]),
        static_cast<opmath_t>(gate_row[2 * H]),
        static_cast<opmath_t>(gate_row[3 * H])};
    if constexpr (kHasBias) {
      preactivation.input += static_cast<opmath_t>(bias[unit]);
      preactivation.forget += static_cast<opmath_t>(bias[H + unit]);
      preactivation.cell += static_cast<opmath_t>(bias[2 * H + unit]);
      preactivation.output += static_cast<opmath_t>(bias[3 * H + unit]);
    }
    const int64_t state_offset = row * H + unit;
    const auto step = math::cell_forward(preactivation, static_cast<opmath_t>(cx[state_offset]));
    gate_row[0] = static_cast<scalar_t>(step.gates.input);
    gate_row[H] = static_cast<scalar_t>(step.gates.forget);
    gate_row[2 * H] = static_cast<scalar_t>(step.gates.cell);
    gate_row[3 * H] = static_cast<scalar_t>(step.gates.output);
    cy[state_offset] = static_cast<scalar_t>(step.cell_state);
    hy[state_offset] = static_cast<scalar_t>(step.hidden_state);
  }
}

// Which incoming gradients exist is a template parameter, so the kernel has no per-element branch;
// an absent one reads as zero.
template <typename scalar_t, bool kHasGradHidden, bool kHasGradCell, bool kHasGradGates>
__global__ void cell_gate_grads_kernel(
    const scalar_t* __restrict__ grad_hidden,  // [B, H] (kHasGradHidden)
    const scalar_t* __restrict__ grad_cell,    // [B, H] (kHasGradCell)
    const scalar_t* __restrict__ grad_gates,   // [B, 4H] (kHasGradGates)
    const scalar_t* __restrict__ cell_prev,    // [B, H]
    const scalar_t* __restrict__ cell_state,   // [B, H]
    const scalar_t* __restrict__ gates,        // [B, 4H], activated
    scalar_t* __restrict__ grad_preactivation, // [B, 4H]
    scalar_t* __restrict__ grad_cell_prev,     // [B, H]
    int64_t batch,
    int64_t hidden_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = hidden_size;
  LSTM_FUSED_FOR_EACH_UNIT(batch, hidden_size, row, unit) {
    const int64_t state_offset = row * H + unit;
    const int64_t gate_offset = row * 4 * H + unit;
    const auto load_gates = [&](const scalar_t* data) {
      return math::Gates<opmath_t>{
          static_cast<opmath_t>(data[gate_offset]),
          static_cast<opmath_t>(data[gate_offset + H]),
          static_cast<opmath_t>(data[gate_offset + 2 * H]),
          static_cast<opmath_t>(data[gate_offset + 3 * H])};
    };
    math::Gates<opmath_t> incoming_gate_grads{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)};
    if constexpr (kHasGradGates) {
      incoming_gate_grads = load_gates(grad_gates);
    }
    opmath_t grad_h = opmath_t(0);
    if constexpr (kHasGradHidden) {
      grad_h = static_cast<opmath_t>(grad_hidden[state_offset]);
    }
    opmath_t grad_c = opmath_t(0);
    if constexpr (kHasGradCell) {
      grad_c = static_cast<opmath_t>(grad_cell[state_offset]);
    }
    const auto grads = math::cell_backward(
        load_gates(gates),
        static_cast<opmath_t>(cell_prev[state_offset]),
        static_cast<opmath_t>(cell_state[state_offset]),
        grad_h,
        grad_c,
        incoming_gate_grads);
    grad_preactivation[gate_offset] = static_cast<scalar_t>(grads.grad_preactivation.input);
    grad_preactivation[gate_offset + H] = static_cast<scalar_t>(grads.grad_preactivation.forget);
    grad_preactivation[gate_offset + 2 * H] = static_cast<scalar_t>(grads.grad_preactivation.cell);
    grad_preactivation[gate_offset + 3 * H] = static_cast<scalar_t>(grads.grad_preactivation.output);
    grad_cell_prev[state_offset] = static_cast<scalar_t>(grads.grad_cell_state_prev);
  }
}

#undef LSTM_FUSED_FOR_EACH_UNIT

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

void cell_pointwise_cuda(
    at::Tensor& gates,
    const at::Tensor& cx,
    const std::optional<at::Tensor>& bias,
    at::Tensor& hy,
    at::Tensor& cy) {
  check_cell_pointwise_args(gates, cx, bias, hy, cy);
  const c10::cuda::CUDAGuard device_guard(gates.device());
  const int64_t batch = gates.size(0);
  const int64_t hidden_size = gates.size(1) / 4;
  if (batch == 0 || hidden_size == 0) {
    return;  // nothing to write, and a zero-size grid is a launch error
  }
  const at::Tensor cx_contiguous = cx.contiguous();
  const at::Tensor bias_contiguous = contiguous_or_undefined(bias);
  const auto launch = pointwise_launch(batch, hidden_size);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "lstm_fused_cell_pointwise_cuda", [&] {
    const auto run = [&](auto kernel, const scalar_t* bias_data) {
      kernel<<<launch.grid, launch.block, 0, stream>>>(
          gates.mutable_data_ptr<scalar_t>(),
          cx_contiguous.const_data_ptr<scalar_t>(),
          bias_data,
          hy.mutable_data_ptr<scalar_t>(),
          cy.mutable_data_ptr<scalar_t>(),
          batch,
          hidden_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (bias_contiguous.defined()) {
      run(cell_pointwise_kernel<scalar_t, true>, bias_contiguous.const_data_ptr<scalar_t>());
    } else {
      run(cell_pointwise_kernel<scalar_t, false>, nullptr);
    }
  });
}

// Chooses the one-launch fused kernel or the cuBLAS products + cell_pointwise_ fallback.
//
// The fused kernel is a SIMT kernel that reads each weight element once per batch tile: at small
// batch the step is bound by streaming the weights, and one launch beats three (two GEMMs and a
// pointwise kernel, ~5-11 us of launch overhead each). As the batch grows the step becomes
// compute-bound, where cuBLAS wins: with tensor cores for half/bfloat16 (hence the lower limit),
// with TF32 for float when the user allows it, and with better register blocking in any case.
//
// The batch limits below are first guesses from that reasoning, NOT measurements: no GPU was
// available when this was written. They are to be tuned by measurement on the GPU (H100/H200,
// benchmarks/), per dtype and over hidden sizes 64-2048.
constexpr int64_t kMaxFusedBatchFloat = 64;     // float and double: to be tuned by measurement on the GPU
constexpr int64_t kMaxFusedBatchReduced = 32;   // half and bfloat16: to be tuned by measurement on the GPU

bool use_fused_forward(int64_t batch, int64_t hidden_size, at::ScalarType dtype) {
  const bool reduced_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  if (batch > (reduced_precision ? kMaxFusedBatchReduced : kMaxFusedBatchFloat)) {
    return false;
  }
  // The fused grid is one dimension of ceil(H / units_per_block) * batch_tiles blocks; at most 8
  // units share a block and tiles hold at least 1 row, so this bound is conservative.
  return hidden_size * batch <= INT_MAX;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_forward_cuda(
    const at::Tensor& input,
    const at::Tensor& hx,
    const at::Tensor& cx,
    const at::Tensor& weight_ih,
    const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh) {
  // Checked before the guard: the checks name a tensor on the wrong device, and a CUDAGuard on a
  // CPU input would fail with a less helpful message.
  check_cell_forward_args(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh);
  const c10::cuda::CUDAGuard device_guard(input.device());
  // Autocast must not recast the products of an op whose dtype was fixed by its caller.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t batch = input.size(0);
  const int64_t hidden_size = weight_hh.size(1);
  const auto options = input.options();

  at::Tensor gates = new_output({batch, 4 * hidden_size}, options);
  at::Tensor hy = new_output({batch, hidden_size}, options);
  at::Tensor cy = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {hy, cy, gates};  // every output is empty
  }

  if (!use_fused_forward(batch, hidden_size, input.scalar_type())) {
    // Both products accumulate into one [batch, 4 * hidden] buffer; bias_ih rides on the first,
    // bias_hh is added by the pointwise kernel. With input_size 0 the first product writes zeros.
    if (bias_ih.has_value()) {
      at::addmm_out(gates, *bias_ih, input, weight_ih.t());
    } else {
      at::mm_out(gates, input, weight_ih.t());
    }
    gates.addmm_(hx, weight_hh.t());
    cell_pointwise_cuda(gates, cx, bias_hh, hy, cy);
    return {hy, cy, gates};
  }

  // The kernel indexes rows densely. Activations are small; weights are normally contiguous already
  // (a parameter view that is not would be copied here on every step).
  const at::Tensor input_c = input.contiguous();
  const at::Tensor hx_c = hx.contiguous();
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor weight_ih_c = weight_ih.contiguous();
  const at::Tensor weight_hh_c = weight_hh.contiguous();
  const at::Tensor bias_ih_c = contiguous_or_undefined(bias_ih);
  const at::Tensor bias_hh_c = contiguous_or_undefined(bias_hh);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstm_fused_cell_forward_cuda", [&] {
    launch_fused_forward_for_batch<scalar_t>(
        input_c, hx_c, cx_c, weight_ih_c, weight_hh_c, bias_ih_c, bias_hh_c, hy, cy, gates);
  });
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor> cell_gate_grads_cuda(
    const std::optional<at::Tensor>& grad_hy,
    const std::optional<at::Tensor>& grad_cy,
    const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& cx,
    const at::Tensor& cy,
    const at::Tensor& gates) {
  check_cell_gate_grads_args(grad_hy, grad_cy, grad_gates, cx, cy, gates);
  const c10::cuda::CUDAGuard device_guard(cx.device());
  const int64_t batch = cx.size(0);
  const int64_t hidden_size = cx.size(1);
  const auto options = cx.options();
  at::Tensor grad_preactivation = new_output({batch, 4 * hidden_size}, options);
  at::Tensor grad_cx = new_output({batch, hidden_size}, options);
  if (batch == 0 || hidden_size == 0) {
    return {grad_preactivation, grad_cx};
  }

  const at::Tensor grad_hy_c = contiguous_or_undefined(grad_hy);
  const at::Tensor grad_cy_c = contiguous_or_undefined(grad_cy);
  const at::Tensor grad_gates_c = contiguous_or_undefined(grad_gates);
  const at::Tensor cx_c = cx.contiguous();
  const at::Tensor cy_c = cy.contiguous();
  const at::Tensor gates_c = gates.contiguous();
  const auto launch = pointwise_launch(batch, hidden_size);
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cx.scalar_type(), "lstm_fused_cell_gate_grads_cuda", [&] {
    const auto run = [&](auto kernel) {
      kernel<<<launch.grid, launch.block, 0, stream>>>(
          data_or_null<scalar_t>(grad_hy_c),
          data_or_null<scalar_t>(grad_cy_c),
          data_or_null<scalar_t>(grad_gates_c),
          cx_c.const_data_ptr<scalar_t>(),
          cy_c.const_data_ptr<scalar_t>(),
          gates_c.const_data_ptr<scalar_t>(),
          grad_preactivation.mutable_data_ptr<scalar_t>(),
          grad_cx.mutable_data_ptr<scalar_t>(),
          batch,
          hidden_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const int variant = (grad_hy_c.defined() ? 4 : 0) + (grad_cy_c.defined() ? 2 : 0) + (grad_gates_c.defined() ? 1 : 0);
    switch (variant) {
      case 0: run(cell_gate_grads_kernel<scalar_t, false, false, false>); break;
      case 1: run(cell_gate_grads_kernel<scalar_t, false, false, true>); break;
      case 2: run(cell_gate_grads_kernel<scalar_t, false, true, false>); break;
      case 3: run(cell_gate_grads_kernel<scalar_t, false, true, true>); break;
      case 4: run(cell_gate_grads_kernel<scalar_t, true, false, false>); break;
      case 5: run(cell_gate_grads_kernel<scalar_t, true, false, true>); break;
      case 6: run(cell_gate_grads_kernel<scalar_t, true, true, false>); break;
      default: run(cell_gate_grads_kernel<scalar_t, true, true, true>); break;
    }
  });
  return {grad_preactivation, grad_cx};
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  m.impl("cell_forward", &cell_forward_cuda);
  m.impl("cell_pointwise_", &cell_pointwise_cuda);
  m.impl("cell_gate_grads", &cell_gate_grads_cuda);
}

}  // namespace lstm_fused
