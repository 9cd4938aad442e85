// Chooses, once per process, which instruction set's kernels (kernels/, compiled once for each)
// run: the widest this CPU has, or the one LSTM_FUSED_CPU_CAPABILITY names, as ATen's
// ATEN_CPU_CAPABILITY does for its own kernels. The only file that asks the CPU what it has.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "capability.h"
#include "kernels/kernels.h"
#include "small_batch.h"

namespace lstm_fused {
namespace cpu {

// setup.py defines LSTM_FUSED_KERNELS_<NAME> for each instruction set it compiled kernels/ for.
#if defined(LSTM_FUSED_KERNELS_AVX512)
namespace AVX512 {
extern const Kernels table;
}
#endif
#if defined(LSTM_FUSED_KERNELS_AVX2)
namespace AVX2 {
extern const Kernels table;
}
#endif
#if defined(LSTM_FUSED_KERNELS_NEON)
namespace NEON {
extern const Kernels table;
}
#endif
namespace DEFAULT {
extern const Kernels table;
}

bool cpu_has(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  if (name == "avx2") {
    // The kernels' float16 conversions also use F16C, which every AVX2 CPU has (Intel since Ivy
    // Bridge, AMD since Piledriver); clang's __builtin_cpu_supports has no name for it to check.
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (name == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
  }
#endif
#if defined(__aarch64__)
  // Advanced SIMD is part of every AArch64 CPU.
  if (name == "neon") {
    return true;
  }
#endif
  return name == "default";
}

bool cpuinfo_has(const char* name) {
  const auto capabilities = at::cpu::get_cpu_capabilities();
  const auto found = capabilities.find(name);
  return found != capabilities.end() && found->second.isBool() && found->second.toBool();
}

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const auto capabilities = at::cpu::get_cpu_capabilities();
    const auto found = capabilities.find("l2_cache_size");
    return found != capabilities.end() && found->second.isInt() ? found->second.toInt() : int64_t{0};
  }();
  return bytes;
}

namespace {

// Widest first.
std::vector<const Kernels*> compiled() {
  std::vector<const Kernels*> tables;
#if defined(LSTM_FUSED_KERNELS_AVX512)
  tables.push_back(&AVX512::table);
#endif
#if defined(LSTM_FUSED_KERNELS_AVX2)
  tables.push_back(&AVX2::table);
#endif
#if defined(LSTM_FUSED_KERNELS_NEON)
  tables.push_back(&NEON::table);
#endif
  tables.push_back(&DEFAULT::table);
  return tables;
}

std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> tables;
  for (const Kernels* table : compiled()) {
    if (cpu_has(table->name)) {
      tables.push_back(table);
    }
  }
  return tables;
}

std::string names(const std::vector<const Kernels*>& tables) {
  std::string joined;
  for (const Kernels* table : tables) {
    joined += (joined.empty() ? "" : ", ") + std::string(table->name);
  }
  return joined;
}

const Kernels& find(const std::string& name, const char* asked_by) {
  for (const Kernels* table : supported()) {
    if (name == table->name) {
      return *table;
    }
  }
  const auto built = compiled();
  const bool is_built = std::any_of(built.begin(), built.end(), [&](const Kernels* t) { return name == t->name; });
  TORCH_CHECK(
      false, asked_by, " asks for the CPU path '", name, "', which ",
      is_built ? "this CPU lacks" : "this build of lstm_fused does not have", "; the paths this CPU can run: ",
      names(supported()), ".");
}

const Kernels& chosen_at_start() {
  const char* forced = std::getenv("LSTM_FUSED_CPU_CAPABILITY");
  if (forced != nullptr && *forced != '\0') {
    return find(forced, "LSTM_FUSED_CPU_CAPABILITY");
  }
  return *supported().front();
}

std::atomic<const Kernels*>& current() {
  // Chosen on first use; a bad LSTM_FUSED_CPU_CAPABILITY throws here, and again on every call.
  static std::atomic<const Kernels*> table{&chosen_at_start()};
  return table;
}

std::string cpu_capability() {
  return current().load()->name;
}

std::vector<std::string> supported_cpu_capabilities() {
  std::vector<std::string> list;
  for (const Kernels* table : supported()) {
    list.emplace_back(table->name);
  }
  return list;
}

// For the tests, which run every path in one process: makes `name` current and returns the
// previous one's name. Not for use while another thread is inside a kernel.
std::string set_cpu_capability(const std::string& name) {
  const Kernels& table = find(name, "_set_cpu_capability");
  return current().exchange(&table)->name;
}

}  // namespace

const Kernels& kernels() {
  return *current().load(std::memory_order_relaxed);
}

namespace small_batch {

// The path runs where the kernels have a vector type of the CPU's own; the portable one's products
// and its lane-by-lane libm exp/tanh took 0.13-0.57x nn.LSTM's time at batch 8-64 (T = 64, hidden
// 128-512, 2 threads, AMD Zen 4) where AVX2's took 0.85-1.37x, so there the library path runs
// instead (as before the path existed). Forcing "default" still runs the portable pointwise loops.
bool vector_path() {
  return &kernels() != &DEFAULT::table;
}

bool handles_cell(int64_t batch) {
  return batch <= kMaxCellBatch && vector_path();
}

bool handles_sequence(int64_t batch) {
  return batch <= kMaxSequenceBatch && vector_path();
}

namespace {
int64_t largest_sequence_batch() {
#if defined(LSTM_FUSED_KERNELS_AVX512)
  return &kernels() == &AVX512::table ? kMaxWideSequenceBatch : kMaxSequenceBatch;
#else
  return kMaxSequenceBatch;
#endif
}

// Threads that share packing a weight of `elements`: one more per 2^17 (512 KB of float32). At
// hidden 256 (2^18 elements a weight) two threads took a T = 1 call 1.3x below one thread's
// vectorised packing (Intel Xeon); below 2^17, where a team's start is a larger share, unmeasured.
int packing_threads(int64_t elements) {
  constexpr int64_t kElementsPerThread = int64_t{1} << 17;
  return static_cast<int>(std::clamp<int64_t>(elements / kElementsPerThread, 1, std::max(at::get_num_threads(), 1)));
}
}  // namespace

bool handles_float32_sequence(int64_t batch) {
  return batch <= largest_sequence_batch() && vector_path();
}

int threads_for(int64_t multiply_adds, int max_threads) {
  // Threads meet at a barrier every step (a few microseconds); below about 2^16 multiply-adds a
  // step (a few microseconds of work) a second thread cannot pay for it. A floor rather than a
  // tuned value: on the 2-core VM this path was written on, a second thread gained little at any
  // size (nn.LSTM there also ran slower on two threads than on one).
  constexpr int64_t kMultiplyAddsPerThread = int64_t{1} << 16;
  return static_cast<int>(std::clamp<int64_t>(multiply_adds / kMultiplyAddsPerThread, 1, std::max(max_threads, 1)));
}

int64_t gate_panels_size(int64_t hidden_size, int64_t state_size) {
  return kernels().gate_panels_size(hidden_size, state_size);
}
int64_t row_panels_size(int64_t rows, int64_t reduction) {
  return kernels().row_panels_size(rows, reduction);
}
int64_t unit_panels_size(int64_t rows, int64_t units) {
  return kernels().unit_panels_size(rows, units);
}
void pack_gate_panels(const float* weight_hh, int64_t hidden_size, int64_t state_size, float* panels) {
  kernels().pack_gate_panels(weight_hh, hidden_size, state_size, panels, packing_threads(4 * hidden_size * state_size));
}
void pack_row_panels(const float* weight, int64_t rows, int64_t reduction, float* panels) {
  kernels().pack_row_panels(weight, rows, reduction, panels);
}
void pack_unit_panels(const float* weight, int64_t rows, int64_t units, float* panels) {
  kernels().pack_unit_panels(weight, rows, units, panels, packing_threads(rows * units));
}
void cell_forward(const CellForward& args, int threads) {
  kernels().cell_forward(args, threads);
}
void cell_backward_products(const CellBackwardProducts& args, int threads) {
  kernels().cell_backward_products(args, threads);
}
void sequence_forward(const SequenceForward& args, int threads) {
  kernels().sequence_forward(args, threads);
}
void sequence_backward(const SequenceBackward& args, int threads) {
  kernels().sequence_backward(args, threads);
}

bool handles_reduced_sequence(int64_t batch, bool bfloat16) {
  const int64_t largest =
      bfloat16 && native_bfloat16_products() && bfloat16_tiles() ? largest_sequence_batch() : kMaxSequenceBatch;
  return batch <= largest && vector_path() && kernels().bfloat16_sequence_forward != nullptr &&
      kernels().half_sequence_forward != nullptr;
}

namespace {
std::atomic<bool> native_bfloat16_allowed{true};

// AMX's tiles rather than vdpbf16ps, at every batch: although a tile costs the same for 1 row as
// for 16, they were ahead from batch 1 (Xeon with AMX, 2 threads, T = 64, lf.LSTM's bfloat16
// forward: 0.24 against 0.25 ms at hidden 128, 1.44 against 1.63 ms at hidden 512; 18 against 54
// ms at batch 64, hidden 512).
std::atomic<bool> bfloat16_tiles_allowed{true};

bool cpu_has_amx_bfloat16() {
#if defined(LSTM_FUSED_KERNELS_AVX512)
  // Linux gives a process AMX's tile state only when it asks (arch_prctl): init_amx asks.
  static const bool usable = cpuinfo_has("amx_tile") && cpuinfo_has("amx_bf16") && at::cpu::init_amx();
  return usable;
#else
  return false;
#endif
}
}  // namespace

bool native_bfloat16_products() {
#if defined(LSTM_FUSED_KERNELS_AVX512)
  // Only the avx512 kernels are built with AVX512-BF16's products (bfloat16_products.cpp).
  static const bool cpu_has_avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  return cpu_has_avx512_bf16 && &kernels() == &AVX512::table && native_bfloat16_allowed.load();
#else
  return false;
#endif
}

int64_t pair_panels_size(int64_t rows, int64_t reduction) {
  return kernels().pair_panels_size(rows, reduction);
}
int64_t pair_gate_panels_size(int64_t hidden_size, int64_t state_size) {
  return kernels().pair_gate_panels_size(hidden_size, state_size);
}
void pack_pair_panels(const BFloat16Bits* weight, int64_t rows, int64_t reduction, BFloat16Bits* panels) {
  kernels().pack_bfloat16_pair_panels(weight, rows, reduction, panels);
}
void pack_pair_panels(const HalfBits* weight, int64_t rows, int64_t reduction, HalfBits* panels) {
  kernels().pack_half_pair_panels(weight, rows, reduction, panels);
}

void pack_pair_gate_panels(const BFloat16Bits* weight_hh, int64_t hidden_size, int64_t state_size, BFloat16Bits* panels) {
  kernels().pack_bfloat16_pair_gate_panels(weight_hh, hidden_size, state_size, panels,
                                           packing_threads(4 * hidden_size * state_size));
}
void pack_pair_gate_panels(const HalfBits* weight_hh, int64_t hidden_size, int64_t state_size, HalfBits* panels) {
  kernels().pack_half_pair_gate_panels(weight_hh, hidden_size, state_size, panels,
                                       packing_threads(4 * hidden_size * state_size));
}
void sequence_forward(const SequenceForwardOf<BFloat16Bits>& args, int threads) {
  kernels().bfloat16_sequence_forward(args, threads, native_bfloat16_products());
}
void sequence_forward(const SequenceForwardOf<HalfBits>& args, int threads) {
  kernels().half_sequence_forward(args, threads);
}
void pack_pair_unit_panels(const BFloat16Bits* weight, int64_t rows, int64_t units, BFloat16Bits* panels) {
  kernels().pack_bfloat16_pair_unit_panels(weight, rows, units, panels, packing_threads(rows * units));
}
void pack_pair_unit_panels(const HalfBits* weight, int64_t rows, int64_t units, HalfBits* panels) {
  kernels().pack_half_pair_unit_panels(weight, rows, units, panels, packing_threads(rows * units));
}
void sequence_backward(const SequenceBackwardOf<BFloat16Bits>& args, int threads) {
  kernels().bfloat16_sequence_backward(args, threads, native_bfloat16_products());
}
void sequence_backward(const SequenceBackwardOf<HalfBits>& args, int threads) {
  kernels().half_sequence_backward(args, threads);
}

namespace {
// For the tests: whether bfloat16 products may use AVX512-BF16 (where the CPU has it), returning
// the previous setting; off, they run the widened products every other CPU runs.
bool set_native_bfloat16_products(bool allowed) {
  return native_bfloat16_allowed.exchange(allowed);
}
bool uses_native_bfloat16_products() {
  return native_bfloat16_products();
}
// For the tests: whether bfloat16 products may use AMX (where the CPU has it), returning the
// previous setting; off, they run on vdpbf16ps.
bool set_bfloat16_tiles(bool allowed) {
  return bfloat16_tiles_allowed.exchange(allowed);
}
}  // namespace

}  // namespace small_batch

bool bfloat16_tiles() {
  return small_batch::bfloat16_tiles_allowed.load(std::memory_order_relaxed) && small_batch::cpu_has_amx_bfloat16();
}

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  m.def("cpu_capability() -> str", &cpu_capability);
  m.def("_supported_cpu_capabilities() -> str[]", &supported_cpu_capabilities);
  m.def("_set_cpu_capability(str name) -> str", &set_cpu_capability);
  m.def("_set_native_bfloat16_products(bool allowed) -> bool", &small_batch::set_native_bfloat16_products);
  m.def("_native_bfloat16_products() -> bool", &small_batch::uses_native_bfloat16_products);
  m.def("_set_bfloat16_tiles(bool allowed) -> bool", &small_batch::set_bfloat16_tiles);
  m.def("_bfloat16_tiles() -> bool", &bfloat16_tiles);
}

}  // namespace cpu
}  // namespace lstm_fused
