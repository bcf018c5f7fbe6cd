// Portability layer: the kernels compile with nvcc, or with g++ against the CPU emulator in emu/
// (-DSD_EMULATE) so that their logic can be tested without a GPU.
#pragma once

#include <stdint.h>

#if defined(SD_EMULATE)
#include "emu/emu.h"
#define SD_DEV inline
#define SD_UNROLL
#define SD_DYN_SMEM() (::emu::g_dyn_smem)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SD_DEV __device__ __forceinline__
#define SD_UNROLL _Pragma("unroll")
#define SD_DYN_SMEM() (::safedecode::cuda::dyn_smem())
#endif

namespace safedecode {
namespace cuda {

#if defined(SD_EMULATE)
inline float bf16_bits_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  float f = __uint_as_float(em << 13) * 5.192296858534828e+33f;  // 2^112 rebiases the exponent
  uint32_t bits = __float_as_uint(f);
  if (em >= 0x7c00u) bits |= 0x7f800000u;  // inf / NaN
  return __uint_as_float(bits | sign);
}
inline float4 ld_f4(const float* p) {
  float4 v;
  std::memcpy(&v, p, 16);
  return v;
}
inline void st_f4(float* p, float4 v) { std::memcpy(p, &v, 16); }
inline uint4 ld_u4(const void* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
#else
SD_DEV float bf16_bits_to_float(uint16_t h) {
  return __bfloat162float(__ushort_as_bfloat16(h));
}
SD_DEV float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
SD_DEV float4 ld_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }
SD_DEV void st_f4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
SD_DEV uint4 ld_u4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ inline unsigned char* dyn_smem() {
  extern __shared__ __align__(16) unsigned char sd_dyn_smem[];
  return sd_dyn_smem;
}
#endif

}  // namespace cuda
}  // namespace safedecode
