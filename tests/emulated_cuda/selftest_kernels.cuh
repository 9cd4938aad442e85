// Kernels that check the emulation itself (tests/test_emulated_cuda.py, test_emulation_*): each
// CUDA feature the emulation claims, with a result a test can predict.
#pragma once

#include <cstdint>

namespace selftest {

// Per thread: shfl_xor(lane, 1), shfl_down(lane, 3), shfl_up(lane, 5), shfl(lane, 7), the ballot of
// odd lanes, and a float butterfly sum of the lanes (every lane gets 0 + 1 + ... + 31 = 496).
__device__ void warp_collectives(int64_t* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  out[t * 6 + 0] = __shfl_xor_sync(0xffffffffu, lane, 1);
  out[t * 6 + 1] = __shfl_down_sync(0xffffffffu, lane, 3);
  out[t * 6 + 2] = __shfl_up_sync(0xffffffffu, lane, 5);
  out[t * 6 + 3] = __shfl_sync(0xffffffffu, lane, 7);
  out[t * 6 + 4] = static_cast<int64_t>(__ballot_sync(0xffffffffu, lane % 2 == 1));
  float sum = static_cast<float>(lane);
  for (int offset = 16; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  out[t * 6 + 5] = static_cast<int64_t>(sum);
}

// Concurrent atomics from every thread of every block (blocks on separate OS threads): sum of 1s,
// sum of thread ids, maximum thread id.
__device__ void atomics(double* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&out[0], 1.0);
  atomicAdd(&out[1], static_cast<double>(t));
  atomicMax(&out[2], static_cast<double>(t));
}

// Two phases across a grid barrier: each block's thread 0 publishes its block index, then after
// grid.sync() every thread reads the value of the next block. Without the barrier a block would
// read a scratch slot still 0.
__device__ void grid_sync(int64_t* out, int64_t* scratch) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) {
    scratch[blockIdx.x] = blockIdx.x + 1;
  }
  __threadfence();
  cooperative_groups::this_grid().sync();
  out[t] = scratch[(blockIdx.x + 1) % gridDim.x];
}

// Dynamic and static shared memory are per block: each thread writes its slot, and after the
// barrier reads its neighbour's (block-local) value, plus a static counter every thread adds to.
__device__ void shared_memory(int64_t* out) {
  int64_t* slots = ::cuda_emulation::dynamic_shared<int64_t>();
  __shared__ int block_total;
  if (threadIdx.x == 0) {
    block_total = 0;
  }
  __syncthreads();
  slots[threadIdx.x] = blockIdx.x * 1000 + threadIdx.x;
  atomicAdd(&block_total, 1);
  __syncthreads();
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = slots[(threadIdx.x + 1) % blockDim.x] + static_cast<int64_t>(block_total) * 1000000;
}

// Thread 0 returns early and the rest wait at a barrier: undefined on the GPU, an error here.
__device__ void divergent_barrier() {
  if (threadIdx.x == 0) {
    return;
  }
  __syncthreads();
}

// Reads a neighbour's shared slot with no barrier between the write and the read: the emulation's
// schedule must make this visibly wrong (the neighbour has not run yet, its slot is still poison).
__device__ void race_without_barrier(int64_t* out) {
  int64_t* slots = ::cuda_emulation::dynamic_shared<int64_t>();
  slots[threadIdx.x] = threadIdx.x;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  out[t] = slots[(threadIdx.x + 1) % blockDim.x];
}

}  // namespace selftest
