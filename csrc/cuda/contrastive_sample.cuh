// Fused contrastive sampling: CUDA kernels (semantics: safedecode/ops/reference.py).
//
// Pipeline, five launches on one stream:
//   1. stats_kernel  grid (B, Cs): per vocabulary chunk, the anchor's max (plausibility cut) and,
//      for the union rule, both branches' online log-sum-exp. Cs and the chunk size depend on V
//      only, so the log-sum-exp has the same rounding in a batch of any size. Exits at once for
//      rows that need neither (linear rule, beta = 0).
//   2. score_kernel  grid (B, C): merges the row's stats partials, streams the K branches' logits
//      once (fp32/bf16/fp16, 16-byte loads), writes the masked fp32 score s to a [B, ld] workspace,
//      and per-chunk partials: max s with its lowest index (greedy token) and the status flags.
//      C (chunks per row) grows at small B so the logits are read by ~8 blocks per SM (at B = 1,
//      V = 128256: 251 blocks). Greedy rows of a sample call without log-probs skip the store.
//   3. xhist_kernel  grid (B, C): merges the partials, converts its chunk to x = (s - m) / T in
//      place (the selection's only division), and histograms the first (11-bit) radix digit of
//      the row's first search into a global [B, 2048] histogram (integer atomics: exact).
//   4. xcompact_kernel grid (B, C): where the first search's candidates (tokens at or above its
//      first-digit bucket) fit the row kernel's shared memory, copies each chunk's candidates to
//      a per-row list (one run per chunk, reserved with an atomic, gathered in chunk order).
//   5. row_kernel    grid (B), 512 threads, on the L2-resident x row:
//        - top-k threshold: radix select (11+8+8+5 bits) on the order-preserving key of x, the
//          first digit read from the xhist histogram, later ones counted in shared memory
//          (warp-aggregated atomics, __match_any_sync);
//        - top-p threshold: the same radix walk on exp(x) masses, held as exact 128-bit fixed
//          point (integer atomics: deterministic, order-free) and compared in fp64 with
//          top_p * Z;
//        - after the first digit, if the tokens at or above the chosen bucket fit in shared
//          memory (up to `cap`, ~16K), they are gathered there in vocabulary order (from the
//          xcompact lists for the first search) and every later step runs on that list: the
//          row kernel then never reads the row;
//        - final set = {x >= max(t_k, t_p, log_min_p)}; Z in fp64 with a fixed reduction order;
//          inverse-CDF draw in vocabulary order, skipping straight to the right tile through the
//          running sums recorded in the Z pass; or the [B, V] log-probs.
//      Rows with T = 0 that need no log-prob stop after the merge.
// Small B: the logits, the division, the first digit and the compaction are spread over B*C
// blocks; the rest of the selection runs on one SM per row over at most `cap` candidates (when
// they do not fit, e.g. a flat row with top-p 0.99, the row kernel falls back to passes over the
// row on one SM).
// Every reduction has a fixed order, so results do not depend on scheduling (same seed, same
// token). Rounding follows the reference: products and sums of s rounded separately (__fmul_rn /
// __fadd_rn, never FMA), x by IEEE division (__fdiv_rn).
#pragma once

#include "../philox.h"
#include "compat.cuh"

namespace safedecode {
namespace cuda {

enum : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum : int { kModeSample = 0, kModeLogprobs = 1 };
enum : int32_t { kOk = 0, kStNaN = 1, kStPosInf = 2, kStAnchorEmpty = 3, kStNoCandidate = 4 };
enum : int { kFlagNaN = 1, kFlagPosInf = 2, kFlagAnchorFinite = 4 };

constexpr unsigned kFull = 0xffffffffu;
constexpr int kVec = 8;               // logits per thread per step in the split kernels
constexpr int kU = 4;                 // float4 groups per thread per tile in the row kernel
constexpr int kHistBuckets = 2048;    // first radix digit: 11 bits
constexpr int kMaxSlots = 512;        // running-sum checkpoints of the draw
constexpr int kCapMax = 16384;        // shared-memory candidate list, at most
// Smallest key of a finite x (key_of(-inf) + 1; NaN is canonicalised to -inf). Top-k counts only
// keys from here up: masked tokens (-inf, e.g. outside the plausibility cut) are never
// candidates, so k above the finite count cuts nothing instead of sending the row kernel into
// passes over the whole row.
constexpr uint32_t kFiniteKey = 0x00800000u;
constexpr size_t kRowSmemFixed = kHistBuckets * (4 + 8 + 8) + kMaxSlots * 8;  // 45056 bytes

struct StatsPart {  // per (row, chunk)
  float amax;       // max anchor logit
  float m0, m1;     // union rule: running max of branches 0 / 1
  float pad;
  double s0, s1;    // sum exp(z - m) of branches 0 / 1
};

struct ScorePart {  // per (row, chunk)
  float smax;       // max masked score
  int32_t arg;      // lowest index attaining it (INT32_MAX if none)
  int32_t flags;    // kFlag*
  int32_t pad;
};

struct Params {
  const void* logits;
  int dtype, rule, anchor, mode;
  int64_t K, B, V, sk, sb;
  const float* weights;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* log_min_p;
  const float* log_beta;
  const int64_t* seed;
  const int64_t* step;
  float* ws;  // [B, ld] scores
  int64_t ld;
  StatsPart* stats;  // [B, Cs]
  ScorePart* score;  // [B, C]
  unsigned* hcnt;            // [B, kHistBuckets] first-digit counts of the row's first search
  unsigned long long* hlo;   // [B, kHistBuckets] its masses, 128-bit fixed point (low words)
  unsigned long long* hhi;   //                                              (high words)
  unsigned long long* cand_n;  // [B] candidates reserved so far (the xcompact kernel's atomics)
  int64_t* cofs;             // [B, C] offset of chunk c's candidate list in the row's [cap] lists
  int64_t* ccnt;             // [B, C] its length
  float* cand_x;             // [B, cap] candidate x, one contiguous run per chunk
  int* cand_i;               // [B, cap] candidate vocabulary index
  int64_t C, chunk;      // score kernel: chunks per row (grows at small B), tokens per chunk
  int64_t Cs, chunk_s;   // stats kernel: a chunking fixed by V alone (batch-invariant sums)
  int64_t* tokens;
  float* lps;
  float* out;
  int32_t* status;
  int cap;  // shared-memory candidate capacity of the row kernel
};

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

SD_DEV float neg_inf() { return __uint_as_float(0xff800000u); }
SD_DEV float pos_inf() { return __uint_as_float(0x7f800000u); }
SD_DEV float qnan() { return __uint_as_float(0x7fc00000u); }
template <typename T>
SD_DEV T imin(T a, T b) { return a < b ? a : b; }
template <typename T>
SD_DEV T imax(T a, T b) { return a < b ? b : a; }

// Order-preserving map float -> uint32 (larger float, larger key); -0.0 is canonicalised first.
SD_DEV uint32_t key_of(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
SD_DEV float float_of_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
// x as the radix select sees it: -0.0 -> +0.0 (equal floats, equal keys); NaN (only possible
// with overflowing weights) -> -inf.
SD_DEV float canon(float x) {
  x = (x == 0.0f) ? 0.0f : x;
  return (x != x) ? neg_inf() : x;
}

struct U128 {
  unsigned long long lo, hi;
};
SD_DEV U128 u128_add(U128 a, U128 b) {
  U128 r;
  r.lo = a.lo + b.lo;
  r.hi = a.hi + b.hi + (r.lo < a.lo ? 1ull : 0ull);
  return r;
}
// Monotone (non-decreasing) conversion, exact below 2^53.
SD_DEV double u128_to_double(U128 a) {
  return static_cast<double>(a.hi) * 18446744073709551616.0 + static_cast<double>(a.lo);
}
// exp(x) in [0, 1] as fixed point with 58 fractional bits (a warp's 32 sum to < 2^64).
SD_DEV unsigned long long mass_fixed(float e) { return __float2ull_rz(e * 288230376151711744.0f); }

struct AddOp {
  template <typename T>
  SD_DEV T operator()(T a, T b) const { return a + b; }
  SD_DEV U128 operator()(U128 a, U128 b) const { return u128_add(a, b); }
};
struct MaxOp {
  template <typename T>
  SD_DEV T operator()(T a, T b) const { return a < b ? b : a; }
};
struct MinOp {
  template <typename T>
  SD_DEV T operator()(T a, T b) const { return b < a ? b : a; }
};
struct OrOp {
  SD_DEV int operator()(int a, int b) const { return a | b; }
};

struct ArgMax {
  float v;
  int32_t i;
};
// Larger value wins, lowest index on ties: a total order, so the reduction order is irrelevant.
struct ArgMaxOp {
  SD_DEV ArgMax operator()(ArgMax a, ArgMax b) const {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
  }
};

struct Lse {  // online log-sum-exp state: max m and sum exp(z - m)
  float m;
  float pad;
  double s;
};
SD_DEV void lse_add(Lse& a, float z) {
  if (!(z > neg_inf())) return;  // -inf (and NaN: such rows are reported bad) add nothing
  if (z > a.m) {
    a.s = a.s * static_cast<double>(expf(a.m - z)) + 1.0;
    a.m = z;
  } else {
    a.s += static_cast<double>(expf(z - a.m));
  }
}
// Symmetric in its arguments (bit for bit), so butterfly reductions agree on every lane.
struct LseOp {
  SD_DEV Lse operator()(Lse a, Lse b) const {
    Lse r;
    r.m = fmaxf(a.m, b.m);
    r.pad = 0.0f;
    if (!(r.m > neg_inf())) {
      r.s = 0.0;
      return r;
    }
    const double x = (a.m > neg_inf()) ? a.s * static_cast<double>(expf(a.m - r.m)) : 0.0;
    const double y = (b.m > neg_inf()) ? b.s * static_cast<double>(expf(b.m - r.m)) : 0.0;
    r.s = x + y;
    return r;
  }
};

// ---------------------------------------------------------------------------------------------
// Warp / block primitives (shuffle based, fixed reduction order)
// ---------------------------------------------------------------------------------------------

template <typename T>
SD_DEV T shfl_xor_t(T v, int m) {
  static_assert(sizeof(T) % 4 == 0, "shuffled types are made of 32-bit words");
  uint32_t w[sizeof(T) / 4];
  memcpy(w, &v, sizeof(T));
  SD_UNROLL
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_xor_sync(kFull, w[i], m);
  memcpy(&v, w, sizeof(T));
  return v;
}
template <typename T>
SD_DEV T shfl_up_t(T v, unsigned d) {
  uint32_t w[sizeof(T) / 4];
  memcpy(w, &v, sizeof(T));
  SD_UNROLL
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_up_sync(kFull, w[i], d);
  memcpy(&v, w, sizeof(T));
  return v;
}
template <typename T>
SD_DEV T shfl_t(T v, int src) {
  uint32_t w[sizeof(T) / 4];
  memcpy(w, &v, sizeof(T));
  SD_UNROLL
  for (int i = 0; i < static_cast<int>(sizeof(T) / 4); ++i) w[i] = __shfl_sync(kFull, w[i], src);
  memcpy(&v, w, sizeof(T));
  return v;
}

SD_DEV int lane_id() { return static_cast<int>(threadIdx.x & 31u); }
SD_DEV int warp_id() { return static_cast<int>(threadIdx.x >> 5); }

// Butterfly reduction; with a commutative op every lane ends with the same value.
template <typename T, typename Op>
SD_DEV T warp_allreduce(T v, Op op) {
  SD_UNROLL
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl_xor_t(v, o));
  return v;
}

// Every thread gets the block-wide result (same bits everywhere: warp results are combined in
// warp order by each thread).
template <int NT, typename T, typename Op>
SD_DEV T block_allreduce(T v, Op op) {
  __shared__ T scratch[NT / 32];
  v = warp_allreduce(v, op);
  if (lane_id() == 0) scratch[warp_id()] = v;
  __syncthreads();
  T r = scratch[0];
  for (int i = 1; i < NT / 32; ++i) r = op(r, scratch[i]);
  __syncthreads();
  return r;
}

template <typename T>
SD_DEV T warp_incl_scan(T v) {
  const int lane = lane_id();
  AddOp add;
  SD_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const T t = shfl_up_t(v, static_cast<unsigned>(d));
    if (lane >= d) v = add(t, v);
  }
  return v;
}

// Exclusive prefix sum over threads in thread order; `total` = block sum.
template <int NT, typename T>
SD_DEV T block_excl_scan(T v, T zero, T& total) {
  __shared__ T scratch[NT / 32];
  AddOp add;
  const int lane = lane_id(), warp = warp_id();
  const T inc = warp_incl_scan(v);
  T ex = shfl_up_t(inc, 1u);
  if (lane == 0) ex = zero;
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  T before = zero, tot = zero;
  for (int i = 0; i < NT / 32; ++i) {
    const T s = scratch[i];
    if (i < warp) before = add(before, s);
    tot = add(tot, s);
  }
  __syncthreads();
  total = tot;
  return add(before, ex);
}

// Ordered scan over a row-kernel tile: warp w owns a contiguous span of 128*kU elements, lane l
// the float4 groups u*128 + 4l. v[u] = this thread's sum over group u; off[u] = sum over the
// tile's elements before group u (vocabulary order). Returns the tile total.
template <int NT, typename T>
SD_DEV T tile_excl_scan(const T (&v)[kU], T (&off)[kU], T zero) {
  __shared__ T scratch[NT / 32];
  AddOp add;
  const int lane = lane_id(), warp = warp_id();
  T run = zero;
  SD_UNROLL
  for (int u = 0; u < kU; ++u) {
    const T inc = warp_incl_scan(v[u]);
    T ex = shfl_up_t(inc, 1u);
    if (lane == 0) ex = zero;
    const T tot = shfl_t(inc, 31);
    off[u] = add(run, ex);
    run = add(run, tot);
  }
  if (lane == 0) scratch[warp] = run;
  __syncthreads();
  T before = zero, tot = zero;
  for (int i = 0; i < NT / 32; ++i) {
    const T s = scratch[i];
    if (i < warp) before = add(before, s);
    tot = add(tot, s);
  }
  __syncthreads();
  SD_UNROLL
  for (int u = 0; u < kU; ++u) off[u] = add(before, off[u]);
  return tot;
}

// Sum of x over the lanes in `peers` (a partition of the warp); valid on the lowest peer.
// (Tree over each peer group; Westphal, "Voting and shuffling to optimize atomic operations".)
SD_DEV unsigned long long reduce_peers(unsigned peers, unsigned long long x) {
  const int lane = lane_id();
  unsigned rel = __popc(peers & ((1u << lane) - 1u));  // peers below this lane
  peers &= 0xfffffffeu << lane;                         // peers above this lane
  while (__any_sync(kFull, peers != 0u)) {
    const int next = __ffs(peers);
    const unsigned long long t = __shfl_sync(kFull, x, (next - 1) & 31);
    if (next) x += t;
    const unsigned done = __ballot_sync(kFull, (rel & 1u) != 0u);
    peers &= ~done;
    rel >>= 1;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Logits loading (split kernels): 8 consecutive elements of one (k, b) row
// ---------------------------------------------------------------------------------------------

template <int DT>
struct Logits;

template <>
struct Logits<kF32> {
  static constexpr int kBytes = 4;
  SD_DEV static void load8(const unsigned char* row, int64_t v0, int n, bool vec, float (&z)[8]) {
    const float* p = reinterpret_cast<const float*>(row) + v0;
    if (vec && n == 8) {
      const float4 a = ld_f4(p), b = ld_f4(p + 4);
      z[0] = a.x, z[1] = a.y, z[2] = a.z, z[3] = a.w;
      z[4] = b.x, z[5] = b.y, z[6] = b.z, z[7] = b.w;
    } else {
      SD_UNROLL
      for (int j = 0; j < 8; ++j) z[j] = (j < n) ? p[j] : 0.0f;
    }
  }
};

template <int DT>
struct Logits16 {
  static constexpr int kBytes = 2;
  SD_DEV static float cvt(uint16_t h) {
    return DT == kBF16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
  }
  SD_DEV static void load8(const unsigned char* row, int64_t v0, int n, bool vec, float (&z)[8]) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(row) + v0;
    if (vec && n == 8) {
      const uint4 q = ld_u4(p);
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
      SD_UNROLL
      for (int j = 0; j < 4; ++j) {
        z[2 * j] = cvt(static_cast<uint16_t>(w[j] & 0xffffu));  // little endian
        z[2 * j + 1] = cvt(static_cast<uint16_t>(w[j] >> 16));
      }
    } else {
      SD_UNROLL
      for (int j = 0; j < 8; ++j) z[j] = (j < n) ? cvt(p[j]) : 0.0f;
    }
  }
};
template <>
struct Logits<kBF16> : Logits16<kBF16> {};
template <>
struct Logits<kF16> : Logits16<kF16> {};

SD_DEV const unsigned char* logits_row(const Params& p, int64_t k, int64_t b, int bytes) {
  return static_cast<const unsigned char*>(p.logits) + (k * p.sk + b * p.sb) * bytes;
}
SD_DEV bool aligned16(const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; }

// The row's first threshold search, whose first digit the xhist kernel histograms across blocks:
// 0 none (or the row needs no distribution), 1 top-k (counts), 2 top-p without top-k (masses).
SD_DEV int first_search(const Params& p, int64_t b) {
  if (p.mode == kModeSample && p.lps == nullptr && !(p.temperature[b] > 0.0f)) return 0;
  const int64_t k = p.top_k[b];
  if (k > 0 && k < p.V) return 1;
  return p.top_p[b] < 1.0f ? 2 : 0;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: per-chunk statistics (anchor max; union rule: both branches' log-sum-exp)
// ---------------------------------------------------------------------------------------------

template <int DT, int NT>
__global__ void __launch_bounds__(NT) stats_kernel(Params p) {
  using L = Logits<DT>;
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const bool beta_on = p.log_beta[b] > neg_inf();
  const bool uni = p.rule == 1;
  if (!uni && !beta_on) return;  // nothing to compute for this row (uniform over the block)
  // The chunking depends on V only: the union rule's log-sum-exp has the same rounding in a
  // batch of any size (the score kernel's chunking, which grows at small B, never touches it).
  const int64_t v_begin = c * p.chunk_s, v_end = imin(p.V, v_begin + p.chunk_s);
  const unsigned char* ra = logits_row(p, p.anchor, b, L::kBytes);
  const unsigned char* r0 = logits_row(p, 0, b, L::kBytes);
  const unsigned char* r1 = uni ? logits_row(p, 1, b, L::kBytes) : r0;
  const bool vec = aligned16(ra) && aligned16(r0) && aligned16(r1);
  float amax = neg_inf();
  Lse l0 = {neg_inf(), 0.0f, 0.0}, l1 = {neg_inf(), 0.0f, 0.0};
  for (int64_t v0 = v_begin + kVec * static_cast<int64_t>(threadIdx.x); v0 < v_end;
       v0 += kVec * NT) {
    const int n = static_cast<int>(imin<int64_t>(kVec, v_end - v0));
    float z[8];
    if (beta_on) {
      L::load8(ra, v0, n, vec, z);
      SD_UNROLL
      for (int j = 0; j < 8; ++j)
        if (j < n) amax = fmaxf(amax, z[j]);
    }
    if (uni) {
      L::load8(r0, v0, n, vec, z);
      SD_UNROLL
      for (int j = 0; j < 8; ++j)
        if (j < n) lse_add(l0, z[j]);
      L::load8(r1, v0, n, vec, z);
      SD_UNROLL
      for (int j = 0; j < 8; ++j)
        if (j < n) lse_add(l1, z[j]);
    }
  }
  amax = block_allreduce<NT>(amax, MaxOp());
  l0 = block_allreduce<NT>(l0, LseOp());
  l1 = block_allreduce<NT>(l1, LseOp());
  if (threadIdx.x == 0) {
    StatsPart s;
    s.amax = amax;
    s.m0 = l0.m;
    s.m1 = l1.m;
    s.pad = 0.0f;
    s.s0 = l0.s;
    s.s1 = l1.s;
    p.stats[b * p.Cs + c] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: masked scores s -> workspace, per-chunk max / argmax / status flags
// ---------------------------------------------------------------------------------------------

template <int DT, int NT>
__global__ void __launch_bounds__(NT) score_kernel(Params p) {
  using L = Logits<DT>;
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const float log_beta = p.log_beta[b];
  const bool beta_on = log_beta > neg_inf();
  const bool uni = p.rule == 1;
  const float* w = p.weights + b * p.K;

  // Row statistics, merged from the stats partials in a fixed order (same bits in every chunk).
  __shared__ float row_stats[5];  // amax, max0, logsum0, max1, logsum1
  if (uni || beta_on) {
    if (threadIdx.x < 32) {
      float amax = neg_inf();
      Lse l0 = {neg_inf(), 0.0f, 0.0}, l1 = {neg_inf(), 0.0f, 0.0};
      for (int64_t i = lane_id(); i < p.Cs; i += 32) {
        const StatsPart q = p.stats[b * p.Cs + i];
        amax = fmaxf(amax, q.amax);
        l0 = LseOp()(l0, Lse{q.m0, 0.0f, q.s0});
        l1 = LseOp()(l1, Lse{q.m1, 0.0f, q.s1});
      }
      amax = warp_allreduce(amax, MaxOp());
      l0 = warp_allreduce(l0, LseOp());
      l1 = warp_allreduce(l1, LseOp());
      if (threadIdx.x == 0) {
        row_stats[0] = amax;
        row_stats[1] = l0.m;
        row_stats[2] = logf(static_cast<float>(l0.s));
        row_stats[3] = l1.m;
        row_stats[4] = logf(static_cast<float>(l1.s));
      }
    }
    __syncthreads();
  }
  const float plaus = beta_on ? __fadd_rn(row_stats[0], log_beta) : neg_inf();
  const float mx0 = uni ? row_stats[1] : 0.0f, ls0 = uni ? row_stats[2] : 0.0f;
  const float mx1 = uni ? row_stats[3] : 0.0f, ls1 = uni ? row_stats[4] : 0.0f;
  const float gamma = uni ? w[1] : 0.0f;

  bool vec = true;
  for (int64_t k = 0; k < p.K; ++k) vec = vec && aligned16(logits_row(p, k, b, L::kBytes));
  const int64_t v_begin = c * p.chunk, v_end = imin(p.V, v_begin + p.chunk);
  float* srow = p.ws + b * p.ld;
  // Greedy rows of a sample call without log-probs need only the argmax: skip the score store.
  const bool store = !(p.mode == kModeSample && p.lps == nullptr && !(p.temperature[b] > 0.0f));
  ArgMax best = {neg_inf(), 0x7fffffff};
  int flags = 0;

  for (int64_t v0 = v_begin + kVec * static_cast<int64_t>(threadIdx.x); v0 < v_end;
       v0 += kVec * NT) {
    const int n = static_cast<int>(imin<int64_t>(kVec, v_end - v0));
    float s[8], za[8], z[8];
    bool ex[8];
    SD_UNROLL
    for (int j = 0; j < 8; ++j) s[j] = 0.0f, za[j] = 0.0f, ex[j] = false;
    if (!uni) {
      for (int64_t k = 0; k < p.K; ++k) {
        L::load8(logits_row(p, k, b, L::kBytes), v0, n, vec, z);
        const float wk = w[k];
        const bool is_anchor = k == p.anchor;
        SD_UNROLL
        for (int j = 0; j < 8; ++j) {
          if (j < n) {
            flags |= (z[j] != z[j]) ? kFlagNaN : 0;
            flags |= (z[j] == pos_inf()) ? kFlagPosInf : 0;
          }
          if (is_anchor) za[j] = z[j];
          if (wk != 0.0f) {
            s[j] = __fadd_rn(s[j], __fmul_rn(wk, z[j]));  // separately rounded, no FMA
            ex[j] = ex[j] || (z[j] == neg_inf());
          }
        }
      }
    } else {
      float z1[8];
      L::load8(logits_row(p, 0, b, L::kBytes), v0, n, vec, z);
      L::load8(logits_row(p, 1, b, L::kBytes), v0, n, vec, z1);
      SD_UNROLL
      for (int j = 0; j < 8; ++j) {
        if (j < n) {
          flags |= (z[j] != z[j] || z1[j] != z1[j]) ? kFlagNaN : 0;
          flags |= (z[j] == pos_inf() || z1[j] == pos_inf()) ? kFlagPosInf : 0;
        }
        za[j] = p.anchor == 0 ? z[j] : z1[j];
        // log_softmax as torch computes it: (z - max) - log(sum exp(z - max)).
        const float lp0 = __fsub_rn(__fsub_rn(z[j], mx0), ls0);
        if (gamma != 0.0f) {
          const float lp1 = __fsub_rn(__fsub_rn(z1[j], mx1), ls1);
          const float d = __fsub_rn(lp0, lp1);
          const float cl = (d > 0.0f) ? 0.0f : d;  // clamp(max=0), NaN passes through
          s[j] = __fadd_rn(lp0, __fmul_rn(gamma, cl));
          ex[j] = ex[j] || (z1[j] == neg_inf());
        } else {
          s[j] = lp0;
        }
        ex[j] = ex[j] || (z[j] == neg_inf());
      }
    }
    SD_UNROLL
    for (int j = 0; j < 8; ++j) {
      if (j < n && za[j] > neg_inf()) flags |= kFlagAnchorFinite;
      ex[j] = ex[j] || (za[j] == neg_inf()) || (beta_on && za[j] < plaus);
      s[j] = ex[j] ? neg_inf() : s[j];
      if (j < n && s[j] > best.v) {  // strict: the first (lowest) index wins ties
        best.v = s[j];
        best.i = static_cast<int32_t>(v0 + j);
      }
    }
    if (!store) {
      // nothing to write
    } else if (n == 8) {
      st_f4(srow + v0, float4{s[0], s[1], s[2], s[3]});
      st_f4(srow + v0 + 4, float4{s[4], s[5], s[6], s[7]});
    } else {
      SD_UNROLL
      for (int j = 0; j < 8; ++j)
        if (j < n) srow[v0 + j] = s[j];
    }
  }
  best = block_allreduce<NT>(best, ArgMaxOp());
  flags = block_allreduce<NT>(flags, OrOp());
  if (threadIdx.x == 0) {
    ScorePart q;
    q.smax = best.v;
    q.arg = best.i;
    q.flags = flags;
    q.pad = 0;
    p.score[b * p.C + c] = q;
  }
  if (c == 0 && first_search(p, b) != 0) {  // the xhist / xcompact kernels add into this row
    if (threadIdx.x == 0) p.cand_n[b] = 0ull;
    for (int64_t i = threadIdx.x; i < kHistBuckets; i += NT) {
      p.hcnt[b * kHistBuckets + i] = 0u;
      p.hlo[b * kHistBuckets + i] = 0ull;
      p.hhi[b * kHistBuckets + i] = 0ull;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: one block per row: thresholds, normaliser, draw / log-probs
// ---------------------------------------------------------------------------------------------

struct RowSmem {  // dynamic shared memory of the row kernel
  unsigned* cnt;             // [kHistBuckets] radix counts
  unsigned long long* lo;    // [kHistBuckets] radix masses, 128-bit fixed point (low words)
  unsigned long long* hi;    //                                               (high words)
  double* slot;              // [kMaxSlots] running sums at draw checkpoints
  float* cx;                 // [cap] candidate x (vocabulary order)
  int* ci;                   // [cap] candidate vocabulary index
};

SD_DEV RowSmem row_smem(unsigned char* base, int cap) {
  RowSmem s;
  s.cnt = reinterpret_cast<unsigned*>(base);
  s.lo = reinterpret_cast<unsigned long long*>(base + kHistBuckets * 4);
  s.hi = reinterpret_cast<unsigned long long*>(base + kHistBuckets * 12);
  s.slot = reinterpret_cast<double*>(base + kHistBuckets * 20);
  s.cx = reinterpret_cast<float*>(base + kRowSmemFixed);
  s.ci = reinterpret_cast<int*>(base + kRowSmemFixed + 4 * static_cast<size_t>(cap));
  return s;
}

// The row in global memory: x = canon((s - m) / T), converted in place from the scores by the
// xhist kernel, so no pass of the row kernel divides.
struct GlobalSrc {
  const float* s;
  int64_t n;
  SD_DEV void load4(int64_t pos, float (&x)[4], bool (&ok)[4]) const {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (pos < n) {  // ld is a multiple of 4: the float4 stays inside the row
      const float4 q = ld_f4(s + pos);
      r[0] = q.x, r[1] = q.y, r[2] = q.z, r[3] = q.w;
    }
    SD_UNROLL
    for (int j = 0; j < 4; ++j) {
      ok[j] = pos + j < n;
      x[j] = ok[j] ? r[j] : neg_inf();
    }
  }
  SD_DEV int64_t index(int64_t pos) const { return pos; }
  SD_DEV float x_at(int64_t pos) const { return s[pos]; }
};

// The candidate list in shared memory (vocabulary order).
struct SmemSrc {
  const float* x;
  const int* idx;
  int64_t n;
  SD_DEV void load4(int64_t pos, float (&xo)[4], bool (&ok)[4]) const {
    float r[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (pos < n) {  // cap is a multiple of 4
      const float4 q = ld_f4(x + pos);
      r[0] = q.x, r[1] = q.y, r[2] = q.z, r[3] = q.w;
    }
    SD_UNROLL
    for (int j = 0; j < 4; ++j) {
      ok[j] = pos + j < n;
      xo[j] = ok[j] ? r[j] : neg_inf();
    }
  }
  SD_DEV int64_t index(int64_t pos) const { return idx[pos]; }
  SD_DEV float x_at(int64_t pos) const { return x[pos]; }
};

struct RowCtx {
  RowSmem sm;
  int cap;
  GlobalSrc g;
  bool in_smem;  // the candidate list replaced the row (same value in every thread)
  int64_t n_cand;
  SD_DEV SmemSrc smem_src() const { return SmemSrc{sm.cx, sm.ci, n_cand}; }
};

// Runs `body` (which names the source `src`) on the candidate list or on the global row.
#define SD_WITH_SRC(ctx, body)                   \
  do {                                           \
    if ((ctx).in_smem) {                         \
      const SmemSrc src = (ctx).smem_src();      \
      body;                                      \
    } else {                                     \
      const GlobalSrc src = (ctx).g;             \
      body;                                      \
    }                                            \
  } while (0)

template <int NT>
struct Tile {
  static constexpr int64_t kSize = static_cast<int64_t>(NT) * 4 * kU;
  // First element of float4 group u of this thread in tile t.
  SD_DEV static int64_t pos(int64_t t, int u) {
    return t * kSize + warp_id() * (128 * kU) + u * 128 + lane_id() * 4;
  }
  SD_DEV static int64_t count(int64_t n) { return (n + kSize - 1) / kSize; }
};

SD_DEV int level_shift(int level) { return level == 0 ? 21 : level == 1 ? 13 : level == 2 ? 5 : 0; }
SD_DEV int level_bits(int level) { return level == 0 ? 11 : level == 3 ? 5 : 8; }

// Adds (count 1, mass) for each active lane to its bucket; all 32 lanes must call.
SD_DEV void warp_hist_add(const RowSmem& sm, bool act, uint32_t bucket, unsigned long long mass,
                          bool with_mass) {
  if (__ballot_sync(kFull, act) == 0u) return;
  const unsigned peers = __match_any_sync(kFull, act ? bucket : 0xffffffffu);
  const bool any_mass = with_mass && __any_sync(kFull, mass != 0ull);
  const unsigned long long sum = any_mass ? reduce_peers(peers, mass) : 0ull;
  if (act && lane_id() == __ffs(peers) - 1) {
    atomicAdd(&sm.cnt[bucket], static_cast<unsigned>(__popc(peers)));
    if (sum != 0ull) {
      const unsigned long long old = atomicAdd(&sm.lo[bucket], sum);
      if (old + sum < old) atomicAdd(&sm.hi[bucket], 1ull);  // carry: exact 128-bit sums
    }
  }
}

// Histogram of one radix digit over the eligible (key >= elig_key) elements whose higher digits
// equal `prefix`.
template <int NT, typename Src>
SD_DEV void hist_pass(const Src& src, const RowSmem& sm, int level, uint32_t prefix,
                      uint32_t elig_key, bool with_mass) {
  const int shift = level_shift(level), nb = 1 << level_bits(level);
  const int pshift = shift + level_bits(level);  // 32 at level 0: no prefix yet
  for (int i = static_cast<int>(threadIdx.x); i < nb; i += NT) {
    sm.cnt[i] = 0u;
    sm.lo[i] = 0ull;
    sm.hi[i] = 0ull;
  }
  __syncthreads();
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      const int64_t pos = Tile<NT>::pos(t, u);
      float x[4];
      bool ok[4];
      src.load4(pos, x, ok);
      SD_UNROLL
      for (int j = 0; j < 4; ++j) {
        const uint32_t key = key_of(x[j]);
        const bool act = ok[j] && key >= elig_key && (pshift >= 32 || (key >> pshift) == prefix);
        const uint32_t bucket = (key >> shift) & static_cast<uint32_t>(nb - 1);
        const unsigned long long mass = (with_mass && act) ? mass_fixed(expf(x[j])) : 0ull;
        warp_hist_add(sm, act, bucket, mass, with_mass);
      }
    }
  }
  __syncthreads();
}

struct Found {
  int bucket;          // -1 if none (cannot happen for consistent inputs)
  int64_t above_cnt;   // eligible elements in higher buckets (plus earlier levels' excess)
  int64_t cum_cnt;     // ... including the chosen bucket
  U128 above_mass;     // mass above the chosen bucket (mass mode), including earlier levels
};

// Walks the buckets from the top: count mode stops where the cumulative count reaches r (the
// rank of the k-th largest), mass mode where mass_above + cumulative mass reaches `target`
// (computed here at level 0 as top_p * total).
template <int NT>
SD_DEV Found find_bucket(const RowSmem& sm, int nb, bool mass_mode, int64_t r, U128 mass_above,
                         double& target, bool set_target, float top_p) {
  __shared__ Found res;
  const int per = (nb + NT - 1) / NT;
  const int tid = static_cast<int>(threadIdx.x);
  if (tid == 0) res.bucket = -1;
  unsigned lc = 0u;
  U128 lm = {0ull, 0ull};
  for (int i = 0; i < per; ++i) {
    const int q = tid * per + i;
    if (q < nb) {
      const int bk = nb - 1 - q;
      lc += sm.cnt[bk];
      if (mass_mode) lm = u128_add(lm, U128{sm.lo[bk], sm.hi[bk]});
    }
  }
  unsigned ctot;
  const unsigned cb = block_excl_scan<NT>(lc, 0u, ctot);
  // Fewer eligible (finite) elements than k: the k-th largest is -inf, which keeps every finite
  // one; the walk stops at the smallest of them instead (same kept set, same masses).
  if (!mass_mode && r > static_cast<int64_t>(ctot)) r = static_cast<int64_t>(ctot);
  U128 mb = {0ull, 0ull}, mtot = {0ull, 0ull};
  if (mass_mode) mb = block_excl_scan<NT>(lm, U128{0ull, 0ull}, mtot);
  if (set_target) target = static_cast<double>(top_p) * u128_to_double(mtot);
  int64_t acc_c = cb;
  U128 acc_m = u128_add(mass_above, mb);
  for (int i = 0; i < per; ++i) {
    const int q = tid * per + i;
    if (q < nb) {
      const int bk = nb - 1 - q;
      const int64_t cnt = sm.cnt[bk];
      const U128 m = mass_mode ? U128{sm.lo[bk], sm.hi[bk]} : U128{0ull, 0ull};
      const U128 next = u128_add(acc_m, m);
      const bool hit = mass_mode ? (!(u128_to_double(acc_m) >= target) &&
                                    u128_to_double(next) >= target)
                                 : (acc_c < r && acc_c + cnt >= r);
      if (hit) {
        res.bucket = bk;
        res.above_cnt = acc_c;
        res.cum_cnt = acc_c + cnt;
        res.above_mass = acc_m;
      }
      acc_c += cnt;
      acc_m = next;
    }
  }
  __syncthreads();
  const Found f = res;
  __syncthreads();
  return f;
}

// Copies the global row's elements with key >= min_key to the candidate list, in vocabulary
// order; returns their number (the caller guarantees it is <= cap).
template <int NT>
SD_DEV int64_t compact(const GlobalSrc& src, float* cx, int* ci, int64_t cap, uint32_t min_key,
                       int64_t idx_base) {
  int64_t run = 0;
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    int cnt[kU], off[kU];
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      src.load4(Tile<NT>::pos(t, u), x, ok);
      cnt[u] = 0;
      SD_UNROLL
      for (int j = 0; j < 4; ++j) cnt[u] += (ok[j] && key_of(x[j]) >= min_key) ? 1 : 0;
    }
    const int tot = tile_excl_scan<NT>(cnt, off, 0);
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {  // reload (L1 hit) rather than keep 16 values live
      float x[4];
      bool ok[4];
      const int64_t pos = Tile<NT>::pos(t, u);
      src.load4(pos, x, ok);
      int64_t o = run + off[u];
      SD_UNROLL
      for (int j = 0; j < 4; ++j) {
        if (ok[j] && key_of(x[j]) >= min_key) {
          if (o < cap) {
            cx[o] = x[j];
            ci[o] = static_cast<int>(idx_base + pos + j);
          }
          ++o;
        }
      }
    }
    run += tot;
  }
  __syncthreads();
  return imin<int64_t>(run, cap);
}

// The xhist kernel's first-digit histogram of row b into shared memory (masses only if asked).
template <int NT>
SD_DEV void load_hist(const Params& p, int64_t b, const RowSmem& sm, bool mass) {
  for (int i = static_cast<int>(threadIdx.x); i < kHistBuckets; i += NT) {
    sm.cnt[i] = p.hcnt[b * kHistBuckets + i];
    sm.lo[i] = mass ? p.hlo[b * kHistBuckets + i] : 0ull;
    sm.hi[i] = mass ? p.hhi[b * kHistBuckets + i] : 0ull;
  }
  __syncthreads();
}

// Number of elements with key >= min_key (every thread gets it).
template <int NT>
SD_DEV int64_t count_at_least(const GlobalSrc& src, uint32_t min_key) {
  int64_t n = 0;
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      src.load4(Tile<NT>::pos(t, u), x, ok);
      SD_UNROLL
      for (int j = 0; j < 4; ++j) n += (ok[j] && key_of(x[j]) >= min_key) ? 1 : 0;
    }
  }
  return block_allreduce<NT>(n, AddOp());
}

// The xcompact kernel's per-chunk candidate lists of row b, copied into shared memory in chunk
// (= vocabulary) order; returns their total (<= cap by construction).
template <int NT>
SD_DEV int64_t gather_lists(const Params& p, int64_t b, const RowSmem& sm) {
  int64_t run = 0;
  for (int64_t c0 = 0; c0 < p.C; c0 += NT) {
    const int64_t c = c0 + threadIdx.x;
    const int64_t n = c < p.C ? p.ccnt[b * p.C + c] : 0;
    int64_t tot;
    const int64_t off = block_excl_scan<NT>(n, static_cast<int64_t>(0), tot);
    if (n > 0) {
      const int64_t from = b * p.cap + p.cofs[b * p.C + c];
      for (int64_t j = 0; j < n; ++j) {
        sm.cx[run + off + j] = p.cand_x[from + j];
        sm.ci[run + off + j] = p.cand_i[from + j];
      }
    }
    run += tot;
  }
  __syncthreads();
  return run;
}

// Threshold of top-k (count mode: the k-th largest x) or top-p (mass mode: the largest x whose
// mass at or above it reaches top_p * Z, Z = mass of the eligible elements, key >= elig_key).
// May switch ctx to the shared-memory candidate list after the first digit.
// `pre`: the first digit's histogram is in global memory already (the xhist kernel's, row b).
template <int NT>
SD_DEV float select_threshold(RowCtx& ctx, bool mass_mode, int64_t k, float top_p,
                              uint32_t elig_key, const Params& p, int64_t b, bool pre) {
  uint32_t prefix = 0u;
  int64_t r = k;
  U128 above = {0ull, 0ull};
  double target = 0.0;
  for (int level = 0; level < 4; ++level) {
    if (level == 0 && pre) {
      load_hist<NT>(p, b, ctx.sm, mass_mode);
    } else {
      SD_WITH_SRC(ctx, hist_pass<NT>(src, ctx.sm, level, prefix, elig_key, mass_mode));
    }
    const int bits = level_bits(level);
    const Found f = find_bucket<NT>(ctx.sm, 1 << bits, mass_mode, r, above, target, level == 0,
                                    top_p);
    if (f.bucket < 0) return neg_inf();  // defensive: keep everything rather than fail
    prefix = (level == 0) ? static_cast<uint32_t>(f.bucket)
                          : (prefix << bits) | static_cast<uint32_t>(f.bucket);
    r -= f.above_cnt;
    above = f.above_mass;
    if (level == 0 && !ctx.in_smem && f.cum_cnt <= ctx.cap) {
      const uint32_t cut = imax(elig_key, static_cast<uint32_t>(f.bucket) << 21);
      ctx.n_cand = pre ? gather_lists<NT>(p, b, ctx.sm)
                       : compact<NT>(ctx.g, ctx.sm.cx, ctx.sm.ci, ctx.cap, cut, 0);
      ctx.in_smem = true;
    }
  }
  return float_of_key(prefix);
}

struct ZRes {
  double z;          // sum of exp(x) over the final set (fixed order)
  long long last;    // last position with exp(x) > 0, or -1
};

// Z over {x >= thr}; records the running sum at the start of every tps-th tile in `slot`.
template <int NT, typename Src>
SD_DEV ZRes z_pass(const Src& src, float thr, double* slot, int64_t tps) {
  double run = 0.0;
  long long last = -1;
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    if (slot != nullptr && threadIdx.x == 0 && t % tps == 0) slot[t / tps] = run;
    double v[kU], off[kU];
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      const int64_t pos = Tile<NT>::pos(t, u);
      src.load4(pos, x, ok);
      v[u] = 0.0;
      SD_UNROLL
      for (int j = 0; j < 4; ++j) {
        const float e = (ok[j] && x[j] >= thr) ? expf(x[j]) : 0.0f;
        v[u] += static_cast<double>(e);
        if (e > 0.0f) last = pos + j;
      }
    }
    run += tile_excl_scan<NT>(v, off, 0.0);
  }
  last = block_allreduce<NT>(last, MaxOp());
  return ZRes{run, last};
}

// Inverse CDF: the first position (vocabulary order) from tile t0 on whose cumulative mass,
// starting at run0, exceeds target; -1 if rounding leaves none.
template <int NT, typename Src>
SD_DEV long long draw_pass(const Src& src, float thr, double target, int64_t t0, double run0) {
  const long long kNone = 0x7fffffffffffffffll;
  double run = run0;
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = t0; t < ntiles; ++t) {
    double v[kU], off[kU];
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      src.load4(Tile<NT>::pos(t, u), x, ok);
      v[u] = 0.0;
      SD_UNROLL
      for (int j = 0; j < 4; ++j) v[u] += static_cast<double>((ok[j] && x[j] >= thr) ? expf(x[j]) : 0.0f);
    }
    const double tot = tile_excl_scan<NT>(v, off, 0.0);
    long long cand = kNone;
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {  // recompute (same bits) rather than keep 16 values live
      float x[4];
      bool ok[4];
      const int64_t pos = Tile<NT>::pos(t, u);
      src.load4(pos, x, ok);
      double c = run + off[u];
      SD_UNROLL
      for (int j = 0; j < 4; ++j) {
        const float e = (ok[j] && x[j] >= thr) ? expf(x[j]) : 0.0f;
        c += static_cast<double>(e);
        if (cand == kNone && e > 0.0f && c > target) cand = pos + j;
      }
    }
    cand = block_allreduce<NT>(cand, MinOp());
    if (cand != kNone) return cand;
    run += tot;
  }
  return -1;
}

// out[v] = x - logz on the final set, -inf elsewhere (global row).
template <int NT>
SD_DEV void write_logprobs(const GlobalSrc& src, float thr, float logz, float* out) {
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      const int64_t pos = Tile<NT>::pos(t, u);
      src.load4(pos, x, ok);
      SD_UNROLL
      for (int j = 0; j < 4; ++j)
        if (ok[j]) out[pos + j] = (x[j] >= thr) ? __fsub_rn(x[j], logz) : neg_inf();
    }
  }
}

// Same from the candidate list: the row is filled with -inf first.
template <int NT>
SD_DEV void scatter_logprobs(const SmemSrc& src, int64_t V, float thr, float logz, float* out) {
  for (int64_t v = threadIdx.x; v < V; v += NT) out[v] = neg_inf();
  __syncthreads();  // orders the fill before the scatter
  const int64_t ntiles = Tile<NT>::count(src.n);
  for (int64_t t = 0; t < ntiles; ++t) {
    SD_UNROLL
    for (int u = 0; u < kU; ++u) {
      float x[4];
      bool ok[4];
      const int64_t pos = Tile<NT>::pos(t, u);
      src.load4(pos, x, ok);
      SD_UNROLL
      for (int j = 0; j < 4; ++j)
        if (ok[j] && x[j] >= thr) out[src.index(pos + j)] = __fsub_rn(x[j], logz);
    }
  }
}

struct RowHead {
  ArgMax best;     // m = max s and the greedy token
  int32_t status;  // kOk or a kSt* code
};

// Merges the score kernel's chunk partials of row b (every thread of the block gets the result).
template <int NT>
SD_DEV RowHead merge_row(const Params& p, int64_t b) {
  ArgMax best = {neg_inf(), 0x7fffffff};
  int flags = 0;
  for (int64_t c = threadIdx.x; c < p.C; c += NT) {
    const ScorePart q = p.score[b * p.C + c];
    flags |= q.flags;
    best = ArgMaxOp()(best, ArgMax{q.smax, q.arg});
  }
  best = block_allreduce<NT>(best, ArgMaxOp());
  flags = block_allreduce<NT>(flags, OrOp());
  int32_t status = kOk;
  if (flags & kFlagNaN) {
    status = kStNaN;
  } else if (flags & kFlagPosInf) {
    status = kStPosInf;
  } else if (!(flags & kFlagAnchorFinite)) {
    status = kStAnchorEmpty;
  } else if (!(best.v > neg_inf()) || best.i < 0 || best.i >= p.V) {
    status = kStNoCandidate;
  }
  return RowHead{best, status};
}

// ---------------------------------------------------------------------------------------------
// Kernel 3: x in place and the first radix digit, split across the row's chunks
// ---------------------------------------------------------------------------------------------

// grid (B, C): converts its chunk of the scores to x = canon((s - m) / T) (the only division of
// the selection), then histograms the first digit of the row's first search into the global
// [B, kHistBuckets] counts / 128-bit masses (integer atomics: exact, order-free), so the row
// kernel starts at its compaction instead of a histogram pass of its own.
template <int NT>
__global__ void __launch_bounds__(NT) xhist_kernel(Params p) {
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const float temp = p.temperature[b];
  const bool greedy = !(temp > 0.0f);
  if (p.mode == kModeSample && greedy && p.lps == nullptr) return;  // argmax only
  const RowHead h = merge_row<NT>(p, b);
  if (h.status != kOk) return;
  const int64_t v_begin = c * p.chunk, v_end = imin(p.V, v_begin + p.chunk);
  float* row = p.ws + b * p.ld;
  const float m = h.best.v, t = greedy ? 1.0f : temp;
  for (int64_t v = v_begin + threadIdx.x; v < v_end; v += NT)
    row[v] = canon(__fdiv_rn(__fsub_rn(row[v], m), t));
  const int search = first_search(p, b);
  if (search == 0) return;
  __syncthreads();  // the chunk's x written before the histogram reads it
  __shared__ unsigned cnt[kHistBuckets];
  __shared__ unsigned long long lo[kHistBuckets], hi[kHistBuckets];
  RowSmem sm;
  sm.cnt = cnt;
  sm.lo = lo;
  sm.hi = hi;
  const bool mass = search == 2;
  const GlobalSrc src{row + v_begin, v_end - v_begin};
  hist_pass<NT>(src, sm, 0, 0u, mass ? key_of(neg_inf()) : kFiniteKey, mass);
  for (int i = static_cast<int>(threadIdx.x); i < kHistBuckets; i += NT) {
    const int64_t g = b * kHistBuckets + i;
    if (cnt[i] != 0u) atomicAdd(&p.hcnt[g], cnt[i]);
    if (mass && (lo[i] | hi[i]) != 0ull) {
      const unsigned long long old = atomicAdd(&p.hlo[g], lo[i]);
      const unsigned long long carry = (old + lo[i] < old) ? 1ull : 0ull;
      if (hi[i] + carry != 0ull) atomicAdd(&p.hhi[g], hi[i] + carry);
    }
  }
}

// grid (B, C): where the first search's candidates (the tokens at or above its first-digit
// bucket) fit the row kernel's shared memory, each block finds that bucket from the global
// histogram (the same scan as the row kernel) and copies its chunk's candidates, in order, to a
// run of the row's [cap] lists reserved with one atomic; the row kernel gathers the runs in chunk
// order instead of reading the row.
template <int NT>
__global__ void __launch_bounds__(NT) xcompact_kernel(Params p) {
  const int64_t b = blockIdx.x, c = blockIdx.y;
  const int search = first_search(p, b);
  if (search == 0 || p.cap <= 0) return;
  const RowHead h = merge_row<NT>(p, b);
  if (h.status != kOk) return;
  __shared__ unsigned cnt[kHistBuckets];
  __shared__ unsigned long long lo[kHistBuckets], hi[kHistBuckets];
  __shared__ unsigned long long base;
  RowSmem sm;
  sm.cnt = cnt;
  sm.lo = lo;
  sm.hi = hi;
  const bool mass = search == 2;
  load_hist<NT>(p, b, sm, mass);
  double target = 0.0;
  const Found f = find_bucket<NT>(sm, kHistBuckets, mass, mass ? 0 : p.top_k[b],
                                  U128{0ull, 0ull}, target, true, p.top_p[b]);
  if (f.bucket < 0 || f.cum_cnt > p.cap) return;  // the row kernel reads the row itself
  const uint32_t elig = mass ? key_of(neg_inf()) : kFiniteKey;
  const uint32_t cut = imax(elig, static_cast<uint32_t>(f.bucket) << 21);
  const int64_t v_begin = c * p.chunk, v_end = imin(p.V, v_begin + p.chunk);
  const GlobalSrc src{p.ws + b * p.ld + v_begin, v_end - v_begin};
  const int64_t n = count_at_least<NT>(src, cut);
  if (threadIdx.x == 0) {
    base = n > 0 ? atomicAdd(&p.cand_n[b], static_cast<unsigned long long>(n)) : 0ull;
    p.cofs[b * p.C + c] = static_cast<int64_t>(base);
    p.ccnt[b * p.C + c] = n;
  }
  __syncthreads();
  if (n > 0) {
    const int64_t at = b * p.cap + static_cast<int64_t>(base);
    compact<NT>(src, p.cand_x + at, p.cand_i + at, n, cut, v_begin);
  }
}

template <int NT>
__global__ void __launch_bounds__(NT, 1) row_kernel(Params p) {
  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const bool sample = p.mode == kModeSample;

  // Merge the chunk partials: greedy token, m = max s, status.
  const RowHead head = merge_row<NT>(p, b);
  const ArgMax best = head.best;
  const int32_t status = head.status;
  if (tid == 0) p.status[b] = status;
  if (status != kOk) {
    if (sample) {
      if (tid == 0) {
        p.tokens[b] = -1;
        if (p.lps != nullptr) p.lps[b] = qnan();
      }
    } else {
      float* out = p.out + b * p.V;
      for (int64_t v = tid; v < p.V; v += NT) out[v] = neg_inf();
    }
    return;
  }
  const float temp = p.temperature[b];
  const bool greedy = !(temp > 0.0f);
  if (sample && greedy && p.lps == nullptr) {
    if (tid == 0) p.tokens[b] = best.i;
    return;
  }

  RowCtx ctx;
  ctx.cap = p.cap;
  ctx.sm = row_smem(SD_DYN_SMEM(), p.cap);
  ctx.g = GlobalSrc{p.ws + b * p.ld, p.V};  // already x (xhist kernel)
  ctx.in_smem = false;
  ctx.n_cand = 0;

  // Thresholds: top-k, then top-p among the top-k survivors, then min-p.
  const int64_t top_k = p.top_k[b];
  const float top_p = p.top_p[b];
  float thr = neg_inf();
  const int search = first_search(p, b);
  if (top_k > 0 && top_k < p.V)
    thr = select_threshold<NT>(ctx, false, top_k, 0.0f, kFiniteKey, p, b, search == 1);
  if (top_p < 1.0f)
    thr = fmaxf(thr, select_threshold<NT>(ctx, true, 0, top_p, key_of(thr), p, b, search == 2));
  thr = fmaxf(thr, p.log_min_p[b]);

  const int64_t n = ctx.in_smem ? ctx.n_cand : p.V;
  const int64_t ntiles = Tile<NT>::count(n);
  const int64_t tps = imax<int64_t>(1, (ntiles + kMaxSlots - 1) / kMaxSlots);
  const bool draw = sample && !greedy;
  ZRes zr;
  SD_WITH_SRC(ctx, zr = z_pass<NT>(src, thr, draw ? ctx.sm.slot : nullptr, tps));
  const float logz = static_cast<float>(log(zr.z));

  if (!sample) {
    float* out = p.out + b * p.V;
    if (ctx.in_smem) {
      scatter_logprobs<NT>(ctx.smem_src(), p.V, thr, logz, out);
    } else {
      write_logprobs<NT>(ctx.g, thr, logz, out);
    }
    return;
  }

  int64_t token = best.i;
  float xt = 0.0f;  // x of the greedy token: (m - m) / 1
  if (draw) {
    const double u = philox_uniform(static_cast<uint64_t>(p.seed[b]),
                                    static_cast<uint64_t>(p.step[b]));
    const double target = u * zr.z;
    // Last checkpoint at or below the target (slot[0] = 0); written by thread 0 in z_pass,
    // visible after its closing reduction's barriers.
    const int64_t nslots = (ntiles + tps - 1) / tps;
    int64_t lo = 0, hi = nslots - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (ctx.sm.slot[mid] <= target) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    long long pos = -1;
    if (nslots > 0) SD_WITH_SRC(ctx, pos = draw_pass<NT>(src, thr, target, lo * tps, ctx.sm.slot[lo]));
    if (pos < 0) pos = zr.last;  // rounding left the walk past the end: last kept token
    if (pos >= 0) SD_WITH_SRC(ctx, token = src.index(pos); xt = src.x_at(pos));
  }
  if (tid == 0) {
    p.tokens[b] = token;
    if (p.lps != nullptr) p.lps[b] = __fsub_rn(xt, logz);
  }
}

// out[i] = philox_uniform(seed[i], step[i]) on the device.
__global__ void philox_kernel(const int64_t* seed, const int64_t* step, double* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = philox_uniform(static_cast<uint64_t>(seed[i]), static_cast<uint64_t>(step[i]));
}

// ---------------------------------------------------------------------------------------------
// Host side (shared by the CUDA build and the emulator)
// ---------------------------------------------------------------------------------------------

struct Plan {
  int64_t C, chunk, ld;
  int64_t Cs, chunk_s;  // stats kernel chunking (V only)
  size_t off_stats, off_score, off_hist, off_cand, bytes;
  int cap;
  size_t row_smem;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t round256(size_t x) { return (x + 255) / 256 * 256; }

// Chunks per row: enough blocks for ~8 per SM in the split kernels, each at least a quarter of an
// 8*NT step (at B = 1 and V = 128256: 251 blocks, ~1.9 per SM of an H100/H200, rather than 63).
// The stats kernel's chunking depends on V (and the build's block size) only.
inline Plan make_plan(int64_t B, int64_t V, int num_sms, int cap, int split_nt) {
  Plan pl;
  pl.ld = ceil_div(V, 4) * 4;
  // At most 64 stats chunks, each at least one full block step (a build constant, never B).
  const int64_t step = static_cast<int64_t>(kVec) * split_nt;
  pl.chunk_s = ceil_div(ceil_div(V, 64), kVec) * kVec;
  if (pl.chunk_s < step) pl.chunk_s = step;
  pl.Cs = ceil_div(V, pl.chunk_s);
  const int64_t min_chunk = static_cast<int64_t>(kVec) * (split_nt >= 128 ? split_nt / 4 : split_nt);
  const int64_t max_c = ceil_div(V, min_chunk);
  const int64_t want = ceil_div(8 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1),
                                B > 0 ? B : 1);
  const int64_t c = want < max_c ? want : max_c;
  pl.chunk = ceil_div(ceil_div(V, c > 0 ? c : 1), kVec) * kVec;
  pl.C = ceil_div(V, pl.chunk);
  pl.off_stats = round256(static_cast<size_t>(B) * pl.ld * sizeof(float));
  pl.off_score = pl.off_stats + round256(static_cast<size_t>(B * pl.Cs) * sizeof(StatsPart));
  pl.off_hist = pl.off_score + round256(static_cast<size_t>(B * pl.C) * sizeof(ScorePart));
  pl.off_cand = pl.off_hist + round256(static_cast<size_t>(B) * kHistBuckets * (4 + 8 + 8));
  pl.bytes = pl.off_cand + round256(static_cast<size_t>(B) * 8 + static_cast<size_t>(B * pl.C) * 16 +
                                    static_cast<size_t>(B) * static_cast<size_t>(cap) * 8);
  pl.cap = cap;
  pl.row_smem = kRowSmemFixed + 8 * static_cast<size_t>(cap);
  return pl;
}

// Candidate capacity that fits the opt-in shared memory next to the fixed part (multiple of 128).
inline int cap_for_smem(size_t optin, size_t static_smem) {
  const size_t used = kRowSmemFixed + static_smem + 256;
  if (optin <= used) return 0;
  size_t cap = (optin - used) / 8;
  if (cap > static_cast<size_t>(kCapMax)) cap = kCapMax;
  return static_cast<int>(cap / 128 * 128);
}

}  // namespace cuda
}  // namespace safedecode
