// Definitions shared by the CPU kernels: the instruction-set switch and the thread-creation
// testing hook (cpu_isa.h, cpu_parallel.h).
#include "common/cpu_isa.h"
#include "common/cpu_parallel.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CNPOSE_X86 1
#endif

namespace cnpose {

std::atomic<int64_t>& thread_spawn_budget() {
  static std::atomic<int64_t> budget{-1};
  return budget;
}

bool cpu_supports(Isa isa) {
#ifdef CNPOSE_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl");
  return isa == Isa::kPortable || (isa == Isa::kAvx2 && avx2) || (isa == Isa::kAvx512 && avx512);
#else
  return isa == Isa::kPortable;
#endif
}

Isa best_isa() {
  return cpu_supports(Isa::kAvx512) ? Isa::kAvx512 : cpu_supports(Isa::kAvx2) ? Isa::kAvx2 : Isa::kPortable;
}

}  // namespace cnpose
