// A small emulation of CUDA's execution model on the CPU, so that the real device code of
// csrc/cuda (its .cuh headers) compiles as host C++ and runs in CI without a GPU.
//
// What it models, and how:
// - A block's threads are fibers (user-level contexts with their own stacks) scheduled round-robin
//   on one OS thread: all of a block's threads are alive together, as on the GPU, and a thread runs
//   until it blocks at a barrier or a warp collective. Even blocks visit their threads in
//   ascending order and odd blocks in descending order, so a missing barrier shows as wrong data
//   in one direction or the other.
// - __syncthreads is a barrier over every thread of the block. A barrier that cannot complete (a
//   thread exited, or waits at another barrier) is reported as an error instead of hanging.
// - Shared memory is per block: static __shared__ variables are thread_local statics, and each
//   block runs on its own OS thread's storage (blocks run one after the other in a plain launch,
//   each on its own OS thread in a cooperative launch). Dynamic shared memory is a per-block buffer
//   filled with 0xFF bytes (NaN for floating types) before the block starts, so a read of a slot
//   that nobody staged poisons the result.
// - Warp collectives (shuffles, votes, __syncwarp) exchange values among the 32 lanes of a warp
//   through a per-warp buffer between two warp barriers; masks must name every live lane.
// - Atomics are real atomic operations (std::atomic_ref), grid-wide barriers of a cooperative
//   launch are a std::barrier across the blocks' OS threads; the grid must be small.
// What it does not model: the GPU's weak memory model, timing, occupancy, or the exact rounding of
// fast-math intrinsics. It proves indexing, synchronisation and arithmetic, not speed.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define LSTM_FUSED_CUDA_EMULATION 1

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
using cudaStream_t = void*;

namespace cuda_emulation {

constexpr int kWarpSize = 32;
// Large enough for a kernel's frames (arrays of accumulators and weight vectors) in an
// unoptimised build, small enough for 1024 threads per block.
constexpr size_t kFiberStackBytes = 128 * 1024;
constexpr int kMaxCooperativeBlocks = 64;

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------------------------------
// Context switching
// ------------------------------------------------------------------------------------------------

#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words of the running context on its
// stack, stores its stack pointer in *save, and resumes the context whose stack pointer is next.
// Weak, so that several translation units may include this header.
extern "C" void cuda_emulation_switch(void** save, void* next);
asm(R"(
  .text
  .weak cuda_emulation_switch
  .type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emulation_switch, .-cuda_emulation_switch
)");
#endif

struct Block;

struct Fiber {
  dim3 thread_idx;
  int linear_id = 0;
  bool finished = false;
  const char* waiting_at = nullptr;  // the barrier it waits at, for error messages
  std::unique_ptr<unsigned char[]> stack;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Launch {
  dim3 grid_dim;
  dim3 block_dim;
  size_t dynamic_shared_bytes = 0;
  const std::function<void()>* body = nullptr;
  std::barrier<>* grid_barrier = nullptr;  // cooperative launches only
};

struct Block {
  const Launch* launch = nullptr;
  dim3 block_idx;
  std::vector<Fiber> fibers;
  std::vector<unsigned char> dynamic_shared;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_exchange;  // one 8-byte slot per thread
  uint64_t events = 0;                  // arrivals, releases, exits: progress, for deadlock detection
  std::exception_ptr error;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
};

inline thread_local Block* current_block = nullptr;
inline thread_local Fiber* current_fiber = nullptr;

inline Block& block() {
  return *current_block;
}
inline Fiber& fiber() {
  return *current_fiber;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
inline void yield() {
  Block& b = block();
  Fiber& f = fiber();
#if defined(__x86_64__)
  cuda_emulation_switch(&f.sp, b.scheduler_sp);
#else
  swapcontext(&f.context, &b.scheduler_context);
#endif
  // Other threads ran meanwhile: nothing read from shared memory before may be reused.
  asm volatile("" ::: "memory");
}

// Waits until every expected thread has arrived; the last to arrive runs on_complete first (a
// cooperative launch's grid barrier) and then releases the others.
template <typename OnComplete>
void wait(Barrier& barrier, const char* what, OnComplete on_complete) {
  Block& b = block();
  const uint64_t generation = barrier.generation;
  ++b.events;
  if (++barrier.arrived == barrier.expected) {
    on_complete();
    barrier.arrived = 0;
    ++barrier.generation;
    asm volatile("" ::: "memory");
    return;
  }
  fiber().waiting_at = what;
  while (barrier.generation == generation) {
    yield();
  }
  fiber().waiting_at = nullptr;
}

inline void wait(Barrier& barrier, const char* what) {
  wait(barrier, what, [] {});
}

[[noreturn]] inline void fail(const std::string& message) {
  throw Error("cuda_emulation: " + message);
}

inline void run_fiber_body() {
  Block& b = block();
  try {
    (*b.launch->body)();
  } catch (...) {
    if (!b.error) {
      b.error = std::current_exception();
    }
  }
  fiber().finished = true;
  ++b.events;
}

#if defined(__x86_64__)
extern "C" inline void cuda_emulation_fiber_entry() {
  run_fiber_body();
  Block& b = block();
  void* discarded = nullptr;
  cuda_emulation_switch(&discarded, b.scheduler_sp);
  __builtin_unreachable();
}

inline void prepare_fiber(Fiber& f) {
  auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kFiberStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // a return address slot: the entry starts with rsp = 8 mod 16, as after a call
  *--sp = reinterpret_cast<void*>(&cuda_emulation_fiber_entry);
  for (int reg = 0; reg < 6; ++reg) {
    *--sp = nullptr;  // rbp, rbx, r12-r15
  }
  uint32_t mxcsr;
  uint16_t fpu_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_control));
  uint64_t control_words = mxcsr | (static_cast<uint64_t>(fpu_control) << 32);
  *--sp = reinterpret_cast<void*>(control_words);
  f.sp = sp;
}

inline void resume(Block& b, Fiber& f) {
  cuda_emulation_switch(&b.scheduler_sp, f.sp);
}
#else
inline void fiber_entry_ucontext() {
  run_fiber_body();
}

inline void prepare_fiber(Fiber& f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = kFiberStackBytes;
  f.context.uc_link = &block().scheduler_context;
  makecontext(&f.context, &fiber_entry_ucontext, 0);
}

inline void resume(Block& b, Fiber& f) {
  swapcontext(&b.scheduler_context, &f.context);
}
#endif

// Runs one block to completion on the calling OS thread.
inline void run_block(const Launch& launch, dim3 block_idx) {
  const dim3 bd = launch.block_dim;
  const int threads = static_cast<int>(bd.x * bd.y * bd.z);
  Block b;
  b.launch = &launch;
  b.block_idx = block_idx;
  b.dynamic_shared.assign(launch.dynamic_shared_bytes + 16, 0xFF);
  b.block_barrier.expected = threads;
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  b.warp_barriers.resize(warps);
  for (int w = 0; w < warps; ++w) {
    b.warp_barriers[w].expected = std::min(kWarpSize, threads - w * kWarpSize);
  }
  b.warp_exchange.assign(threads, 0);
  b.fibers.resize(threads);
  Block* previous_block = current_block;
  Fiber* previous_fiber = current_fiber;
  current_block = &b;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.linear_id = t;
    f.thread_idx = dim3(t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y));
    f.stack.reset(new unsigned char[kFiberStackBytes]);
    current_fiber = &f;
    prepare_fiber(f);
  }
  const bool descending = ((block_idx.x + block_idx.y + block_idx.z) % 2) == 1;
  int live = threads;
  while (live > 0) {
    const uint64_t events_before = b.events;
    for (int i = 0; i < threads; ++i) {
      Fiber& f = b.fibers[descending ? threads - 1 - i : i];
      if (f.finished) {
        continue;
      }
      current_fiber = &f;
      resume(b, f);
      if (f.finished) {
        --live;
      }
    }
    if (live > 0 && b.events == events_before) {
      std::string message = "deadlock in block (" + std::to_string(block_idx.x) + ", " + std::to_string(block_idx.y) +
          "): ";
      int waiting = 0;
      for (const Fiber& f : b.fibers) {
        if (!f.finished && waiting++ < 3) {
          message += "thread " + std::to_string(f.linear_id) + " waits at " + (f.waiting_at ? f.waiting_at : "?") + "; ";
        }
      }
      message += std::to_string(threads - live) + " of " + std::to_string(threads) +
          " threads had exited (a barrier every thread must reach was skipped by some)";
      current_block = previous_block;
      current_fiber = previous_fiber;
      // The waiting fibers' stacks are released with the block; they hold no resources.
      throw Error("cuda_emulation: " + message);
    }
  }
  current_block = previous_block;
  current_fiber = previous_fiber;
  if (b.error) {
    std::rethrow_exception(b.error);
  }
}

// 48 KiB of dynamic shared memory without an opt-in; 227 KiB (sm_90's opt-in maximum) with one.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptInSharedBytes = 227 * 1024;

inline void check_launch(dim3 grid, dim3 block_dim, size_t shared_bytes, size_t shared_limit = kDefaultSharedBytes) {
  const uint64_t threads = uint64_t(block_dim.x) * block_dim.y * block_dim.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    fail("invalid configuration: a zero-size grid or block (CUDA rejects the launch)");
  }
  if (threads > 1024 || block_dim.z > 64 || grid.y > 65535 || grid.z > 65535) {
    fail("invalid configuration: block of " + std::to_string(threads) + " threads or grid beyond CUDA's limits");
  }
  if (shared_bytes > shared_limit) {
    fail("dynamic shared memory of " + std::to_string(shared_bytes) + " bytes is over the limit of " +
         std::to_string(shared_limit) + " (48 KiB without an opt-in, the launch would fail)");
  }
}

// kernel<<<grid, block, shared_bytes>>>(...): the blocks run one after the other.
inline void launch(dim3 grid, dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  check_launch(grid, block_dim, shared_bytes);
  Launch l;
  l.grid_dim = grid;
  l.block_dim = block_dim;
  l.dynamic_shared_bytes = shared_bytes;
  l.body = &body;
  for (unsigned int z = 0; z < grid.z; ++z) {
    for (unsigned int y = 0; y < grid.y; ++y) {
      for (unsigned int x = 0; x < grid.x; ++x) {
        run_block(l, dim3(x, y, z));
      }
    }
  }
}

// cudaLaunchCooperativeKernel: every block alive at once, each on its own OS thread, so that a
// grid-wide barrier can complete.
// The caller is assumed to have opted in to more shared memory (cudaFuncSetAttribute), as the
// persistent kernel's launch does.
inline void launch_cooperative(dim3 grid, dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  check_launch(grid, block_dim, shared_bytes, kOptInSharedBytes);
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks > kMaxCooperativeBlocks) {
    fail("cooperative launch of " + std::to_string(blocks) + " blocks: the emulation holds at most " +
         std::to_string(kMaxCooperativeBlocks) + " alive together");
  }
  std::barrier<> grid_barrier(static_cast<std::ptrdiff_t>(blocks));
  Launch l;
  l.grid_dim = grid;
  l.block_dim = block_dim;
  l.dynamic_shared_bytes = shared_bytes;
  l.body = &body;
  l.grid_barrier = &grid_barrier;
  std::vector<std::exception_ptr> errors(blocks);
  std::vector<std::thread> threads;
  for (uint64_t index = 0; index < blocks; ++index) {
    const dim3 block_idx(index % grid.x, (index / grid.x) % grid.y, index / (uint64_t(grid.x) * grid.y));
    threads.emplace_back([&, index, block_idx] {
      try {
        run_block(l, block_idx);
      } catch (...) {
        errors[index] = std::current_exception();
        // The others must not wait for this block at their next grid barrier.
        grid_barrier.arrive_and_drop();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  for (auto& e : errors) {
    if (e) {
      std::rethrow_exception(e);
    }
  }
}

template <typename T>
T* dynamic_shared() {
  // 16-byte aligned, as CUDA's dynamic shared memory is at least.
  auto address = reinterpret_cast<uintptr_t>(block().dynamic_shared.data());
  return reinterpret_cast<T*>((address + 15) & ~uintptr_t(15));
}

// ------------------------------------------------------------------------------------------------
// Warp collectives
// ------------------------------------------------------------------------------------------------

inline int lane_id() {
  return fiber().linear_id % kWarpSize;
}

inline Barrier& warp_barrier() {
  return block().warp_barriers[fiber().linear_id / kWarpSize];
}

inline unsigned int live_lanes_mask() {
  const int lanes = warp_barrier().expected;
  return lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
}

inline void check_mask(unsigned int mask, const char* what) {
  if (mask != live_lanes_mask()) {
    fail(std::string(what) + " with a mask that is not the warp's live lanes: the emulation supports full-warp "
         "collectives only");
  }
}

// Every lane publishes `value`, then reads the value of lane source(lane).
template <typename T, typename Source>
T exchange(T value, const char* what, Source source) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of values up to 8 bytes");
  Block& b = block();
  const int id = fiber().linear_id;
  const int warp_base = id - id % kWarpSize;
  std::memcpy(&b.warp_exchange[id], &value, sizeof(T));
  wait(warp_barrier(), what);
  const int lanes = warp_barrier().expected;
  int src = source(lane_id());
  if (src < 0 || src >= lanes) {
    src = lane_id();  // CUDA returns the caller's own value for a lane outside the warp
  }
  T result;
  std::memcpy(&result, &b.warp_exchange[warp_base + src], sizeof(T));
  // No lane may publish its next value before every lane has read this one.
  wait(warp_barrier(), what);
  return result;
}

inline int segment_base(int lane, int width) {
  return lane - lane % width;
}

}  // namespace cuda_emulation

// ------------------------------------------------------------------------------------------------
// The CUDA builtins device code uses
// ------------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)
#define threadIdx (::cuda_emulation::fiber().thread_idx)
#define blockIdx (::cuda_emulation::block().block_idx)
#define blockDim (::cuda_emulation::block().launch->block_dim)
#define gridDim (::cuda_emulation::block().launch->grid_dim)
#define warpSize 32

inline void __syncthreads() {
  ::cuda_emulation::wait(::cuda_emulation::block().block_barrier, "__syncthreads");
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::cuda_emulation::check_mask(mask, "__syncwarp");
  ::cuda_emulation::wait(::cuda_emulation::warp_barrier(), "__syncwarp");
}

inline void __threadfence() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

inline void __threadfence_block() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

template <typename T>
T __shfl_sync(unsigned int mask, T value, int src_lane, int width = 32) {
  ::cuda_emulation::check_mask(mask, "__shfl_sync");
  return ::cuda_emulation::exchange(value, "__shfl_sync", [&](int lane) {
    return ::cuda_emulation::segment_base(lane, width) + ((src_lane % width) + width) % width;
  });
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = 32) {
  ::cuda_emulation::check_mask(mask, "__shfl_xor_sync");
  return ::cuda_emulation::exchange(value, "__shfl_xor_sync", [&](int lane) {
    const int src = lane ^ lane_mask;
    // A source outside the lane's segment of `width` lanes yields the lane's own value.
    return ::cuda_emulation::segment_base(src, width) == ::cuda_emulation::segment_base(lane, width) ? src : lane;
  });
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  ::cuda_emulation::check_mask(mask, "__shfl_down_sync");
  return ::cuda_emulation::exchange(value, "__shfl_down_sync", [&](int lane) {
    const int src = lane + static_cast<int>(delta);
    return src < ::cuda_emulation::segment_base(lane, width) + width ? src : lane;
  });
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = 32) {
  ::cuda_emulation::check_mask(mask, "__shfl_up_sync");
  return ::cuda_emulation::exchange(value, "__shfl_up_sync", [&](int lane) {
    const int src = lane - static_cast<int>(delta);
    return src >= ::cuda_emulation::segment_base(lane, width) ? src : lane;
  });
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
  ::cuda_emulation::check_mask(mask, "__ballot_sync");
  unsigned int result = 0;
  const int lanes = ::cuda_emulation::warp_barrier().expected;
  // Each lane reads every lane's predicate: `lanes` exchanges, one per source lane.
  for (int src = 0; src < lanes; ++src) {
    const int bit = ::cuda_emulation::exchange(predicate ? 1 : 0, "__ballot_sync", [&](int) { return src; });
    result |= static_cast<unsigned int>(bit) << src;
  }
  return result & mask;
}

inline int __any_sync(unsigned int mask, int predicate) {
  return __ballot_sync(mask, predicate) != 0;
}

inline int __all_sync(unsigned int mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}

// ------------------------------------------------------------------------------------------------
// Atomics: real atomic read-modify-writes, since a cooperative launch's blocks run on OS threads.
// ------------------------------------------------------------------------------------------------

template <typename T>
T __emulated_atomic_update(T* address, const std::function<T(T)>& update) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (!ref.compare_exchange_weak(old, update(old))) {
  }
  return old;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return __emulated_atomic_update<T>(address, [&](T old) { return static_cast<T>(old + value); });
}

template <typename T>
T atomicMax(T* address, T value) {
  return __emulated_atomic_update<T>(address, [&](T old) { return old < value ? value : old; });
}

template <typename T>
T atomicMin(T* address, T value) {
  return __emulated_atomic_update<T>(address, [&](T old) { return value < old ? value : old; });
}

template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}

template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, whether or not it matched
}

// ------------------------------------------------------------------------------------------------
// Cooperative groups: the grid-wide barrier of a cooperative launch.
// ------------------------------------------------------------------------------------------------

namespace cooperative_groups {

struct grid_group {
  void sync() const {
    auto& b = ::cuda_emulation::block();
    if (b.launch->grid_barrier == nullptr) {
      ::cuda_emulation::fail("grid.sync() outside a cooperative launch");
    }
    // Every thread of the block arrives; the last one waits for the other blocks, then releases
    // its block: a grid barrier is a block barrier whose completion waits on every block.
    ::cuda_emulation::wait(b.block_barrier, "grid.sync", [&] {
      std::atomic_thread_fence(std::memory_order_seq_cst);
      b.launch->grid_barrier->arrive_and_wait();
    });
  }
  unsigned long long size() const {
    const auto& l = *::cuda_emulation::block().launch;
    return 1ull * l.grid_dim.x * l.grid_dim.y * l.grid_dim.z * l.block_dim.x * l.block_dim.y * l.block_dim.z;
  }
};

inline grid_group this_grid() {
  return {};
}

}  // namespace cooperative_groups

// ------------------------------------------------------------------------------------------------
// Tensor-core fragments (nvcuda::wmma), for 16x16x16 tiles (16x16x8 for TF32). The GPU spreads a fragment over the
// warp's lanes in a layout the API leaves unspecified; here every lane holds the whole tile, which
// that contract allows, and each operation is warp-collective: it starts and ends with a warp
// barrier, as the GPU requires all 32 lanes to reach it together. Products accumulate in float.
// ------------------------------------------------------------------------------------------------

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};  // float32 operands of 16x16x8 products, used at TF32's precision
}  // namespace precision

// float32 rounded to TF32: 10 explicit mantissa bits, to nearest with ties away from zero (PTX's
// cvt.rna.tf32.f32); infinities and NaN pass through.
inline float __float_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) {
    bits = (bits + 0x1000u) & 0xffffe000u;
  }
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

// What the tensor cores read of a TF32 operand: the top 19 bits (a value not rounded by
// __float_to_tf32 first is truncated), so a kernel that forgets the rounding differs.
inline float tf32_operand(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= 0xffffe000u;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  float x[rows * cols];  // row-major: element (i, j) at x[i * cols + j]
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float value) {
  __syncwarp();
  for (float& e : f.x) {
    e = value;
  }
  __syncwarp();
}

// ldm: elements between consecutive rows (row_major) or columns (col_major) in memory.
template <typename Use, int M, int N, int K, typename T, typename Layout, typename Source>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const Source* source, unsigned int ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  __syncwarp();
  for (int i = 0; i < F::rows; ++i) {
    for (int j = 0; j < F::cols; ++j) {
      const Source value = std::is_same_v<Layout, col_major> ? source[j * ldm + i] : source[i * ldm + j];
      f.x[i * F::cols + j] = static_cast<float>(value);
    }
  }
  __syncwarp();
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(
    fragment<accumulator, M, N, K, TC>& d,
    const fragment<matrix_a, M, N, K, TA, LA>& a,
    const fragment<matrix_b, M, N, K, TB, LB>& b,
    const fragment<accumulator, M, N, K, TC>& c) {
  __syncwarp();
  float result[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        if constexpr (std::is_same_v<TA, precision::tf32>) {
          sum += tf32_operand(a.x[i * K + k]) * tf32_operand(b.x[k * N + j]);
        } else {
          sum += a.x[i * K + k] * b.x[k * N + j];
        }
      }
      result[i * N + j] = sum;
    }
  }
  std::memcpy(d.x, result, sizeof(result));
  __syncwarp();
}

// One lane writes (all hold the same tile); the barriers order the store with the warp's other
// lanes' later reads.
template <int M, int N, int K, typename TC>
void store_matrix_sync(float* destination, const fragment<accumulator, M, N, K, TC>& f, unsigned int ldm, layout_t layout) {
  __syncwarp();
  if (::cuda_emulation::lane_id() == 0) {
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        (layout == mem_col_major ? destination[j * ldm + i] : destination[i * ldm + j]) = f.x[i * N + j];
      }
    }
  }
  __syncwarp();
}

}  // namespace wmma
}  // namespace nvcuda
