// Philox4x32-10 counter-based RNG shared by the C++ and CUDA backends (host and device).
// Same stream as safedecode/ops/philox.py: key = (seed_lo, seed_hi), counter = (step_lo, step_hi,
// SALT, 0); the first two output words give a 53-bit double in [0, 1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SAFEDECODE_HD __host__ __device__ __forceinline__
#else
#define SAFEDECODE_HD inline
#endif

namespace safedecode {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr uint32_t kPhiloxSalt = 0x5AFEDEC0u;

struct Philox4 {
  uint32_t x[4];
};

SAFEDECODE_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                    uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// One uniform double in [0, 1) for (seed, step).
SAFEDECODE_HD double philox_uniform(uint64_t seed, uint64_t step) {
  const Philox4 o = philox4x32_10(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                                  kPhiloxSalt, 0u, static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32));
  const double hi = static_cast<double>(o.x[0] >> 5);
  const double lo = static_cast<double>(o.x[1] >> 6);
  return (hi * 67108864.0 + lo) * (1.0 / 9007199254740992.0);
}

}  // namespace safedecode
