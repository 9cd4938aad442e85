// What the CPU can run, asked in one place (capability.cpp), for the code outside kernels/ whose
// choice of library depends on it.
#pragma once

#include <cstdint>
#include <string>

namespace lstm_fused {
namespace cpu {

// Whether this CPU runs the instruction set `name` ("avx512", "avx2", "neon", "default").
bool cpu_has(const std::string& name);

// Whether cpuinfo (through ATen) reports the feature `name` ("avx512_fp16", "amx_bf16", ...):
// clang 14's __builtin_cpu_supports has no names for these.
bool cpuinfo_has(const char* name);

// One core's L2 cache in bytes (cpuinfo's, through ATen); 0 where unknown.
int64_t l2_cache_bytes();

}  // namespace cpu
}  // namespace lstm_fused
