// The two threadings of threads.h: an OpenMP team, whose threads meet at barriers, or ATen's
// at::parallel_for, whose tasks may run one after another and so never wait for each other.
#include "threads.h"

#include <algorithm>

#if defined(LSTM_FUSED_OPENMP)
#include <omp.h>
#else
#include <ATen/Parallel.h>
#endif

namespace lstm_fused {
namespace cpu {

#if defined(LSTM_FUSED_OPENMP)

bool teams_can_meet() {
  return true;
}

void run_team(int threads, void (*body)(const void*, int, int), const void* context) {
  // Always a parallel region, even of one thread, so that a barrier inside body binds to this
  // team and never to a caller's.
#pragma omp parallel num_threads(std::max(threads, 1))
  body(context, omp_get_thread_num(), omp_get_num_threads());
}

void team_barrier() {
#pragma omp barrier
}

#else

bool teams_can_meet() {
  return false;
}

void run_team(int threads, void (*body)(const void*, int, int), const void* context) {
  if (threads <= 1) {
    body(context, 0, 1);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t thread = begin; thread < end; ++thread) {
      body(context, static_cast<int>(thread), threads);
    }
  });
}

void team_barrier() {}

#endif

}  // namespace cpu
}  // namespace lstm_fused
