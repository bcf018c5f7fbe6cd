// Macros shared by the sources that setup.py compiles once per ISA level (block_kernels.cpp,
// small_gemm.cpp): the level's name, one native vector register's float lanes, forced inlining
// and the name pasting for each level's exported table.
#pragma once

#ifndef SD_ISA
#define SD_ISA baseline
#endif
#if defined(__AVX512F__)
#define SD_LANES 16
#elif defined(__AVX2__)
#define SD_LANES 8
#else
#define SD_LANES 4
#endif
#define SD_INLINE inline __attribute__((always_inline))
#define SD_CAT2(a, b) a##b
#define SD_CAT(a, b) SD_CAT2(a, b)
#define SD_STR2(a) #a
#define SD_STR(a) SD_STR2(a)
