// Device code of the LSTM cell, and the host-side planning of its launches.
//
// This header is compiled twice: by nvcc for the GPU (csrc/cuda/lstm_cell.cu), and as plain host
// C++ against the tests' emulation of CUDA's execution model (tests/emulated_cuda/), which defines
// LSTM_FUSED_CUDA_EMULATION and the CUDA builtins before including it. One source for both, so the
// kernels CI runs on the CPU are the kernels the GPU runs. Only two things differ between the two
// builds, and they are the macros below: how dynamic shared memory is declared, and how a kernel
// is launched.
//
// Forward, small batch (the common recurrent-inference and training-step case): ONE launch per
// step. A block owns a tile of batch rows x hidden units and accumulates, over K = input_size +
// hidden_size, the four gate pre-activations of those units (rows j, H+j, 2H+j, 3H+j of W_ih, then
// of W_hh), so all four gates of a unit meet in one block and the cell update runs in the same
// kernel's epilogue. The K loop runs over input/W_ih and then over hx/W_hh: no [input, hx]
// concatenation is ever written to global memory.
//
// Forward, large batch (or tensor cores available): cuBLAS products into the gates buffer and one
// pointwise kernel (cell_pointwise_kernel). use_fused_forward() picks between the two.
//
// Backward: one pointwise kernel for the gate gradients; the products are library GEMMs.
//
// Sequence (the sequence_forward / sequence_backward ops on a padded batch, csrc/cuda/sequence.cu):
// one cooperative launch per layer direction runs every step, W_hh's slices resident in shared
// memory, a grid barrier per step; half/bfloat16 forward products on tensor cores. See the section
// at the end.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../lstm_cell_math.h"

#if defined(LSTM_FUSED_CUDA_EMULATION)
// The emulation hands each block its dynamic shared memory, and runs a launch as a host call.
#define LSTM_FUSED_DYNAMIC_SHARED(type, name) type* name = ::cuda_emulation::dynamic_shared<type>()
#define LSTM_FUSED_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ::cuda_emulation::launch((grid), (block), (shared_bytes), [=] { kernel(__VA_ARGS__); })
#define LSTM_FUSED_LAUNCH_COOPERATIVE(kernel, grid, block, shared_bytes, stream, ...) \
  ::cuda_emulation::launch_cooperative((grid), (block), (shared_bytes), [=] { kernel(__VA_ARGS__); })
#else
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <mma.h>
#define LSTM_FUSED_LAUNCH_COOPERATIVE(kernel, grid, block, shared_bytes, stream, ...) \
  ::lstm_fused::cuda::launch_cooperative_kernel(kernel, (grid), (block), (shared_bytes), (stream), __VA_ARGS__)
// 128-byte aligned: tensor-core fragment loads need 32-byte aligned tiles.
#define LSTM_FUSED_DYNAMIC_SHARED(type, name)                  \
  extern __shared__ __align__(128) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
// Every launch is checked where it is made: an invalid configuration surfaces at its launch.
#define LSTM_FUSED_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  do {                                                                    \
    kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__);   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                       \
  } while (false)
#endif

namespace lstm_fused {
namespace cuda {

constexpr int kWarpSize = 32;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ------------------------------------------------------------------------------------------------
// Fused forward: tiles and their limits
// ------------------------------------------------------------------------------------------------

// 256 threads: enough warps to keep many weight loads in flight per block, few enough that a block
// of a small hidden size does not idle most of its threads.
constexpr int kForwardWarps = 8;
constexpr int kForwardThreads = kForwardWarps * kWarpSize;

// Bytes of activations ([batch_tile, chunk], staged as the compute type) in shared memory per K
// chunk. 32 KiB holds a whole segment (input or hx) of a batch-1 step up to 8192 features (one
// chunk, two barriers per segment), and leaves room for several resident blocks per SM on
// sm_80..sm_90 (at most 48 KiB of dynamic shared memory per block without an opt-in).
constexpr int kStageBytes = 32 * 1024;

// 16-byte vectors: the widest global load.
template <typename scalar_t>
constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(scalar_t));

// Aligned to its size up to 16 bytes, the widest single access; a staged vector of 8 floats (from
// 8 halves) is then two 16-byte shared-memory accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vector {
  T values[N];
};

// Batch rows per block, at most. Each lane keeps 4 * kBatchTile accumulators beside its weight
// registers. double's accumulators take two registers each. Half and bfloat16 stop at 8: a 16-row
// tile of them beside 8 unpacked weights per vector per gate would not fit in registers (the
// review's ptxas run, sm_90, had tile 8 at 166 registers before the activations were staged as
// float32; staging them so removes the per-use conversions that cost those registers).
template <typename scalar_t>
constexpr int kMaxBatchTile = std::is_same_v<scalar_t, double> ? 4 : (sizeof(scalar_t) == 2 ? 8 : 16);

// Two resident blocks per SM, so that one block's barrier waits overlap the other's loads: the
// kernel must fit in 65536 / (2 * 256) = 128 registers per thread. (The review's ptxas run, sm_90,
// had bfloat16 tile 8 at 166 registers, one block per SM.)
constexpr int kForwardMinBlocksPerSm = 2;

// Weight vectors loaded per gate row before the first of them is consumed: memory-level
// parallelism for the weight stream (steps x 4 rows x 16 bytes in flight per lane), bounded by the
// 128 registers above. A step of half/bfloat16 unpacks into 8 floats per gate row, twice float's 4,
// so it takes half the steps; tiles of 8 or more rows reuse each weight as often, so they need fewer
// loads in flight per FMA and take 1 step. ptxas -v, sm_90, with the 128-register bound: no spill
// but for bfloat16 tile 8 (68 bytes), half tile 8 (12) and float tile 16 (8), down from the
// review's 166 registers / 28 / 16 bytes; float, double and every tile 1 and 4 fit. Whether the
// remaining spills cost more than one resident block would is for the GPU benchmark to measure.
template <typename scalar_t, int kBatchTile>
constexpr int kUnroll = kBatchTile >= 8 ? 1 : ((kBatchTile == 1 ? 4 : 2) / (sizeof(scalar_t) == 2 ? 2 : 1));

// The tiles instantiated, per dtype: 1, 4, 8 and 16 for float; 1, 4 and 8 for half and bfloat16;
// 1 and 4 for double. 8 exists so that batch 5-8 does not run a 16-row tile with half its rows
// (or, at batch 5, 11 of 16) empty.
template <typename scalar_t>
inline int fused_batch_tile(int64_t batch) {
  constexpr int kMax = kMaxBatchTile<scalar_t>;
  if (batch <= 1) {
    return 1;
  }
  if (batch <= 4 || kMax == 4) {
    return 4;
  }
  if (batch <= 8 || kMax == 8) {
    return 8;
  }
  return 16;
}

// Which forward path a step takes: the one-launch fused kernel or the cuBLAS products + pointwise.
//
// The fused kernel is a SIMT kernel that reads each weight element once per batch tile: at small
// batch the step is bound by streaming the weights, and one launch beats three (two GEMMs and a
// pointwise kernel, ~5-11 us of launch overhead each). As the batch grows the step becomes
// compute-bound, where cuBLAS wins; all the more where it has tensor cores and the fused kernel has
// only FFMA:
// - float32: exact fp32 FFMA in both paths by default, so the fused kernel keeps batches up to 64.
//   When the user allows TF32 (torch.backends.cuda.matmul.allow_tf32), cuBLAS runs the product on
//   tensor cores at 5-15x the FFMA rate, so the fused kernel keeps only the weight-streaming
//   regime, batch <= 8. Results then change at that boundary from fp32 to TF32 rounding, which
//   is what allowing TF32 permits (nn.LSTMCell's own products are TF32 at every batch then).
// - half/bfloat16: cuBLAS always has tensor cores. At hidden >= 512 (4H >= 2048 output columns,
//   enough tiles to fill the GPU) they pay from batch ~16; below that the step stays launch- and
//   weight-bound up to batch 32.
// These limits are reasoned from peak rates and launch costs, NOT measured: no GPU was available
// when they were written. benchmarks/gpu_proof.sh measures the cell per dtype over batch and hidden
// sizes; tune them from its table.
struct FusedForwardLimits {
  static constexpr int64_t kFloat = 64;
  static constexpr int64_t kFloatTf32 = 8;
  static constexpr int64_t kReduced = 32;
  static constexpr int64_t kReducedLargeHidden = 16;
  static constexpr int64_t kLargeHidden = 512;
};

enum class ForwardDtype { kDouble, kFloat, kReduced };

inline bool use_fused_forward(int64_t batch, int64_t hidden_size, ForwardDtype dtype, bool allow_tf32) {
  using L = FusedForwardLimits;
  int64_t limit = L::kFloat;
  if (dtype == ForwardDtype::kReduced) {
    limit = hidden_size >= L::kLargeHidden ? L::kReducedLargeHidden : L::kReduced;
  } else if (dtype == ForwardDtype::kFloat && allow_tf32) {
    limit = L::kFloatTf32;
  }
  if (batch > limit) {
    return false;
  }
  // The fused grid is one dimension of ceil(H / units_per_block) * batch_tiles blocks; at most 8
  // units share a block and tiles hold at least 1 row, so this bound is conservative.
  return hidden_size * batch <= INT_MAX;
}

struct ForwardShape {
  int64_t batch;
  int64_t hidden_size;
  int64_t input_size;
  int64_t batch_tiles;   // ceil(batch / kBatchTile)
  int units_per_block;   // hidden units of one block = kForwardWarps / warps_per_unit
  int warps_per_unit;    // the warps that split one unit's K range (1, 2, 4 or 8)
  int chunk_elements;    // staged K elements per chunk (a multiple of the vector width)
  bool vectorized_ih;    // whether the W_ih / input segment allows 16-byte loads
  bool vectorized_hh;
};

// The launch of one fused step: its shape, grid and dynamic shared memory.
struct ForwardPlan {
  ForwardShape shape;
  int batch_tile;
  int64_t blocks;
  size_t shared_bytes;
};

template <typename scalar_t>
ForwardPlan plan_fused_forward(
    int64_t batch,
    int64_t input_size,
    int64_t hidden_size,
    bool aligned_ih,  // input and weight_ih start on a 16-byte boundary
    bool aligned_hh,
    int multiprocessors) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorWidth<scalar_t>;
  ForwardPlan plan;
  plan.batch_tile = fused_batch_tile<scalar_t>(batch);
  ForwardShape& shape = plan.shape;
  shape.batch = batch;
  shape.input_size = input_size;
  shape.hidden_size = hidden_size;
  shape.batch_tiles = ceil_div(batch, plan.batch_tile);
  // 16-byte loads need every row of the segment to start on a 16-byte boundary.
  shape.vectorized_ih = input_size % kVec == 0 && aligned_ih;
  shape.vectorized_hh = hidden_size % kVec == 0 && aligned_hh;

  // A chunk holds the longer segment whole when it fits; a multiple of the vector width so every
  // chunk of a vectorised segment starts aligned.
  const int64_t chunk_limit = kStageBytes / (plan.batch_tile * static_cast<int64_t>(sizeof(opmath_t)));
  const int64_t longest_segment = std::max(input_size, hidden_size);
  shape.chunk_elements = static_cast<int>(std::min(chunk_limit, std::max<int64_t>(1, ceil_div(longest_segment, kVec)) * kVec));

  // Split a unit's K range over several warps of the block when there would otherwise be too few
  // blocks to occupy the GPU (small hidden sizes) and K is long enough for each warp to get at
  // least two 32-lane vector steps. To be tuned by measurement on the GPU.
  const int64_t target_blocks = 2 * static_cast<int64_t>(multiprocessors);
  const int64_t k_vectors = ceil_div(input_size, kVec) + ceil_div(hidden_size, kVec);
  const auto blocks_for = [&](int warps_per_unit) {
    return ceil_div(hidden_size, kForwardWarps / warps_per_unit) * shape.batch_tiles;
  };
  int warps_per_unit = 1;
  while (warps_per_unit < kForwardWarps && blocks_for(warps_per_unit) < target_blocks &&
         k_vectors >= 2 * kWarpSize * (2 * warps_per_unit)) {
    warps_per_unit *= 2;
  }
  shape.warps_per_unit = warps_per_unit;
  shape.units_per_block = kForwardWarps / warps_per_unit;
  plan.blocks = blocks_for(warps_per_unit);
  plan.shared_bytes = static_cast<size_t>(plan.batch_tile) * shape.chunk_elements * sizeof(opmath_t);
  return plan;
}

// ------------------------------------------------------------------------------------------------
// Fused forward: device code
// ------------------------------------------------------------------------------------------------

// Copies rows [batch_begin, batch_begin + kBatchTile) x columns [k_begin, k_begin + length) of a
// contiguous [batch, row_length] activation into the shared tile, converted to the compute type
// once here rather than at each of its 4 * units uses; rows past the batch read as 0 so the
// accumulation needs no bounds test. Row loop outside, so no division per element.
template <int kVec, int kBatchTile, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void stage_activations(
    opmath_t* __restrict__ tile,
    int tile_stride,
    const scalar_t* __restrict__ activations,
    int64_t batch,
    int64_t row_length,
    int64_t batch_begin,
    int64_t k_begin,
    int length) {
  using vector_t = Vector<scalar_t, kVec>;
  using staged_t = Vector<opmath_t, kVec>;
  const int vectors_per_row = length / kVec;
#pragma unroll
  for (int row = 0; row < kBatchTile; ++row) {
    const bool row_in_batch = batch_begin + row < batch;
    const scalar_t* source = activations + (batch_begin + row) * row_length + k_begin;
    for (int vector = threadIdx.x; vector < vectors_per_row; vector += blockDim.x) {
      staged_t staged;
      if (row_in_batch) {
        const vector_t value = *reinterpret_cast<const vector_t*>(source + vector * kVec);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          staged.values[e] = static_cast<opmath_t>(value.values[e]);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          staged.values[e] = opmath_t(0);
        }
      }
      *reinterpret_cast<staged_t*>(tile + row * tile_stride + vector * kVec) = staged;
    }
  }
}

// The weight vectors of one unroll group: kSteps vectors of each of the unit's four gate rows.
template <int kVec, int kSteps, typename scalar_t>
__device__ __forceinline__ void load_weight_group(
    Vector<scalar_t, kVec> (&weights)[kSteps][4],
    const scalar_t* __restrict__ weight_rows,  // row j of the segment's weight, at the chunk's start
    int64_t gate_row_stride,                   // elements from gate row g to gate row g + 1 (H * K_segment)
    int base,
    int vector_stride,
    int vectors) {
  using vector_t = Vector<scalar_t, kVec>;
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int vector = base + step * vector_stride;
    if (vector < vectors) {
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        weights[step][gate] = *reinterpret_cast<const vector_t*>(weight_rows + gate * gate_row_stride + vector * kVec);
      }
    }
  }
}

// One warp's share of a staged chunk: the lanes (and, with warps_per_unit > 1, the unit's warps)
// stride over the chunk's vectors; each lane multiplies the vectors of the unit's four gate rows
// that it loaded with the same K positions of every batch row of the tile. A weight element is thus
// read from global memory once per block and reused kBatchTile times from registers; it never goes
// through shared memory because no other thread needs it. `weights` arrives holding the chunk's
// first group, loaded before the staging barrier (the weights do not depend on the tile).
template <int kVec, int kBatchTile, typename scalar_t, typename opmath_t>
__device__ __forceinline__ void accumulate_chunk(
    opmath_t (&accumulators)[4][kBatchTile],
    Vector<scalar_t, kVec> (&weights)[kUnroll<scalar_t, kBatchTile>][4],
    const scalar_t* __restrict__ weight_rows,
    int64_t gate_row_stride,
    const opmath_t* __restrict__ tile,
    int tile_stride,
    int vectors,
    int first_vector,
    int vector_stride) {
  using staged_t = Vector<opmath_t, kVec>;
  constexpr int kSteps = kUnroll<scalar_t, kBatchTile>;
  for (int base = first_vector; base < vectors; base += kSteps * vector_stride) {
    if (base != first_vector) {
      load_weight_group<kVec, kSteps>(weights, weight_rows, gate_row_stride, base, vector_stride, vectors);
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
          const staged_t x = *reinterpret_cast<const staged_t*>(tile + row * tile_stride + vector * kVec);
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
#pragma unroll
            for (int gate = 0; gate < 4; ++gate) {
              accumulators[gate][row] += weight_values[gate][e] * x.values[e];
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
    opmath_t* __restrict__ tile,
    const scalar_t* __restrict__ activations,  // [batch, segment_length]
    const scalar_t* __restrict__ weight,       // [4 * H, segment_length]
    int64_t segment_length,
    const ForwardShape& shape,
    int64_t batch_begin,
    int64_t unit,
    bool unit_in_range,
    int first_vector,
    int vector_stride) {
  constexpr int kSteps = kUnroll<scalar_t, kBatchTile>;
  const int tile_stride = shape.chunk_elements;
  const int64_t gate_row_stride = shape.hidden_size * segment_length;
  for (int64_t k_begin = 0; k_begin < segment_length; k_begin += shape.chunk_elements) {
    const int64_t remaining = segment_length - k_begin;
    const int length = remaining < shape.chunk_elements ? static_cast<int>(remaining) : shape.chunk_elements;
    const int vectors = length / kVec;
    const scalar_t* weight_rows = weight + unit * segment_length + k_begin;
    // Issued before the barriers, so the first weight loads are in flight while the block waits
    // for the previous chunk's consumers and stages this chunk.
    Vector<scalar_t, kVec> weights[kSteps][4];
    if (unit_in_range) {
      load_weight_group<kVec, kSteps>(weights, weight_rows, gate_row_stride, first_vector, vector_stride, vectors);
    }
    __syncthreads();  // the previous chunk has been consumed by every warp
    stage_activations<kVec, kBatchTile>(
        tile, tile_stride, activations, shape.batch, segment_length, batch_begin, k_begin, length);
    __syncthreads();
    if (unit_in_range) {
      accumulate_chunk<kVec, kBatchTile>(
          accumulators, weights, weight_rows, gate_row_stride, tile, tile_stride, vectors, first_vector,
          vector_stride);
    }
  }
}

template <typename scalar_t, int kBatchTile>
__global__ void __launch_bounds__(kForwardThreads, kForwardMinBlocksPerSm) cell_forward_fused_kernel(
    const scalar_t* __restrict__ input,      // [B, I]
    const scalar_t* __restrict__ hx,         // [B, H]
    const scalar_t* __restrict__ cx,         // [B, H]
    const scalar_t* __restrict__ weight_ih,  // [4H, I]
    const scalar_t* __restrict__ weight_hh,  // [4H, H]
    const scalar_t* __restrict__ bias_ih,    // [4H] or null
    const scalar_t* __restrict__ bias_hh,    // [4H] or null
    scalar_t* __restrict__ hy,               // [B, H]
    scalar_t* __restrict__ cy,               // [B, H]
    scalar_t* __restrict__ gates,            // [B, 4H], activated i, f, g, o; null when not wanted
    const ForwardShape shape) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVectorWidth<scalar_t>;
  LSTM_FUSED_DYNAMIC_SHARED(opmath_t, tile);
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

  // The epilogue's (row, unit) of this thread, known now: its cx is loaded before the K loop, so
  // the load's latency hides behind the products instead of stalling the epilogue.
  const int tile_elements = kBatchTile * shape.units_per_block;
  const int epilogue_row = threadIdx.x / shape.units_per_block;
  const int epilogue_unit_in_block = threadIdx.x % shape.units_per_block;
  const int64_t batch_row = batch_begin + epilogue_row;
  const int64_t epilogue_unit = unit_block * shape.units_per_block + epilogue_unit_in_block;
  const bool writes_epilogue =
      static_cast<int>(threadIdx.x) < tile_elements && batch_row < shape.batch && epilogue_unit < shape.hidden_size;
  const int64_t state_offset = batch_row * shape.hidden_size + epilogue_unit;
  const opmath_t cell_prev = writes_epilogue ? static_cast<opmath_t>(cx[state_offset]) : opmath_t(0);

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
  if (writes_epilogue) {
    const int64_t H = shape.hidden_size;
    opmath_t preactivation[4];
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      opmath_t sum = opmath_t(0);
      for (int part = 0; part < shape.warps_per_unit; ++part) {
        sum += partial_sums[((part * kBatchTile + epilogue_row) * 4 + gate) * shape.units_per_block + epilogue_unit_in_block];
      }
      if (bias_ih != nullptr) {
        sum += static_cast<opmath_t>(bias_ih[gate * H + epilogue_unit]);
      }
      if (bias_hh != nullptr) {
        sum += static_cast<opmath_t>(bias_hh[gate * H + epilogue_unit]);
      }
      preactivation[gate] = sum;
    }
    const auto step = math::cell_forward(
        math::Gates<opmath_t>{preactivation[0], preactivation[1], preactivation[2], preactivation[3]}, cell_prev);
    // Inference (no autograd, no gate introspection) needs no activated gates: 4H of the 6H
    // elements a step writes.
    if (gates != nullptr) {
      scalar_t* gate_row = gates + batch_row * 4 * H + epilogue_unit;
      gate_row[0] = static_cast<scalar_t>(step.gates.input);
      gate_row[H] = static_cast<scalar_t>(step.gates.forget);
      gate_row[2 * H] = static_cast<scalar_t>(step.gates.cell);
      gate_row[3 * H] = static_cast<scalar_t>(step.gates.output);
    }
    cy[state_offset] = static_cast<scalar_t>(step.cell_state);
    hy[state_offset] = static_cast<scalar_t>(step.hidden_state);
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

inline PointwiseLaunch pointwise_launch(int64_t batch, int64_t hidden_size, int multiprocessors) {
  constexpr int kThreads = 256;
  const int threads_x = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(hidden_size, kWarpSize) * kWarpSize));
  const int threads_y = kThreads / threads_x;
  // A few waves of resident blocks; the loops cover the rest.
  const int64_t max_blocks = 32 * static_cast<int64_t>(multiprocessors);
  const int64_t blocks_x = std::min<int64_t>(ceil_div(hidden_size, threads_x), max_blocks);
  const int64_t blocks_y =
      std::min<int64_t>({ceil_div(batch, threads_y), 65535, std::max<int64_t>(1, max_blocks / blocks_x)});
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
// Launches, shared by the GPU build and the emulated one: raw pointers of contiguous tensors in,
// checks and allocation stay with the caller.
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardPointers {
  const scalar_t* input;
  const scalar_t* hx;
  const scalar_t* cx;
  const scalar_t* weight_ih;
  const scalar_t* weight_hh;
  const scalar_t* bias_ih;  // null when absent
  const scalar_t* bias_hh;
  scalar_t* hy;
  scalar_t* cy;
  scalar_t* gates;  // null when the activated gates are not wanted
};

inline bool aligned_16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

template <typename scalar_t, int kBatchTile>
void launch_fused_forward_tile(const ForwardPointers<scalar_t>& p, const ForwardPlan& plan, cudaStream_t stream) {
  const auto kernel = cell_forward_fused_kernel<scalar_t, kBatchTile>;
  LSTM_FUSED_LAUNCH(
      kernel, dim3(static_cast<unsigned int>(plan.blocks)), dim3(kForwardThreads), plan.shared_bytes, stream,
      p.input, p.hx, p.cx, p.weight_ih, p.weight_hh, p.bias_ih, p.bias_hh, p.hy, p.cy, p.gates, plan.shape);
}

// Returns the plan it launched (the tests read the tile it chose). batch and hidden_size > 0, and
// use_fused_forward() true for the shape.
template <typename scalar_t>
ForwardPlan launch_fused_forward(
    const ForwardPointers<scalar_t>& p,
    int64_t batch,
    int64_t input_size,
    int64_t hidden_size,
    int multiprocessors,
    cudaStream_t stream) {
  const ForwardPlan plan = plan_fused_forward<scalar_t>(
      batch, input_size, hidden_size, aligned_16(p.input) && aligned_16(p.weight_ih),
      aligned_16(p.hx) && aligned_16(p.weight_hh), multiprocessors);
  // use_fused_forward bounds hidden * batch by INT_MAX, which bounds the grid.
  if (plan.blocks <= 0 || plan.blocks > INT_MAX) {
    return plan;
  }
  // `if constexpr`: a dtype's kernels are instantiated only for the tiles it uses.
  constexpr int kMaxTile = kMaxBatchTile<scalar_t>;
  switch (plan.batch_tile) {
    case 1:
      launch_fused_forward_tile<scalar_t, 1>(p, plan, stream);
      break;
    case 4:
      launch_fused_forward_tile<scalar_t, 4>(p, plan, stream);
      break;
    case 8:
      if constexpr (kMaxTile >= 8) {
        launch_fused_forward_tile<scalar_t, 8>(p, plan, stream);
      }
      break;
    default:
      if constexpr (kMaxTile >= 16) {
        launch_fused_forward_tile<scalar_t, 16>(p, plan, stream);
      }
      break;
  }
  return plan;
}

// batch and hidden_size > 0.
template <typename scalar_t>
void launch_cell_pointwise(
    scalar_t* gates,
    const scalar_t* cx,
    const scalar_t* bias,
    scalar_t* hy,
    scalar_t* cy,
    int64_t batch,
    int64_t hidden_size,
    int multiprocessors,
    cudaStream_t stream) {
  const PointwiseLaunch launch = pointwise_launch(batch, hidden_size, multiprocessors);
  if (bias != nullptr) {
    const auto kernel = cell_pointwise_kernel<scalar_t, true>;
    LSTM_FUSED_LAUNCH(kernel, launch.grid, launch.block, 0, stream, gates, cx, bias, hy, cy, batch, hidden_size);
  } else {
    const auto kernel = cell_pointwise_kernel<scalar_t, false>;
    LSTM_FUSED_LAUNCH(kernel, launch.grid, launch.block, 0, stream, gates, cx, bias, hy, cy, batch, hidden_size);
  }
}

template <typename scalar_t, bool kHasGradHidden, bool kHasGradCell, bool kHasGradGates>
void launch_cell_gate_grads_variant(
    const PointwiseLaunch& launch,
    cudaStream_t stream,
    const scalar_t* grad_hidden,
    const scalar_t* grad_cell,
    const scalar_t* grad_gates,
    const scalar_t* cell_prev,
    const scalar_t* cell_state,
    const scalar_t* gates,
    scalar_t* grad_preactivation,
    scalar_t* grad_cell_prev,
    int64_t batch,
    int64_t hidden_size) {
  const auto kernel = cell_gate_grads_kernel<scalar_t, kHasGradHidden, kHasGradCell, kHasGradGates>;
  LSTM_FUSED_LAUNCH(
      kernel, launch.grid, launch.block, 0, stream, grad_hidden, grad_cell, grad_gates, cell_prev, cell_state, gates,
      grad_preactivation, grad_cell_prev, batch, hidden_size);
}

// batch and hidden_size > 0; absent incoming gradients are null.
template <typename scalar_t>
void launch_cell_gate_grads(
    const scalar_t* grad_hidden,
    const scalar_t* grad_cell,
    const scalar_t* grad_gates,
    const scalar_t* cell_prev,
    const scalar_t* cell_state,
    const scalar_t* gates,
    scalar_t* grad_preactivation,
    scalar_t* grad_cell_prev,
    int64_t batch,
    int64_t hidden_size,
    int multiprocessors,
    cudaStream_t stream) {
  const PointwiseLaunch launch = pointwise_launch(batch, hidden_size, multiprocessors);
  const int variant = (grad_hidden != nullptr ? 4 : 0) + (grad_cell != nullptr ? 2 : 0) + (grad_gates != nullptr ? 1 : 0);
#define LSTM_FUSED_GATE_GRADS(h, c, g)                                                                             \
  launch_cell_gate_grads_variant<scalar_t, h, c, g>(                                                               \
      launch, stream, grad_hidden, grad_cell, grad_gates, cell_prev, cell_state, gates, grad_preactivation,        \
      grad_cell_prev, batch, hidden_size)
  switch (variant) {
    case 0: LSTM_FUSED_GATE_GRADS(false, false, false); break;
    case 1: LSTM_FUSED_GATE_GRADS(false, false, true); break;
    case 2: LSTM_FUSED_GATE_GRADS(false, true, false); break;
    case 3: LSTM_FUSED_GATE_GRADS(false, true, true); break;
    case 4: LSTM_FUSED_GATE_GRADS(true, false, false); break;
    case 5: LSTM_FUSED_GATE_GRADS(true, false, true); break;
    case 6: LSTM_FUSED_GATE_GRADS(true, true, false); break;
    default: LSTM_FUSED_GATE_GRADS(true, true, true); break;
  }
#undef LSTM_FUSED_GATE_GRADS
}

// ------------------------------------------------------------------------------------------------
// Persistent sequence forward: one cooperative launch runs every step of a layer direction
// ------------------------------------------------------------------------------------------------
//
// The host does no work per step: the input projection of all steps (x W_ih^T + both biases) is
// one GEMM before the launch, and the kernel loops over the steps itself. Each block owns
// kSequenceUnits hidden units and keeps their four gate rows of W_hh resident in shared memory
// across all steps; each step it stages h_{t-1} (all units, written by every block the step
// before), computes its units' gates for every batch row, updates c and h, and the grid meets at a
// grid-wide barrier before the next step reads the new h. Shapes whose weights or states do not fit
// on chip, or whose grid cannot be co-resident, are refused (plan.fits false) and the op runs the
// device-independent loop instead (csrc/cuda/op_layer.h, csrc/sequence.cpp). The recurrent product
// runs on tensor cores for half/bfloat16 (float32 accumulation), on exact FFMA for float and double.
//
// With a projection (nn.LSTM's proj_size P > 0: h_t = W_hr (o * tanh(c_t)), h of width P) the
// recurrent product reads the projected h [B, P] and the cell update writes u = o * tanh(c) into a
// [B, H] scratch; one more grid barrier makes every unit's u visible, and each block then computes
// its kSequenceUnits rows of h = u W_hr^T from W_hr's rows, resident like W_hh's (FFMA in both
// kernels: the projection's product is the same code whichever primitive the recurrent one uses).

#if !defined(LSTM_FUSED_CUDA_EMULATION)
// cudaLaunchCooperativeKernel takes its arguments as an array of pointers to them.
// The arguments are converted to the kernel's parameter types first: the pointers must point at
// objects of exactly those types.
template <typename... Params>
void launch_cooperative_kernel(
    void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
    std::type_identity_t<Params>... args) {
  void* pointers[] = {static_cast<void*>(&args)...};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(kernel), grid, block, pointers, shared_bytes, stream));
}
#endif

constexpr int kSequenceWarps = 8;
constexpr int kSequenceThreads = kSequenceWarps * kWarpSize;
constexpr int kSequenceUnits = kSequenceWarps;  // one warp per hidden unit of the block
constexpr int kSequenceRowTile = 4;             // batch rows accumulated together per warp

struct SequenceShape {
  int64_t steps;
  int64_t batch;
  int64_t hidden_size;
  bool reverse;
  // The width of the recurrent state h: proj_size with a projection (h_t = W_hr (o * tanh(c_t))),
  // else hidden_size. The K of the recurrent product.
  int64_t output_size;
  // Steps of c the forward's cell_states holds: 0, every step ([T, B, H], what backward reads);
  // 2 for sequence_inference, step t's c in slot t % 2 (a step reads only its predecessor's).
  int64_t cell_state_slots = 0;
};

__device__ __forceinline__ int64_t cell_state_slot(const SequenceShape& shape, int64_t t) {
  return shape.cell_state_slots > 0 ? t % shape.cell_state_slots : t;
}

struct SequencePlan {
  int64_t blocks;
  size_t shared_bytes;
  bool fits;
  bool tensor_cores;  // the forward's product on tensor cores (sequence_forward_persistent_mma_kernel)
};

// Tensor cores for half and bfloat16 (16x16x16 fragments), and for float32 as TF32 (16x16x8) only
// where the user allows TF32: torch.backends.cuda.matmul.allow_tf32, which the op layer reads
// through at::globalContext() as cuBLAS does. By default float32 stays on exact FFMA, as nn.LSTM's
// own products do. The recurrent product's K (the state width: hidden_size, or proj_size with a
// projection) must be a multiple of 16 (K tiles, and 32-byte aligned rows of the staged tiles).
// Double always takes FFMA.
constexpr int kMmaTile = 16;

template <typename scalar_t>
bool sequence_uses_tensor_cores(int64_t state_size, bool allow_tf32) {
  const bool has_fragments = sizeof(scalar_t) == 2 || (std::is_same_v<scalar_t, float> && allow_tf32);
  return has_fragments && state_size % kMmaTile == 0;
}

// The K depth of one fragment product: 16 for half/bfloat16, 8 for TF32.
template <typename scalar_t>
constexpr int kMmaDepth = std::is_same_v<scalar_t, float> ? 8 : kMmaTile;

// How the tensor-core forward splits a block's product [rows, 4 * kSequenceUnits = 32 columns]
// over its 8 warps: 16x16 output tiles (2 per 16 rows), and, when there are fewer tiles than
// warps, the K range of each tile split over several warps whose partial tiles the epilogue adds.
struct MmaSplit {
  int64_t padded_rows;  // the batch rounded up to 16
  int tiles;
  int splits;
  int items;  // tiles * splits: one warp's share of the product each
};

LSTM_FUSED_HOST_DEVICE MmaSplit mma_split(int64_t batch) {
  MmaSplit m;
  m.padded_rows = (batch + kMmaTile - 1) / kMmaTile * kMmaTile;
  m.tiles = static_cast<int>(m.padded_rows / kMmaTile * 2);
  m.splits = m.tiles >= kSequenceWarps ? 1 : kSequenceWarps / m.tiles;
  m.items = m.tiles * m.splits;
  return m;
}

// A persistent forward block's shared memory, in this order: the recurrent product's regions
// (FFMA: h_{t-1} [B][P] as the compute type, then the gate rows of W_hh [4][kSequenceUnits][P];
// tensor cores: the warps' float partial tiles, h_{t-1} [padded rows][P] in the storage type, the
// gate rows), rounded up to 16 bytes; then, with a projection, o * tanh(c) of every row and unit
// [B][H] as the compute type and the block's rows of W_hr [kSequenceUnits][H]. The plan sizes the
// launch and the kernels find their regions with the same functions.
template <typename scalar_t>
LSTM_FUSED_HOST_DEVICE size_t forward_recurrent_shared_bytes(int64_t batch, int64_t state_size, bool tensor_cores) {
  using opmath_t = at::opmath_type<scalar_t>;
  const size_t weight_bytes = static_cast<size_t>(4 * kSequenceUnits * state_size) * sizeof(scalar_t);
  size_t bytes = static_cast<size_t>(batch * state_size) * sizeof(opmath_t) + weight_bytes;
  if (tensor_cores) {
    const MmaSplit split = mma_split(batch);
    bytes = static_cast<size_t>(split.items) * kMmaTile * kMmaTile * sizeof(float) +
        static_cast<size_t>(split.padded_rows * state_size) * sizeof(scalar_t) + weight_bytes;
  }
  return (bytes + 15) / 16 * 16;
}

template <typename scalar_t>
LSTM_FUSED_HOST_DEVICE size_t forward_projection_shared_bytes(int64_t batch, int64_t hidden_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  return static_cast<size_t>(batch * hidden_size) * sizeof(opmath_t) +
      static_cast<size_t>(kSequenceUnits * hidden_size) * sizeof(scalar_t);
}

// max_shared_bytes: the device's opt-in limit per block; max_blocks: how many blocks of this
// kernel at shared_bytes can be co-resident (occupancy x SMs), 0 when cooperative launches are
// unsupported. projection_size: proj_size, 0 without a projection. Blocks own kSequenceUnits
// hidden units each for the cell update and kSequenceUnits projection rows each for h = W_hr u,
// so the grid covers the projection only where proj_size <= hidden_size (nn.LSTM requires less).
template <typename scalar_t>
SequencePlan plan_persistent_sequence(
    int64_t batch, int64_t hidden_size, int64_t projection_size, bool allow_tf32, size_t max_shared_bytes,
    int64_t max_blocks) {
  SequencePlan plan;
  const int64_t state_size = projection_size > 0 ? projection_size : hidden_size;
  plan.blocks = ceil_div(hidden_size, kSequenceUnits);
  plan.tensor_cores = sequence_uses_tensor_cores<scalar_t>(state_size, allow_tf32);
  plan.shared_bytes = forward_recurrent_shared_bytes<scalar_t>(batch, state_size, plan.tensor_cores) +
      (projection_size > 0 ? forward_projection_shared_bytes<scalar_t>(batch, hidden_size) : 0);
  plan.fits = batch > 0 && hidden_size > 0 && projection_size >= 0 && projection_size <= hidden_size &&
      plan.shared_bytes <= max_shared_bytes && plan.blocks <= max_blocks;
  return plan;
}

// Once for all steps: a block's gate rows of W_hh [4H, K], [4][kSequenceUnits][K] (row
// g * kSequenceUnits + u is gate g of unit unit_base + u), zeros past the last unit. The first
// step's barrier orders these writes before their reads.
template <typename scalar_t>
__device__ __forceinline__ void load_resident_gate_rows(
    scalar_t* __restrict__ resident, const scalar_t* __restrict__ weight_hh, int64_t unit_base, int64_t H, int64_t K) {
  const int64_t weight_elements = 4 * kSequenceUnits * K;
  for (int64_t index = threadIdx.x; index < weight_elements; index += blockDim.x) {
    const int64_t row = index / K;
    const int64_t k = index - row * K;
    const int64_t gate = row / kSequenceUnits;
    const int64_t row_unit = unit_base + row % kSequenceUnits;
    resident[index] = row_unit < H ? weight_hh[(gate * H + row_unit) * K + k] : scalar_t(0);
  }
}

// The projection's part of a persistent forward block: where o * tanh(c) of the step is staged,
// and the block's rows of W_hr, resident across steps. Null pointers without a projection.
template <typename scalar_t>
struct SequenceProjection {
  at::opmath_type<scalar_t>* staged_unprojected;  // [B][H]
  scalar_t* resident_rows;                        // [kSequenceUnits][H]: rows row_base + r, zeros past P
  int64_t row_base;
};

template <typename scalar_t>
__device__ __forceinline__ SequenceProjection<scalar_t> load_sequence_projection(
    unsigned char* shared, const SequenceShape& shape, bool tensor_cores, const scalar_t* __restrict__ weight_hr) {
  using opmath_t = at::opmath_type<scalar_t>;
  SequenceProjection<scalar_t> projection{nullptr, nullptr, static_cast<int64_t>(blockIdx.x) * kSequenceUnits};
  if (weight_hr == nullptr) {
    return projection;
  }
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t P = shape.output_size;
  projection.staged_unprojected = reinterpret_cast<opmath_t*>(
      shared + forward_recurrent_shared_bytes<scalar_t>(B, P, tensor_cores));
  projection.resident_rows = reinterpret_cast<scalar_t*>(projection.staged_unprojected + B * H);
  for (int64_t index = threadIdx.x; index < kSequenceUnits * H; index += blockDim.x) {
    const int64_t r = index / H;
    const int64_t k = index - r * H;
    const int64_t p = projection.row_base + r;
    projection.resident_rows[index] = p < P ? weight_hr[p * H + k] : scalar_t(0);
  }
  return projection;
}

// Visit s of the forward: the step t it computes, and the state it starts from (hx, cx at the
// first visit, else the previous visit's rows of output [T, B, P] and cell_states [T, B, H], or
// its slot of cell_states [2, B, H] for sequence_inference).
template <typename scalar_t>
struct SequenceVisit {
  int64_t t;
  const scalar_t* h_prev;
  const scalar_t* c_prev;
};

template <typename scalar_t>
__device__ __forceinline__ SequenceVisit<scalar_t> sequence_visit(
    const SequenceShape& shape, int64_t s, const scalar_t* hx, const scalar_t* cx, const scalar_t* output,
    const scalar_t* cell_states) {
  const int64_t t = shape.reverse ? shape.steps - 1 - s : s;
  const int64_t t_prev = shape.reverse ? t + 1 : t - 1;
  return {t, s == 0 ? hx : output + t_prev * shape.batch * shape.output_size,
          s == 0 ? cx : cell_states + cell_state_slot(shape, t_prev) * shape.batch * shape.hidden_size};
}

// The cell update of one (row, unit) at visit s from its four pre-activations, and its writes: c
// into the step's rows, the activated gates (when wanted), c_n at the last visit, and o * tanh(c):
// as the step's h (and h_n at the last visit) without a projection, into `unprojected` [B, H]
// with one (project_sequence_step then writes h).
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void finish_sequence_unit(
    const opmath_t (&preactivation)[4],
    const SequenceShape& shape,
    const SequenceVisit<scalar_t>& visit,
    int64_t s,
    int64_t row,
    int64_t unit,
    scalar_t* output,
    scalar_t* cell_states,
    scalar_t* __restrict__ gates,
    scalar_t* __restrict__ hy,
    scalar_t* __restrict__ cy,
    scalar_t* unprojected) {
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t state_offset = row * H + unit;
  const auto step = math::cell_forward(
      math::Gates<opmath_t>{preactivation[0], preactivation[1], preactivation[2], preactivation[3]},
      static_cast<opmath_t>(visit.c_prev[state_offset]));
  const scalar_t h_new = static_cast<scalar_t>(step.hidden_state);
  const scalar_t c_new = static_cast<scalar_t>(step.cell_state);
  if (unprojected != nullptr) {
    unprojected[state_offset] = h_new;
  } else {
    output[visit.t * B * H + state_offset] = h_new;
  }
  cell_states[cell_state_slot(shape, visit.t) * B * H + state_offset] = c_new;
  if (gates != nullptr) {
    scalar_t* gate_row = gates + (visit.t * B + row) * 4 * H + unit;
    gate_row[0] = static_cast<scalar_t>(step.gates.input);
    gate_row[H] = static_cast<scalar_t>(step.gates.forget);
    gate_row[2 * H] = static_cast<scalar_t>(step.gates.cell);
    gate_row[3 * H] = static_cast<scalar_t>(step.gates.output);
  }
  if (s == shape.steps - 1) {
    if (unprojected == nullptr) {
      hy[state_offset] = h_new;
    }
    cy[state_offset] = c_new;
  }
}

// The projection of visit s, after the grid barrier that follows the cell update: h_t[b, p] =
// sum_k u[b, k] W_hr[p, k] for the block's projection rows p (one warp each; lanes split k, a
// butterfly adds them), from u = o * tanh(c) of every unit, which every block wrote. Writes the
// step's rows of output [T, B, P] and, at the last visit, h_n.
template <typename scalar_t>
__device__ __forceinline__ void project_sequence_step(
    const SequenceProjection<scalar_t>& projection,
    const scalar_t* unprojected,
    const SequenceShape& shape,
    int64_t s,
    int64_t t,
    scalar_t* output,
    scalar_t* __restrict__ hy) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t P = shape.output_size;
  opmath_t* staged = projection.staged_unprojected;
  for (int64_t index = threadIdx.x; index < B * H; index += blockDim.x) {
    staged[index] = static_cast<opmath_t>(unprojected[index]);
  }
  __syncthreads();
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t p = projection.row_base + warp;
  if (p >= P) {
    return;
  }
  const scalar_t* weight_row = projection.resident_rows + warp * H;
  for (int64_t row_begin = 0; row_begin < B; row_begin += kSequenceRowTile) {
    opmath_t sums[kSequenceRowTile];
#pragma unroll
    for (int r = 0; r < kSequenceRowTile; ++r) {
      sums[r] = opmath_t(0);
    }
    for (int64_t k = lane; k < H; k += kWarpSize) {
      const opmath_t w = static_cast<opmath_t>(weight_row[k]);
#pragma unroll
      for (int r = 0; r < kSequenceRowTile; ++r) {
        // Rows past the batch read row 0 (any valid row): their sums are never stored.
        const int64_t row = row_begin + r < B ? row_begin + r : 0;
        sums[r] += w * staged[row * H + k];
      }
    }
#pragma unroll
    for (int r = 0; r < kSequenceRowTile; ++r) {
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], offset);
      }
    }
#pragma unroll
    for (int r = 0; r < kSequenceRowTile; ++r) {
      const int64_t row = row_begin + r;
      if (lane == r && row < B) {
        const scalar_t h_new = static_cast<scalar_t>(sums[r]);
        output[(t * B + row) * P + p] = h_new;
        if (s == shape.steps - 1) {
          hy[row * P + p] = h_new;
        }
      }
    }
  }
}

// The end of a forward visit, in either kernel: with a projection, the grid barrier that makes
// every unit's o * tanh(c) visible, then h = W_hr u; then the step's barrier, which publishes h and
// c to the other blocks and keeps this block from restaging its shared memory while one of its
// warps may still read it.
template <typename scalar_t>
__device__ __forceinline__ void finish_sequence_visit(
    const SequenceProjection<scalar_t>& projection,
    const scalar_t* unprojected,
    const SequenceShape& shape,
    int64_t s,
    int64_t t,
    scalar_t* output,
    scalar_t* __restrict__ hy) {
  if (unprojected != nullptr) {
    __threadfence();
    cooperative_groups::this_grid().sync();
    project_sequence_step(projection, unprojected, shape, s, t, output, hy);
  }
  __threadfence();
  cooperative_groups::this_grid().sync();
}

// `output`, `cell_states` and `unprojected` are written by every block and read by every block
// after a grid barrier: no __restrict__ and no const on them, so the compiler never routes their
// reads through the non-coherent read-only cache, which would miss another block's writes.
template <typename scalar_t>
__global__ void __launch_bounds__(kSequenceThreads) sequence_forward_persistent_kernel(
    const scalar_t* __restrict__ projected,  // [T, B, 4H]: x W_ih^T + bias_ih + bias_hh, per step
    const scalar_t* __restrict__ weight_hh,  // [4H, P]
    const scalar_t* __restrict__ hx,         // [B, P]
    const scalar_t* __restrict__ cx,         // [B, H]
    scalar_t* output,                        // [T, B, P]: h of every step
    scalar_t* cell_states,                   // [T, B, H]: c of every step
    scalar_t* __restrict__ gates,            // [T, B, 4H], activated i, f, g, o; null when not wanted
    scalar_t* __restrict__ hy,               // [B, P]: h after the last step visited
    scalar_t* __restrict__ cy,               // [B, H]
    const scalar_t* __restrict__ weight_hr,  // [P, H], or null without a projection (then P = H)
    scalar_t* unprojected,                   // [B, H]: o * tanh(c) of the step; null without a projection
    const SequenceShape shape) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t P = shape.output_size;
  LSTM_FUSED_DYNAMIC_SHARED(opmath_t, staged_h);  // [B, P]
  scalar_t* resident_weight = reinterpret_cast<scalar_t*>(staged_h + B * P);  // [4][kSequenceUnits][P]

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t unit_base = static_cast<int64_t>(blockIdx.x) * kSequenceUnits;
  const int64_t unit = unit_base + warp;
  load_resident_gate_rows(resident_weight, weight_hh, unit_base, H, P);
  const SequenceProjection<scalar_t> projection =
      load_sequence_projection(reinterpret_cast<unsigned char*>(staged_h), shape, false, weight_hr);

  for (int64_t s = 0; s < shape.steps; ++s) {
    const SequenceVisit<scalar_t> visit = sequence_visit(shape, s, hx, cx, output, cell_states);
    // The previous step's grid barrier has ordered every block's h writes before these reads, and
    // every warp of this block has finished reading the previous staged_h.
    for (int64_t index = threadIdx.x; index < B * P; index += blockDim.x) {
      staged_h[index] = static_cast<opmath_t>(visit.h_prev[index]);
    }
    __syncthreads();
    if (unit < H) {
      for (int64_t row_begin = 0; row_begin < B; row_begin += kSequenceRowTile) {
        opmath_t accumulators[4][kSequenceRowTile];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
          for (int r = 0; r < kSequenceRowTile; ++r) {
            accumulators[gate][r] = opmath_t(0);
          }
        }
        for (int64_t k = lane; k < P; k += kWarpSize) {
          opmath_t w[4];
#pragma unroll
          for (int gate = 0; gate < 4; ++gate) {
            w[gate] = static_cast<opmath_t>(resident_weight[(gate * kSequenceUnits + warp) * P + k]);
          }
#pragma unroll
          for (int r = 0; r < kSequenceRowTile; ++r) {
            // Rows past the batch read row 0 (any valid row): their sums are never stored.
            const int64_t row = row_begin + r < B ? row_begin + r : 0;
            const opmath_t h = staged_h[row * P + k];
#pragma unroll
            for (int gate = 0; gate < 4; ++gate) {
              accumulators[gate][r] += w[gate] * h;
            }
          }
        }
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) {
#pragma unroll
          for (int r = 0; r < kSequenceRowTile; ++r) {
#pragma unroll
            for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
              accumulators[gate][r] += __shfl_xor_sync(0xffffffffu, accumulators[gate][r], offset);
            }
          }
        }
        // Lane r finishes row row_begin + r: every lane holds every sum after the butterfly.
#pragma unroll
        for (int r = 0; r < kSequenceRowTile; ++r) {
          const int64_t row = row_begin + r;
          if (lane == r && row < B) {
            const scalar_t* projected_row = projected + (visit.t * B + row) * 4 * H + unit;
            opmath_t preactivation[4];
#pragma unroll
            for (int gate = 0; gate < 4; ++gate) {
              preactivation[gate] = accumulators[gate][r] + static_cast<opmath_t>(projected_row[gate * H]);
            }
            finish_sequence_unit(
                preactivation, shape, visit, s, row, unit, output, cell_states, gates, hy, cy, unprojected);
          }
        }
      }
    }
    finish_sequence_visit(projection, unprojected, shape, s, visit.t, output, hy);
  }
}

// A fragment's element type (MmaElement) and the type its loads read from shared memory
// (MmaSource): the storage type for half/bfloat16; for float32, TF32 fragments loaded from float.
template <typename scalar_t>
struct MmaElementOf;
template <>
struct MmaElementOf<float> {
  using type = nvcuda::wmma::precision::tf32;
};
#if defined(LSTM_FUSED_CUDA_EMULATION)
template <>
struct MmaElementOf<c10::Half> {
  using type = c10::Half;
};
template <>
struct MmaElementOf<c10::BFloat16> {
  using type = c10::BFloat16;
};
#else
template <>
struct MmaElementOf<c10::Half> {
  using type = __half;
};
template <>
struct MmaElementOf<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif
template <typename scalar_t>
using MmaElement = typename MmaElementOf<scalar_t>::type;
template <typename scalar_t>
using MmaSource = std::conditional_t<std::is_same_v<scalar_t, float>, float, MmaElement<scalar_t>>;

// TF32 fragments take float32 values rounded to TF32 (10 mantissa bits) after the load; half and
// bfloat16 fragments are used as loaded.
template <typename scalar_t, typename Fragment>
__device__ __forceinline__ void round_for_mma(Fragment& fragment) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int e = 0; e < fragment.num_elements; ++e) {
      fragment.x[e] = nvcuda::wmma::__float_to_tf32(fragment.x[e]);
    }
  }
}

// The persistent forward with the recurrent product on tensor cores (half and bfloat16, or float32
// as TF32 where allowed; float32 accumulation): per step, the block's product h_{t-1} [rows, P] x
// W_slice^T [P, 32] as 16x16xK fragments (mma_split, K = kMmaDepth), the partial tiles through
// shared memory, and the same epilogue, projection and grid barriers as the SIMT kernel. Same
// parameters as sequence_forward_persistent_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kSequenceThreads) sequence_forward_persistent_mma_kernel(
    const scalar_t* __restrict__ projected,
    const scalar_t* __restrict__ weight_hh,
    const scalar_t* __restrict__ hx,
    const scalar_t* __restrict__ cx,
    scalar_t* output,
    scalar_t* cell_states,
    scalar_t* __restrict__ gates,
    scalar_t* __restrict__ hy,
    scalar_t* __restrict__ cy,
    const scalar_t* __restrict__ weight_hr,
    scalar_t* unprojected,
    const SequenceShape shape) {
  namespace wmma = nvcuda::wmma;
  using element_t = MmaElement<scalar_t>;
  using source_t = MmaSource<scalar_t>;
  constexpr int kDepth = kMmaDepth<scalar_t>;
  constexpr int kTileElements = kMmaTile * kMmaTile;
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t P = shape.output_size;
  const MmaSplit split = mma_split(B);
  LSTM_FUSED_DYNAMIC_SHARED(float, partial);                                            // [items][16][16]
  scalar_t* staged_h = reinterpret_cast<scalar_t*>(partial + split.items * kTileElements);  // [padded_rows][P]
  scalar_t* resident_weight = staged_h + split.padded_rows * P;                          // [32][P]: row g * 8 + u

  const int warp = threadIdx.x / kWarpSize;
  const int64_t unit_base = static_cast<int64_t>(blockIdx.x) * kSequenceUnits;
  load_resident_gate_rows(resident_weight, weight_hh, unit_base, H, P);
  const SequenceProjection<scalar_t> projection =
      load_sequence_projection(reinterpret_cast<unsigned char*>(partial), shape, true, weight_hr);

  for (int64_t s = 0; s < shape.steps; ++s) {
    const SequenceVisit<scalar_t> visit = sequence_visit(shape, s, hx, cx, output, cell_states);
    // Rows past the batch are zeros: their products are computed and never read.
    for (int64_t index = threadIdx.x; index < split.padded_rows * P; index += blockDim.x) {
      staged_h[index] = index < B * P ? visit.h_prev[index] : scalar_t(0);
    }
    __syncthreads();
    // Uniform per warp: every lane of a warp takes the same items, as the fragments require.
    for (int item = warp; item < split.items; item += kSequenceWarps) {
      const int tile = item % split.tiles;
      const int part = item / split.tiles;
      const int64_t row_tile = tile / 2;
      const int64_t column_tile = tile % 2;
      wmma::fragment<wmma::accumulator, kMmaTile, kMmaTile, kDepth, float> accumulator;
      wmma::fill_fragment(accumulator, 0.0f);
      for (int64_t k0 = static_cast<int64_t>(part) * kDepth; k0 < P; k0 += static_cast<int64_t>(split.splits) * kDepth) {
        wmma::fragment<wmma::matrix_a, kMmaTile, kMmaTile, kDepth, element_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kMmaTile, kMmaTile, kDepth, element_t, wmma::col_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const source_t*>(staged_h + row_tile * kMmaTile * P + k0), P);
        wmma::load_matrix_sync(b, reinterpret_cast<const source_t*>(resident_weight + column_tile * kMmaTile * P + k0), P);
        round_for_mma<scalar_t>(a);
        round_for_mma<scalar_t>(b);
        wmma::mma_sync(accumulator, a, b, accumulator);
      }
      wmma::store_matrix_sync(partial + item * kTileElements, accumulator, kMmaTile, wmma::mem_row_major);
    }
    __syncthreads();
    for (int64_t index = threadIdx.x; index < B * kSequenceUnits; index += blockDim.x) {
      const int64_t row = index / kSequenceUnits;
      const int u = static_cast<int>(index % kSequenceUnits);
      const int64_t unit = unit_base + u;
      if (unit >= H) {
        continue;
      }
      const int64_t row_tile = row / kMmaTile;
      const int row_in_tile = static_cast<int>(row % kMmaTile);
      const scalar_t* projected_row = projected + (visit.t * B + row) * 4 * H + unit;
      float preactivation[4];
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) {
        const int column = gate * kSequenceUnits + u;
        const int tile = static_cast<int>(row_tile * 2 + column / kMmaTile);
        float sum = static_cast<float>(projected_row[gate * H]);
        for (int part = 0; part < split.splits; ++part) {
          sum += partial[(part * split.tiles + tile) * kTileElements + row_in_tile * kMmaTile + column % kMmaTile];
        }
        preactivation[gate] = sum;
      }
      finish_sequence_unit(preactivation, shape, visit, s, row, unit, output, cell_states, gates, hy, cy, unprojected);
    }
    finish_sequence_visit(projection, unprojected, shape, s, visit.t, output, hy);
  }
}

template <typename scalar_t>
using SequenceForwardKernel = void (*)(
    const scalar_t*, const scalar_t*, const scalar_t*, const scalar_t*, scalar_t*, scalar_t*, scalar_t*, scalar_t*,
    scalar_t*, const scalar_t*, scalar_t*, SequenceShape);

// The forward kernel a plan launches (and whose occupancy the caller checks).
template <typename scalar_t>
SequenceForwardKernel<scalar_t> persistent_forward_kernel(bool tensor_cores) {
  if constexpr (sizeof(scalar_t) == 2 || std::is_same_v<scalar_t, float>) {
    if (tensor_cores) {
      return sequence_forward_persistent_mma_kernel<scalar_t>;
    }
  }
  return sequence_forward_persistent_kernel<scalar_t>;
}

template <typename scalar_t>
struct SequencePointers {
  const scalar_t* projected;
  const scalar_t* weight_hh;
  const scalar_t* hx;
  const scalar_t* cx;
  scalar_t* output;
  scalar_t* cell_states;
  scalar_t* gates;  // null when not wanted
  scalar_t* hy;
  scalar_t* cy;
  const scalar_t* weight_hr;  // null without a projection
  scalar_t* unprojected;      // [B, H] scratch with a projection, else null
};

// Launches the persistent forward when plan.fits; the caller checked that and falls back otherwise.
template <typename scalar_t>
void launch_persistent_sequence(
    const SequencePointers<scalar_t>& p, const SequenceShape& shape, const SequencePlan& plan, cudaStream_t stream) {
  const SequenceForwardKernel<scalar_t> kernel = persistent_forward_kernel<scalar_t>(plan.tensor_cores);
  LSTM_FUSED_LAUNCH_COOPERATIVE(
      kernel, dim3(static_cast<unsigned int>(plan.blocks)), dim3(kSequenceThreads), plan.shared_bytes, stream,
      p.projected, p.weight_hh, p.hx, p.cx, p.output, p.cell_states, p.gates, p.hy, p.cy, p.weight_hr, p.unprojected,
      shape);
}

// ------------------------------------------------------------------------------------------------
// Persistent backward through time: the recurrence of the gradients, one cooperative launch
// ------------------------------------------------------------------------------------------------
//
// Visits the steps in the reverse of the forward's order. At each step a block computes, for its
// state columns p and every row b, the gradient reaching h_t: grad_output[t] (+ grad_hy at the
// forward's last step) + sum over the 4H gate rows j of dG_{next}[b, j] W_hh[j, p], where dG_{next}
// holds the gate pre-activation gradients of the step visited just before (the forward's next
// step). Without a projection p is the block's hidden unit u and the cell's backward
// (lstm_cell_math.h) follows at once, giving dG_t and the gradient reaching c_{t-1}. With one
// (h = W_hr u), the gradients reaching h_t go to grad_hidden [T, B, P], a grid barrier makes them
// visible, and each unit's grad_u[b, u] = sum_p grad_h[b, p] W_hr[p, u] feeds the cell's backward.
// Each block keeps the columns W_hh[:, p] of its state columns (and W_hr[:, u] of its units)
// resident in shared memory; dG_{next} is read from global memory (every block needs all of it,
// and at [B, 4H] it is too large to stage), hence a grid barrier per step. The products that need
// no recurrence (grad_input, the weight and bias gradients, grad_hx = dG_first W_hh, grad_W_hr =
// grad_hidden^T u) are library GEMMs for the caller, after the launch.

// projection_size: proj_size, 0 without a projection (as plan_persistent_sequence).
template <typename scalar_t>
SequencePlan plan_persistent_sequence_backward(
    int64_t hidden_size, int64_t projection_size, size_t max_shared_bytes, int64_t max_blocks) {
  SequencePlan plan;
  const int64_t state_size = projection_size > 0 ? projection_size : hidden_size;
  plan.blocks = ceil_div(hidden_size, kSequenceUnits);
  plan.shared_bytes = static_cast<size_t>(4 * hidden_size * kSequenceUnits) * sizeof(scalar_t) +
      (projection_size > 0 ? static_cast<size_t>(state_size * kSequenceUnits) * sizeof(scalar_t) : 0);
  plan.tensor_cores = false;
  plan.fits = hidden_size > 0 && projection_size >= 0 && projection_size <= hidden_size &&
      plan.shared_bytes <= max_shared_bytes && plan.blocks <= max_blocks;
  return plan;
}

// sum over j < K of source[row, j] * resident[j * kSequenceUnits + warp] for rows row_begin + r,
// lanes splitting j and a butterfly adding them (every lane holds every sum); zeros for a null
// source. Rows past the batch read row 0 (any valid row): their sums are never used.
template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void warp_column_sums(
    opmath_t (&sums)[kSequenceRowTile],
    const scalar_t* source,
    int64_t K,
    const scalar_t* resident,
    int64_t B,
    int64_t row_begin,
    int warp,
    int lane) {
#pragma unroll
  for (int r = 0; r < kSequenceRowTile; ++r) {
    sums[r] = opmath_t(0);
  }
  if (source != nullptr) {
    for (int64_t j = lane; j < K; j += kWarpSize) {
      const opmath_t w = static_cast<opmath_t>(resident[j * kSequenceUnits + warp]);
#pragma unroll
      for (int r = 0; r < kSequenceRowTile; ++r) {
        const int64_t row = row_begin + r < B ? row_begin + r : 0;
        sums[r] += static_cast<opmath_t>(source[row * K + j]) * w;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kSequenceRowTile; ++r) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sums[r] += __shfl_xor_sync(0xffffffffu, sums[r], offset);
    }
  }
}

// grad_preactivation, grad_cell_carry and grad_hidden are written by one block and read by all
// (the first and the last) or by the same thread at the next step (grad_cell_carry): no
// __restrict__ or const on them, so their reads never go through the non-coherent read-only cache.
template <typename scalar_t>
__global__ void __launch_bounds__(kSequenceThreads) sequence_backward_persistent_kernel(
    const scalar_t* __restrict__ grad_output,  // [T, B, P] or null
    const scalar_t* __restrict__ grad_hy,      // [B, P] or null
    const scalar_t* __restrict__ grad_cy,      // [B, H] or null
    const scalar_t* __restrict__ weight_hh,    // [4H, P]
    const scalar_t* __restrict__ cx,           // [B, H]: c before the forward's first step
    const scalar_t* __restrict__ cell_states,  // [T, B, H]
    const scalar_t* __restrict__ gates,        // [T, B, 4H], activated
    scalar_t* grad_preactivation,              // [T, B, 4H] out
    scalar_t* grad_cell_carry,                 // [B, H]: out, the gradient reaching c_0 at the end
    const scalar_t* __restrict__ weight_hr,    // [P, H], or null without a projection (then P = H)
    scalar_t* grad_hidden,                     // [T, B, P] out with a projection: the gradient reaching h_t
    const SequenceShape shape) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t B = shape.batch;
  const int64_t H = shape.hidden_size;
  const int64_t P = shape.output_size;
  LSTM_FUSED_DYNAMIC_SHARED(scalar_t, resident_columns);  // [4H][kSequenceUnits]: W_hh[j, column_base + u]
  scalar_t* resident_projection = resident_columns + 4 * H * kSequenceUnits;  // [P][kSequenceUnits]: W_hr[p, unit]

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // The block's hidden units, and (the same indices) its columns of the state h.
  const int64_t unit_base = static_cast<int64_t>(blockIdx.x) * kSequenceUnits;
  const int64_t unit = unit_base + warp;
  const int64_t column = unit;

  for (int64_t index = threadIdx.x; index < 4 * H * kSequenceUnits; index += blockDim.x) {
    const int64_t j = index / kSequenceUnits;
    const int64_t index_column = unit_base + index % kSequenceUnits;
    resident_columns[index] = index_column < P ? weight_hh[j * P + index_column] : scalar_t(0);
  }
  if (weight_hr != nullptr) {
    for (int64_t index = threadIdx.x; index < P * kSequenceUnits; index += blockDim.x) {
      const int64_t p = index / kSequenceUnits;
      const int64_t column_unit = unit_base + index % kSequenceUnits;
      resident_projection[index] = column_unit < H ? weight_hr[p * H + column_unit] : scalar_t(0);
    }
  }
  __syncthreads();

  for (int64_t s = shape.steps - 1; s >= 0; --s) {
    const int64_t t = shape.reverse ? shape.steps - 1 - s : s;
    const int64_t t_next = shape.reverse ? t - 1 : t + 1;     // visited by the forward after t
    const int64_t t_prev = shape.reverse ? t + 1 : t - 1;     // visited by the forward before t
    const bool forward_last = s == shape.steps - 1;
    const scalar_t* grad_next = forward_last ? nullptr : grad_preactivation + t_next * B * 4 * H;

    // The cell's backward of (row, unit) at step t, from the gradient reaching o * tanh(c_t).
    const auto unit_backward = [&](int64_t row, opmath_t grad_h) {
      const int64_t state_offset = row * H + unit;
      opmath_t grad_c = opmath_t(0);
      if (forward_last) {
        if (grad_cy != nullptr) {
          grad_c = static_cast<opmath_t>(grad_cy[state_offset]);
        }
      } else {
        grad_c = static_cast<opmath_t>(grad_cell_carry[state_offset]);
      }
      const scalar_t* gate_row = gates + (t * B + row) * 4 * H + unit;
      const math::Gates<opmath_t> activated{
          static_cast<opmath_t>(gate_row[0]), static_cast<opmath_t>(gate_row[H]),
          static_cast<opmath_t>(gate_row[2 * H]), static_cast<opmath_t>(gate_row[3 * H])};
      const scalar_t* c_prev = s == 0 ? cx : cell_states + t_prev * B * H;
      const auto grads = math::cell_backward(
          activated, static_cast<opmath_t>(c_prev[state_offset]),
          static_cast<opmath_t>(cell_states[t * B * H + state_offset]), grad_h, grad_c,
          math::Gates<opmath_t>{opmath_t(0), opmath_t(0), opmath_t(0), opmath_t(0)});
      scalar_t* out_row = grad_preactivation + (t * B + row) * 4 * H + unit;
      out_row[0] = static_cast<scalar_t>(grads.grad_preactivation.input);
      out_row[H] = static_cast<scalar_t>(grads.grad_preactivation.forget);
      out_row[2 * H] = static_cast<scalar_t>(grads.grad_preactivation.cell);
      out_row[3 * H] = static_cast<scalar_t>(grads.grad_preactivation.output);
      grad_cell_carry[state_offset] = static_cast<scalar_t>(grads.grad_cell_state_prev);
    };

    // The gradient reaching h_t[row, column]: through the recurrence, from output and from h_n.
    if (column < P) {
      for (int64_t row_begin = 0; row_begin < B; row_begin += kSequenceRowTile) {
        opmath_t recurrent[kSequenceRowTile];
        warp_column_sums(recurrent, grad_next, 4 * H, resident_columns, B, row_begin, warp, lane);
#pragma unroll
        for (int r = 0; r < kSequenceRowTile; ++r) {
          const int64_t row = row_begin + r;
          if (lane == r && row < B) {
            const int64_t state_offset = row * P + column;
            opmath_t grad_h = recurrent[r];
            if (grad_output != nullptr) {
              grad_h += static_cast<opmath_t>(grad_output[t * B * P + state_offset]);
            }
            if (forward_last && grad_hy != nullptr) {
              grad_h += static_cast<opmath_t>(grad_hy[state_offset]);
            }
            if (weight_hr != nullptr) {
              grad_hidden[t * B * P + state_offset] = static_cast<scalar_t>(grad_h);
            } else {
              unit_backward(row, grad_h);
            }
          }
        }
      }
    }
    if (weight_hr != nullptr) {
      // Every column of grad_h_t written before any unit reads it back through W_hr.
      __threadfence();
      cooperative_groups::this_grid().sync();
      if (unit < H) {
        for (int64_t row_begin = 0; row_begin < B; row_begin += kSequenceRowTile) {
          opmath_t grad_unprojected[kSequenceRowTile];
          warp_column_sums(grad_unprojected, grad_hidden + t * B * P, P, resident_projection, B, row_begin, warp, lane);
#pragma unroll
          for (int r = 0; r < kSequenceRowTile; ++r) {
            const int64_t row = row_begin + r;
            if (lane == r && row < B) {
              unit_backward(row, grad_unprojected[r]);
            }
          }
        }
      }
    }
    // dG_t complete in every block before any block reads it as the next visit's dG_next.
    __threadfence();
    cooperative_groups::this_grid().sync();
  }
}

template <typename scalar_t>
struct SequenceBackwardPointers {
  const scalar_t* grad_output;  // null when absent
  const scalar_t* grad_hy;
  const scalar_t* grad_cy;
  const scalar_t* weight_hh;
  const scalar_t* cx;
  const scalar_t* cell_states;
  const scalar_t* gates;
  scalar_t* grad_preactivation;
  scalar_t* grad_cell_carry;
  const scalar_t* weight_hr;  // null without a projection
  scalar_t* grad_hidden;      // [T, B, P] with a projection, else null
};

template <typename scalar_t>
void launch_persistent_sequence_backward(
    const SequenceBackwardPointers<scalar_t>& p, const SequenceShape& shape, const SequencePlan& plan,
    cudaStream_t stream) {
  const auto kernel = sequence_backward_persistent_kernel<scalar_t>;
  LSTM_FUSED_LAUNCH_COOPERATIVE(
      kernel, dim3(static_cast<unsigned int>(plan.blocks)), dim3(kSequenceThreads), plan.shared_bytes, stream,
      p.grad_output, p.grad_hy, p.grad_cy, p.weight_hh, p.cx, p.cell_states, p.gates, p.grad_preactivation,
      p.grad_cell_carry, p.weight_hr, p.grad_hidden, shape);
}

}  // namespace cuda
}  // namespace lstm_fused
