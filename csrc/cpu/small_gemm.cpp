// y = x W^T (+ bias) for a few rows of x: the linear layers of one decode step.
//
// At decode time a linear layer sees 1 to 64 rows (requests x branches) against a weight matrix
// that does not fit in cache, so the step is bound by reading the weights. torch's CPU GEMM slows
// down for a few rows (2 rows ~10 % slower than 1, 8 rows ~2x: benchmarks/bench_linear.py); this
// kernel streams each row of W once per call: NB rows (a slab) at a time, kept in L1 while every
// row tile of x is multiplied against them, and the next slab prefetched meanwhile. Each OpenMP
// thread takes one contiguous share of the slabs. Built per ISA level like block_kernels.cpp,
// with FMA contraction on: AVX-512 uses intrinsics (4 x 4 accumulator tiles in registers, masked
// K tail), the other levels vector extensions one native register wide. Every output is summed
// by one thread in a fixed order, so results do not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
// GCC 12 warns about _mm512_undefined_ps inside its own headers (GCC bug 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "small_gemm.h"

#include "isa_prelude.h"

#if defined(__AVX512F__)
#define SD_TILE_M 4  // 4 x 4 accumulators + 4 weight + 1 input registers of 32
#else
#define SD_TILE_M 2  // AVX2: 2 x 4 + 4 + 1 of 16 registers
#endif
#define SD_INLINE_LAMBDA __attribute__((always_inline))

namespace safedecode {
namespace {

constexpr int W = SD_LANES;
constexpr int NB = 4;  // weight rows per tile
typedef float vf __attribute__((vector_size(4 * W)));

SD_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#define SHUF __builtin_shufflevector
// The sums of 4 vectors, in lanes 0, W/4, W/2 and 3W/4 of the result (a shuffle tree: 8 shuffles
// and 5 adds instead of 4 x (W - 1) dependent scalar adds).
SD_INLINE vf hsum4(vf a0, vf a1, vf a2, vf a3) {
#if SD_LANES == 16
  const vf b01 = SHUF(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 SHUF(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf b23 = SHUF(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 SHUF(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf c = SHUF(b01, b23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               SHUF(b01, b23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const vf d = c + SHUF(c, c, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return d + SHUF(d, d, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#elif SD_LANES == 8
  const vf b01 = SHUF(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
  const vf b23 = SHUF(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
  const vf c = SHUF(b01, b23, 0, 1, 4, 5, 8, 9, 12, 13) + SHUF(b01, b23, 2, 3, 6, 7, 10, 11, 14, 15);
  return c + SHUF(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
#else
  const vf b01 = SHUF(a0, a1, 0, 1, 4, 5) + SHUF(a0, a1, 2, 3, 6, 7);
  const vf b23 = SHUF(a2, a3, 0, 1, 4, 5) + SHUF(a2, a3, 2, 3, 6, 7);
  return SHUF(b01, b23, 0, 2, 4, 6) + SHUF(b01, b23, 1, 3, 5, 7);
#endif
}

SD_INLINE float hsum(vf v) {
  float r = 0.0f;
  for (int j = 0; j < W; ++j) r += v[j];
  return r;
}

// Rows m0..m0+MB of y, columns n0..n0+NR (NR <= NB).
template <int MB, int NR>
SD_INLINE void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                    float* y, int64_t ldy, int64_t m0, int64_t n0) {
  vf acc[MB][NR];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = vf{};
  const float* wr[NR];
  for (int j = 0; j < NR; ++j) wr[j] = w + (n0 + j) * K;
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = x + (m0 + i) * ldx;
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load(wr[j] + k);
    for (int i = 0; i < MB; ++i) {
      const vf xv = load(xr[i] + k);
      for (int j = 0; j < NR; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    if constexpr (NR == 4) {
      if (k == K) {  // no K tail: reduce the 4 columns together
        const vf r = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
        for (int j = 0; j < 4; ++j) {
          const float b = bias ? bias[n0 + j] : 0.0f;
          y[(m0 + i) * ldy + n0 + j] = r[j * (W / 4)] + b;
        }
        continue;
      }
    }
    for (int j = 0; j < NR; ++j) {
      float r = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) r += xr[i][kk] * wr[j][kk];
      if (bias) r += bias[n0 + j];
      y[(m0 + i) * ldy + n0 + j] = r;
    }
  }
}


#if defined(__AVX512F__) && defined(__AVX512DQ__)
// AVX-512: the same tile written with intrinsics, so that all MB x NR accumulators, the NR weight
// vectors and the input vector stay in registers (GCC spills the vector-extension version's 4 x 4
// tile), the K tail is a masked load instead of a scalar loop, and the next tile's weights are
// prefetched while this one computes.
SD_INLINE __m128 hsum4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 s = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <int MB, int NR>
SD_INLINE void tile512(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                       float* y, int64_t ldy, int64_t m0, int64_t n0, const float* next) {
  __m512 acc[MB][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* wr = w + n0 * K;
  const float* xr = x + m0 * ldx;
  int64_t k = 0;
  auto step = [&](int64_t kk, __mmask16 mask) SD_INLINE_LAMBDA {
    __m512 wv[NR];
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) wv[j] = _mm512_maskz_loadu_ps(mask, wr + j * K + kk);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xr + i * ldx + kk);
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  };
  for (; k + 16 <= K; k += 16) {
    if (next) {
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T0);
    }
    step(k, 0xFFFF);
  }
  if (k < K) step(k, static_cast<__mmask16>((1u << (K - k)) - 1));
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    float* yr = y + (m0 + i) * ldy + n0;
    if constexpr (NR == 4) {
      __m128 r = hsum4_512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      if (bias) r = _mm_add_ps(r, _mm_loadu_ps(bias + n0));
      _mm_storeu_ps(yr, r);
    } else {
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) {
        const __m512 a = acc[i][j];
        const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        q = _mm_add_ss(q, _mm_movehdup_ps(q));
        yr[j] = _mm_cvtss_f32(q) + (bias ? bias[n0 + j] : 0.0f);
      }
    }
  }
}
#endif

template <int MB>
SD_INLINE void columns(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                       float* y, int64_t ldy, int64_t m0, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) tile<MB, NB>(x, ldx, w, K, bias, y, ldy, m0, n);
  for (; n < n_end; ++n) tile<MB, 1>(x, ldx, w, K, bias, y, ldy, m0, n);
}

// Columns [n_begin, n_end) for all M rows: one NB-row slab of W at a time, every row tile of x.
void column_range(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                  float* y, int64_t ldy, int64_t M, int64_t n_begin, int64_t n_end) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    // The first row tile prefetches the next slab of W into L1 while it computes; the other row
    // tiles find this slab there. (Measured on the 30-layer decode: better than prefetching two
    // or more slabs ahead, or spreading the prefetches over all row tiles, into L1 or L2.)
    const float* next = n + 2 * NB <= n_end ? w + (n + NB) * K : nullptr;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile512<4, NB>(x, ldx, w, K, bias, y, ldy, m, n, m ? nullptr : next);
    if (m) next = nullptr;
    switch (M - m) {
      case 3: tile512<3, NB>(x, ldx, w, K, bias, y, ldy, m, n, next); break;
      case 2: tile512<2, NB>(x, ldx, w, K, bias, y, ldy, m, n, next); break;
      case 1: tile512<1, NB>(x, ldx, w, K, bias, y, ldy, m, n, next); break;
      default: break;
    }
  }
  for (; n < n_end; ++n)
    for (int64_t m = 0; m < M; ++m) tile512<1, 1>(x, ldx, w, K, bias, y, ldy, m, n, nullptr);
  return;
#endif
  for (int64_t n = n_begin; n < n_end; n += NB) {
    const int64_t ne = std::min(n + NB, n_end);
    int64_t m = 0;
    for (; m + SD_TILE_M <= M; m += SD_TILE_M)
      columns<SD_TILE_M>(x, ldx, w, K, bias, y, ldy, m, n, ne);
    if (SD_TILE_M > 2 && m + 2 <= M) {
      columns<2>(x, ldx, w, K, bias, y, ldy, m, n, ne);
      m += 2;
    }
    for (; m < M; ++m) columns<1>(x, ldx, w, K, bias, y, ldy, m, n, ne);
  }
}

void linear_small(const float* x, int64_t ldx, const float* w, const float* bias, float* y,
                  int64_t ldy, int64_t M, int64_t N, int64_t K, int num_threads) {
  // Each thread takes one contiguous, equal share of the NB-row slabs (one stream per thread;
  // 64-column work items split N = 192 two to one over two threads). Below kMinWork weights per
  // thread the fork/join costs more than it saves.
  constexpr int64_t kMinWork = 32 * 1024;
  const int64_t slabs = (N + NB - 1) / NB;
  const int64_t want = num_threads > 0 ? num_threads : omp_get_max_threads();
  const int nt = static_cast<int>(
      std::max<int64_t>(1, std::min({want, slabs, N * K / kMinWork})));
  if (nt == 1) {
    column_range(x, ldx, w, K, bias, y, ldy, M, 0, N);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t b = slabs * t / n * NB, e = std::min(N, slabs * (t + 1) / n * NB);
    if (b < e) column_range(x, ldx, w, K, bias, y, ldy, M, b, e);
  }
}

}  // namespace

extern const SmallGemm SD_CAT(kSmallGemm_, SD_ISA) = {SD_STR(SD_ISA), linear_small};

}  // namespace safedecode
