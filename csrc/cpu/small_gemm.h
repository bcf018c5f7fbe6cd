// y = x W^T (+ bias) for a few rows of x (decode-time linear layers), built per ISA level.
#pragma once

#include <cstdint>

namespace safedecode {

struct SmallGemm {
  const char* isa;
  // x [M, K] (row stride ldx), w [N, K] contiguous, bias [N] or null, y [M, N] (row stride ldy);
  // all fp32. OpenMP over output columns with num_threads (<= 0: the OpenMP default).
  void (*linear)(const float* x, int64_t ldx, const float* w, const float* bias, float* y,
                 int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads);
};

// The table for the vector ISA level in use (the level block_kernels() uses).
const SmallGemm& small_gemm();

}  // namespace safedecode
