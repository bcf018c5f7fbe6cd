// Picks the block-kernel table for this CPU (see block_kernels.h). setup.py defines
// SD_HAVE_AVX512 / SD_HAVE_AVX2 when it built those levels.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "block_kernels.h"
#include "small_gemm.h"

namespace safedecode {

extern const BlockKernels kBlockKernels_baseline;
#ifdef SD_HAVE_AVX512
extern const BlockKernels kBlockKernels_avx512;
#endif
#ifdef SD_HAVE_AVX2
extern const BlockKernels kBlockKernels_avx2;
#endif

namespace {

// Levels built and runnable here, best first.
int runnable(const BlockKernels** out) {
  int n = 0;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#ifdef SD_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    out[n++] = &kBlockKernels_avx512;
  }
#endif
#ifdef SD_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2")) {
    out[n++] = &kBlockKernels_avx2;
  }
#endif
#endif
  out[n++] = &kBlockKernels_baseline;
  return n;
}

const BlockKernels* pick_default() {
  const BlockKernels* all[3];
  const int n = runnable(all);
  if (const char* want = std::getenv("SAFEDECODE_CPU_ISA")) {
    for (int i = 0; i < n; ++i)
      if (std::strcmp(all[i]->isa, want) == 0) return all[i];
  }
  return all[0];
}

std::atomic<const BlockKernels*>& current() {
  static std::atomic<const BlockKernels*> k{pick_default()};
  return k;
}

}  // namespace

const BlockKernels& block_kernels() { return *current().load(std::memory_order_relaxed); }

const SmallGemm& small_gemm() { return *block_kernels().gemm; }

int available_isas(const char** out, int cap) {
  const BlockKernels* all[3];
  const int n = runnable(all);
  int m = 0;
  for (int i = 0; i < n && m < cap; ++i) out[m++] = all[i]->isa;
  return m;
}

bool set_block_isa(const char* isa) {
  const BlockKernels* all[3];
  const int n = runnable(all);
  for (int i = 0; i < n; ++i) {
    if (std::strcmp(all[i]->isa, isa) == 0) {
      current().store(all[i], std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

}  // namespace safedecode
