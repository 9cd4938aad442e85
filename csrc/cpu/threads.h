// Teams of threads for the small-batch kernels. threads.cpp is the one place that knows whether
// the build has OpenMP (setup.py defines LSTM_FUSED_OPENMP where the compiler accepts -fopenmp):
// no other source includes <omp.h> or uses an OpenMP pragma. Free of ATen, so the kernels
// compiled per instruction set may include it.
#pragma once

namespace lstm_fused {
namespace cpu {

// Whether a team's threads run at the same time and can wait for each other at team_barrier()
// (OpenMP). Without OpenMP a team is a set of tasks that at::parallel_for may run one after
// another, so a kernel whose threads must meet runs as a team of one.
bool teams_can_meet();

// Runs body(context, thread, num_threads) for every thread of a team of at most `threads`
// (num_threads is the team's actual size: OpenMP may give fewer, inside another parallel region).
void run_team(int threads, void (*body)(const void* context, int thread, int num_threads), const void* context);

// Every thread of the running team waits here for the others. Only where teams_can_meet().
void team_barrier();

template <typename Fn>
void run_team(int threads, const Fn& fn) {
  run_team(
      threads, [](const void* context, int thread, int num_threads) { (*static_cast<const Fn*>(context))(thread, num_threads); },
      &fn);
}

}  // namespace cpu
}  // namespace lstm_fused
