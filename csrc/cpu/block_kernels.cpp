// Vectorised per-block loops of the CPU backend (see block_kernels.h).
//
// Written with GCC/Clang vector extensions, one native register wide. setup.py compiles this file
// once per ISA level (-march=x86-64-v4 with SD_ISA=avx512, -march=x86-64-v3 with SD_ISA=avx2, and
// the baseline), each into its own table; block_dispatch.cpp picks the best one the CPU runs. The
// whole file must be built with the ISA flags (not target attributes: GCC lowers vector compares in
// inlined helpers for the default target) and with -ffp-contract=off, so s = w0*z0 + w1*z1 is
// rounded as PyTorch rounds it, never fused into an FMA.
#include "block_kernels.h"

#include <cstring>
#include <limits>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include "isa_prelude.h"

namespace safedecode {
namespace {

constexpr int W = SD_LANES;  // one native vector register of floats
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();

SD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SD_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
SD_INLINE vf splat(float x) { return vf{} + x; }
SD_INLINE vf select(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
SD_INLINE vf vmax(vf a, vf b) { return select(a > b, a, b); }  // == (a > b ? a : b) per lane
// Bit j set iff lane j of the compare mask m is set (one movemask instruction on x86).
SD_INLINE uint32_t lane_bits(vi m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m);
#elif defined(__AVX2__)
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m));
#elif defined(__SSE2__)
  return static_cast<uint32_t>(_mm_movemask_ps((__m128)m));
#else
  uint32_t bits = 0;
  for (int j = 0; j < W; ++j) bits |= static_cast<uint32_t>(m[j] & 1) << j;
  return bits;
#endif
}
SD_INLINE bool any(vi m) { return lane_bits(m) != 0; }
SD_INLINE float hmax(vf v) {
  float r = v[0];
  for (int j = 1; j < W; ++j) r = v[j] > r ? v[j] : r;
  return r;
}

// Writes the lanes of chunk i0 selected by `mask` (bit j = lane j) to the outputs at w.
// AVX-512 and AVX2 compress in registers; each store is a full vector, safe because the outputs
// have room for n and w <= i0. Returns the new w.
SD_INLINE int64_t emit_chunk(uint32_t mask, const float* s, const float* za, int64_t i0,
                             int64_t v0, int64_t w, int32_t* idx_out, float* s_out,
                             float* za_out) {
#if defined(__AVX512F__)
  const __mmask16 m = static_cast<__mmask16>(mask);
  const __m512i idx = _mm512_add_epi32(
      _mm512_set1_epi32(static_cast<int32_t>(v0 + i0)),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_si512(idx_out + w, _mm512_maskz_compress_epi32(m, idx));
  _mm512_storeu_ps(s_out + w, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(s + i0)));
  if (za_out) _mm512_storeu_ps(za_out + w, _mm512_maskz_compress_ps(m, _mm512_loadu_ps(za + i0)));
#elif defined(__AVX2__)
  // Lane indices of the set bits, packed low (pdep/pext, BMI2 is part of x86-64-v3).
  const uint64_t spread = _pdep_u64(mask, 0x0101010101010101ull) * 0xffu;
  const uint64_t picked = _pext_u64(0x0706050403020100ull, spread);
  const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(picked)));
  const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(v0 + i0)),
                                       _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx_out + w),
                      _mm256_permutevar8x32_epi32(idx, perm));
  _mm256_storeu_ps(s_out + w, _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + i0), perm));
  if (za_out) {
    _mm256_storeu_ps(za_out + w, _mm256_permutevar8x32_ps(_mm256_loadu_ps(za + i0), perm));
  }
#else
  int64_t wj = w;
  for (int j = 0; j < W; ++j) {
    idx_out[wj] = static_cast<int32_t>(v0 + i0 + j);
    s_out[wj] = s[i0 + j];
    if (za_out) za_out[wj] = za[i0 + j];
    wj += (mask >> j) & 1u;
  }
#endif
  return w + __builtin_popcount(mask);
}

template <int K, int Emit>
SD_INLINE BlockStats linear_impl(const float* const* z, const float* w, int anchor, int64_t n,
                                 float* s, const Emission& e) {
  const float* zk[K];
  float wk[K];
  for (int k = 0; k < K; ++k) {
    zk[k] = z[k];
    wk[k] = w[k];
  }
  const float* za = z[anchor];
  const vf ninf = splat(kNegInf), fmax = splat(kFloatMax), vthr = splat(e.thr);
  vf am = ninf, sm = ninf;
  vi bad = vi{};
  int64_t i = 0, wpos = 0;
  for (; i + W <= n; i += W) {
    vf x = load(zk[0] + i);
    vi ex = x == ninf;
    vi bd = ~(x <= fmax);  // NaN or +inf
    vf acc = wk[0] * x;
    for (int k = 1; k < K; ++k) {
      const vf y = load(zk[k] + i);
      ex |= y == ninf;
      bd |= ~(y <= fmax);
      acc = acc + wk[k] * y;
    }
    acc = select(ex, ninf, acc);
    store(s + i, acc);
    const vf a = load(za + i);
    am = vmax(a, am);
    sm = vmax(acc, sm);
    bad |= bd;
    if (Emit != kEmitNone) {
      const vf key = Emit == kEmitByScore ? acc : a;
      const uint32_t bits = lane_bits((key >= vthr) & (acc > ninf));
      if (bits) wpos = emit_chunk(bits, s, za, i, e.v0, wpos, e.idx, e.s, e.za);
    }
  }
  BlockStats st{hmax(am), hmax(sm), any(bad) ? 1 : 0, 0};
  for (; i < n; ++i) {
    bool ex = false;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      const float y = zk[k][i];
      ex |= y == kNegInf;
      st.bad |= !(y <= kFloatMax);
      acc = k == 0 ? wk[0] * y : acc + wk[k] * y;
    }
    acc = ex ? kNegInf : acc;
    s[i] = acc;
    st.amax = za[i] > st.amax ? za[i] : st.amax;
    st.smax = acc > st.smax ? acc : st.smax;
    if (Emit != kEmitNone) {
      e.idx[wpos] = static_cast<int32_t>(e.v0 + i);
      e.s[wpos] = acc;
      if (e.za) e.za[wpos] = za[i];
      const float key = Emit == kEmitByScore ? acc : za[i];
      wpos += (key >= e.thr && acc > kNegInf) ? 1 : 0;
    }
  }
  st.emitted = wpos;
  return st;
}

template <int K>
SD_INLINE BlockStats linear_k(const float* const* z, const float* w, int anchor, int64_t n,
                              float* s, const Emission& e) {
  switch (e.mode) {
    case kEmitByScore:
      return linear_impl<K, kEmitByScore>(z, w, anchor, n, s, e);
    case kEmitByAnchor:
      return linear_impl<K, kEmitByAnchor>(z, w, anchor, n, s, e);
    default:
      return linear_impl<K, kEmitNone>(z, w, anchor, n, s, e);
  }
}

void convert_block(const uint16_t* src, int dtype, int64_t n, float* dst) {
  int64_t i = 0;
  if (dtype == 1) {  // bf16: the high half of an fp32
    for (; i + W <= n; i += W) {
      vh h;
      std::memcpy(&h, src + i, sizeof(h));
      const vu bits = __builtin_convertvector(h, vu) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
    for (; i < n; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(dst + i, &bits, sizeof(bits));
    }
    return;
  }
  // fp16, branch-free: rebias the exponent by a multiply by 2^112 (exact, subnormals included).
  const vf scale = splat(5.192296858534828e+33f);
  for (; i + W <= n; i += W) {
    vh h;
    std::memcpy(&h, src + i, sizeof(h));
    const vu u = __builtin_convertvector(h, vu);
    const vu sign = (u & 0x8000u) << 16;
    const vu em = u & 0x7fffu;
    vu bits = (vu)((vf)(em << 13) * scale);
    bits |= (vu)(em >= 0x7c00u) & 0x7f800000u;  // inf / NaN
    bits |= sign;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
  for (; i < n; ++i) {
    const uint32_t u = src[i];
    const uint32_t sign = (u & 0x8000u) << 16;
    const uint32_t em = u & 0x7fffu;
    uint32_t bits = em << 13;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    f *= 5.192296858534828e+33f;
    std::memcpy(&bits, &f, sizeof(f));
    if (em >= 0x7c00u) bits |= 0x7f800000u;
    bits |= sign;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
}

BlockStats linear_block(int K, const float* const* z, const float* w, int anchor, int64_t n,
                        float* s, const Emission& e) {
  switch (K) {
    case 1:
      return linear_k<1>(z, w, anchor, n, s, e);
    case 2:
      return linear_k<2>(z, w, anchor, n, s, e);
    case 3:
      return linear_k<3>(z, w, anchor, n, s, e);
    default:
      return linear_k<kFusedMaxK>(z, w, anchor, n, s, e);
  }
}

int64_t compact_block(const float* key, float thr, const float* s, const float* za, int64_t n,
                      int64_t v0, int32_t* idx_out, float* s_out, float* za_out) {
  const vf vthr = splat(thr), ninf = splat(kNegInf);
  int64_t w = 0, i = 0;
  for (; i + W <= n; i += W) {
    const uint32_t bits = lane_bits((load(key + i) >= vthr) & (load(s + i) > ninf));
    if (bits == 0) continue;
    w = emit_chunk(bits, s, za, i, v0, w, idx_out, s_out, za_out);
  }
  for (; i < n; ++i) {
    idx_out[w] = static_cast<int32_t>(v0 + i);
    s_out[w] = s[i];
    if (za_out) za_out[w] = za[i];
    w += (key[i] >= thr && s[i] > kNegInf) ? 1 : 0;
  }
  return w;
}

// Order-preserving map float -> uint32 (a > b  =>  key(a) > key(b); -0 sorts just below +0).
SD_INLINE vu order_key(vf x) {
  const vu u = (vu)x;
  const vu neg = (vu)((vi)u >> 31);  // all ones for negative
  return u ^ (neg | 0x80000000u);
}
SD_INLINE uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u ^ ((u >> 31) ? 0xffffffffu : 0x80000000u);
}

// k-th largest of x[0..n) (1 <= k <= n) by bisection on the order-preserving keys: 32 vectorised
// counting passes, exact, no data movement. keys needs room for n rounded up to a vector.
float kth_largest(const float* x, int64_t n, int64_t k, uint32_t* keys) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vu kv = order_key(load(x + i));
    std::memcpy(keys + i, &kv, sizeof(kv));
  }
  const int64_t nv = i;
  for (; i < n; ++i) keys[i] = order_key(x[i]);
  uint32_t t = 0;  // invariant: at least k keys >= t
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = t | (1u << bit);
    vi cnt = vi{};
    const vu vc = vu{} + cand;
    for (int64_t j = 0; j < nv; j += W) {
      vu kv;
      std::memcpy(&kv, keys + j, sizeof(kv));
      cnt -= (vi)(kv >= vc);
    }
    int64_t c = 0;
    for (int j = 0; j < W; ++j) c += cnt[j];
    for (int64_t j = nv; j < n; ++j) c += keys[j] >= cand;
    if (c >= k) t = cand;
  }
  const uint32_t u = t ^ ((t >> 31) ? 0x80000000u : 0xffffffffu);
  float out;
  std::memcpy(&out, &u, sizeof(out));
  return out;
}

}  // namespace

extern const SmallGemm SD_CAT(kSmallGemm_, SD_ISA);  // small_gemm.cpp, same level

extern const BlockKernels SD_CAT(kBlockKernels_, SD_ISA) = {
    SD_STR(SD_ISA), SD_LANES, convert_block, linear_block, compact_block, kth_largest,
    &SD_CAT(kSmallGemm_, SD_ISA)};

}  // namespace safedecode
