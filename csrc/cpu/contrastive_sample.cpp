// Fused contrastive sampling, C++ CPU backend (OpenMP over rows).
//
// One streaming pass over the K branches' logits computes the combined score s, the anchor's
// maximum and the candidate list (the vector loops are in block_kernels.cpp, built per ISA level);
// everything after it (plausibility cut, top-k, top-p, min-p, draw) works on that list, which the
// plausibility mask or a running top-k threshold keeps small. No full sort: top-k is an exact
// bisection select on the candidates, top-p a mass histogram plus a sort of one bucket. Semantics and rounding follow safedecode/ops/reference.py exactly (compile with
// -ffp-contract=off so s = w0*z0 + w1*z1 is rounded as PyTorch rounds it).
#include "contrastive_sample.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../philox.h"
#include "block_kernels.h"

namespace safedecode {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
constexpr float kFloatMax = std::numeric_limits<float>::max();
constexpr int64_t kBlock = 1024;         // tokens per streaming block (fits L1 for K <= 4)
constexpr int64_t kSortLimit = 4096;     // top-p by full sort below this many candidates
constexpr int kHistBuckets = 2048;       // top-p mass histogram over x in [-kHistRange, 0]
constexpr float kHistRange = 40.0f;

enum Status : int32_t { kOk = 0, kNaN = 1, kPosInfSeen = 2, kAnchorEmpty = 3, kNoCandidate = 4 };

// Returns a pointer to n fp32 values of logits[k, b, v0:v0+n]: the source itself for fp32,
// otherwise `buf` after conversion.
inline const float* load_block(const LogitsView& L, int64_t k, int64_t b, int64_t v0, int64_t n,
                               float* buf) {
  const int64_t off = k * L.stride_k + b * L.stride_b + v0;
  if (L.dtype == kFloat32) return static_cast<const float*>(L.data) + off;
  block_kernels().convert(static_cast<const uint16_t*>(L.data) + off, L.dtype, n, buf);
  return buf;
}

// Allocator whose resize() leaves new elements uninitialised (candidate buffers are grown by a
// whole block, then cut back to what the kernel wrote: zero-filling them would be wasted work).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <typename U>
  NoInit(const NoInit<U>&) noexcept {}  // NOLINT(google-explicit-constructor)
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// Candidate list (structure of arrays, vocabulary order).
struct Cands {
  std::vector<int32_t, NoInit<int32_t>> idx;
  std::vector<float, NoInit<float>> s;
  std::vector<float, NoInit<float>> za;  // anchor logit, only while the plausibility cut is pending
  void clear() {
    idx.clear();
    s.clear();
    za.clear();
  }
  size_t size() const { return idx.size(); }
  // Room for n more entries at the end; returns the old size.
  size_t grow(int64_t n, bool with_za) {
    const size_t base = size();
    idx.resize(base + n);
    s.resize(base + n);
    if (with_za) za.resize(base + n);
    return base;
  }
  void truncate(size_t n, bool with_za) {
    idx.resize(n);
    s.resize(n);
    if (with_za) za.resize(n);
  }
};

struct Scratch {
  std::vector<float> zbuf;      // K * kBlock converted logits
  std::vector<float> sblk;      // kBlock scores
  std::vector<float> tmp;       // selection / exp values
  std::vector<int32_t> order;   // sort permutation
  std::vector<double> hist;     // top-p mass histogram
  std::vector<uint32_t> keys;   // selection keys
  std::vector<float> mass;      // top-p exp values (reused: no allocation per row)
  Cands c;
};

Scratch& scratch() {
  static thread_local Scratch s;
  return s;
}

// Maximum of n floats (-inf for none); NaN-free input (rows with NaN are flagged and discarded).
inline float block_max(const float* x, int64_t n) {
  float m[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float r = m[0];
  for (int j = 1; j < 8; ++j) r = m[j] > r ? m[j] : r;
  return r;
}

// Append the block entries i (token v0 + i) with key[i] >= thr and s[i] > -inf to c.
void append_block(Cands& c, const float* key, float thr, const float* s, const float* za,
                  int64_t n, int64_t v0) {
  const size_t base = c.grow(n, za != nullptr);
  const int64_t w = block_kernels().compact(key, thr, s, za, n, v0, c.idx.data() + base,
                                            c.s.data() + base, za ? c.za.data() + base : nullptr);
  c.truncate(base + w, za != nullptr);
}

// Keep entries where keep(i) holds, preserving order.
template <typename Pred>
void compact(Cands& c, bool with_za, Pred keep) {
  size_t w = 0;
  for (size_t i = 0; i < c.size(); ++i) {
    if (keep(i)) {
      c.idx[w] = c.idx[i];
      c.s[w] = c.s[i];
      if (with_za) c.za[w] = c.za[i];
      ++w;
    }
  }
  c.truncate(w, with_za);
}

// k-th largest of x[0..n) (1-based k <= n), exact.
float kth_largest(const float* x, int64_t n, int64_t k, std::vector<uint32_t>& keys) {
  keys.resize(static_cast<size_t>(n) + 64);
  return block_kernels().kth_largest(x, n, k, keys.data());
}

// log-sum-exp pieces of one branch row, mirroring torch.log_softmax: (max, log(sum exp(z - max))).
void branch_lse(const LogitsView& L, int64_t k, int64_t b, float* buf, float& mx, float& logsum) {
  float m = kNegInf;
  for (int64_t v0 = 0; v0 < L.V; v0 += kBlock) {
    const int64_t n = std::min(kBlock, L.V - v0);
    const float* z = load_block(L, k, b, v0, n, buf);
    for (int64_t i = 0; i < n; ++i) m = std::max(m, z[i]);
  }
  double sum = 0.0;
  if (std::isfinite(m)) {
    for (int64_t v0 = 0; v0 < L.V; v0 += kBlock) {
      const int64_t n = std::min(kBlock, L.V - v0);
      const float* z = load_block(L, k, b, v0, n, buf);
      float part = 0.0f;
      for (int64_t i = 0; i < n; ++i) part += std::exp(z[i] - m);
      sum += part;
    }
  }
  mx = m;
  logsum = static_cast<float>(std::log(sum));
}

enum class Collect { kNone, kAll, kTopK, kPlausible };

struct ScanResult {
  int32_t status = kOk;
  float anchor_max = kNegInf;
  float smax = kNegInf;   // max finite score (only meaningful for Collect::kNone / kAll / kTopK)
  int64_t argmax = -1;    // first index attaining smax
};

// Combined scores of one block for the general case (any rule, zero weights, K > kFusedMaxK).
void combine_generic(const float* const* zk, int64_t K, const float* w, const bool* active,
                     int anchor, int rule, float gamma, float mx0, float ls0, float mx1, float ls1,
                     int64_t n, float* s) {
  if (rule == kLinear) {
    bool first = true;
    for (int64_t k = 0; k < K; ++k) {
      if (!active[k]) continue;
      const float wk = w[k];
      const float* z = zk[k];
      if (first) {
        for (int64_t i = 0; i < n; ++i) s[i] = wk * z[i];
        first = false;
      } else {
        for (int64_t i = 0; i < n; ++i) s[i] = s[i] + wk * z[i];
      }
    }
    if (first) std::fill(s, s + n, 0.0f);
  } else {
    const float* z0 = zk[0];
    const float* z1 = zk[1];
    if (gamma != 0.0f) {
      for (int64_t i = 0; i < n; ++i) {
        const float lp0 = (z0[i] - mx0) - ls0;
        const float lp1 = (z1[i] - mx1) - ls1;
        const float d = lp0 - lp1;
        s[i] = lp0 + gamma * (d < 0.0f ? d : 0.0f);
      }
    } else {
      for (int64_t i = 0; i < n; ++i) s[i] = (z0[i] - mx0) - ls0;
    }
  }
  // Exclusions: -inf in the anchor or in any weighted branch (overrides +-inf/NaN from w*-inf).
  for (int64_t k = 0; k < K; ++k) {
    if (!active[k] && k != anchor) continue;
    const float* z = zk[k];
    for (int64_t i = 0; i < n; ++i) s[i] = z[i] == kNegInf ? kNegInf : s[i];
  }
}

// The streaming pass: scores, validity flags, anchor max, greedy argmax and the candidate list.
ScanResult scan_row(const LogitsView& L, const RowParams& P, int rule, int anchor, int64_t b,
                    Collect mode, int64_t top_k, Scratch& S) {
  const int64_t K = L.K;
  const float* w = P.weights + b * K;
  const float log_beta = P.log_beta[b];
  S.zbuf.resize(static_cast<size_t>(K * kBlock));
  S.sblk.resize(kBlock);
  Cands& c = S.c;
  c.clear();
  ScanResult r;

  // Union rule: the log-softmax constants of both branches first (needs a pass of its own).
  float mx0 = 0, ls0 = 0, mx1 = 0, ls1 = 0;
  const float gamma = (rule == kUnion) ? w[1] : 0.0f;
  if (rule == kUnion) {
    branch_lse(L, 0, b, S.zbuf.data(), mx0, ls0);
    branch_lse(L, 1, b, S.zbuf.data(), mx1, ls1);
  }

  bool active[64];
  for (int64_t k = 0; k < K; ++k) {
    active[k] = (rule == kUnion) ? (k == 0 || gamma != 0.0f) : (w[k] != 0.0f);
  }
  const int64_t cap = std::max<int64_t>(4 * top_k, 512);
  float thr_k = kNegInf;  // running top-k prefilter (a lower bound of the final k-th score)
  int bad_nan = 0, bad_inf = 0;

  // Fast path: the linear rule with every branch weighted, fused into one vector pass per block.
  bool fused = rule == kLinear && K <= kFusedMaxK;
  for (int64_t k = 0; k < K; ++k) fused = fused && active[k];

  for (int64_t v0 = 0; v0 < L.V; v0 += kBlock) {
    const int64_t n = std::min(kBlock, L.V - v0);
    const float* zk[64];
    for (int64_t k = 0; k < K; ++k) zk[k] = load_block(L, k, b, v0, n, S.zbuf.data() + k * kBlock);
    const float* za = zk[anchor];
    float* s = S.sblk.data();
    float amax_blk, smax_blk;
    int bad = 0;
    bool collected = false;  // the fused pass already appended this block's candidates
    if (fused) {
      // Candidates are written by the pass itself once a threshold exists (for the plausibility
      // cut, the anchor max so far: a lower bound of the final cut, which is applied at the end).
      Emission e;
      if (mode == Collect::kAll || (mode == Collect::kTopK && thr_k > kNegInf)) {
        e.mode = kEmitByScore;
        e.thr = thr_k;
      } else if (mode == Collect::kPlausible && r.anchor_max > kNegInf) {
        e.mode = kEmitByAnchor;
        e.thr = r.anchor_max + log_beta;
      }
      size_t base = 0;
      const bool with_za = e.mode == kEmitByAnchor;
      if (e.mode != kEmitNone) {
        base = c.grow(n, with_za);
        e.v0 = v0;
        e.idx = c.idx.data() + base;
        e.s = c.s.data() + base;
        e.za = with_za ? c.za.data() + base : nullptr;
      }
      const BlockStats st = block_kernels().linear(static_cast<int>(K), zk, w, anchor, n, s, e);
      if (e.mode != kEmitNone) {
        c.truncate(base + st.emitted, with_za);
        collected = true;
      }
      amax_blk = st.amax;
      smax_blk = st.smax;
      bad = st.bad;
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const float* z = zk[k];
        for (int64_t i = 0; i < n; ++i) bad |= !(z[i] <= kFloatMax);  // NaN or +inf
      }
      amax_blk = block_max(za, n);
      combine_generic(zk, K, w, active, anchor, rule, gamma, mx0, ls0, mx1, ls1, n, s);
      smax_blk = block_max(s, n);
    }
    if (bad) {  // rare: which one (-inf is a legal, masked logit)
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t i = 0; i < n; ++i) {
          bad_nan |= zk[k][i] != zk[k][i];
          bad_inf |= zk[k][i] == kPosInf;
        }
      }
    }
    r.anchor_max = std::max(r.anchor_max, amax_blk);

    switch (mode) {
      case Collect::kNone:
      case Collect::kAll:
      case Collect::kTopK: {
        if (smax_blk > r.smax) {  // rare after the first blocks: find the first maximal index
          r.smax = smax_blk;
          for (int64_t i = 0; i < n; ++i) {
            if (s[i] == smax_blk) {
              r.argmax = v0 + i;
              break;
            }
          }
        }
        if (mode == Collect::kNone) break;
        if (!collected) {
          const float t = (mode == Collect::kTopK) ? thr_k : kNegInf;
          if (smax_blk == kNegInf || smax_blk < t) break;  // nothing in this block can survive
          if (mode == Collect::kTopK && thr_k == kNegInf && n >= top_k) {
            thr_k = kth_largest(s, n, top_k, S.keys);  // the first full block bounds the k-th
          }
          append_block(c, s, mode == Collect::kTopK ? thr_k : t, s, nullptr, n, v0);
        }
        // Tighten the prefilter as soon as k candidates exist (the k-th largest of a subset is a
        // lower bound of the final k-th largest), then whenever the list reaches `cap`.
        const int64_t have = static_cast<int64_t>(c.size());
        if (mode == Collect::kTopK && (have >= cap || (thr_k == kNegInf && have >= top_k))) {
          thr_k = kth_largest(c.s.data(), have, top_k, S.keys);
          compact(c, false, [&](size_t j) { return c.s[j] >= thr_k; });
        }
        break;
      }
      case Collect::kPlausible: {
        const float thr = r.anchor_max + log_beta;
        if (collected || amax_blk < thr) break;
        append_block(c, za, thr, s, za, n, v0);
        break;
      }
    }
  }

  if (bad_nan) {
    r.status = kNaN;
  } else if (bad_inf) {
    r.status = kPosInfSeen;
  } else if (r.anchor_max == kNegInf) {
    r.status = kAnchorEmpty;
  } else if (mode == Collect::kPlausible) {
    const float thr = r.anchor_max + log_beta;
    compact(c, true, [&](size_t j) { return c.za[j] >= thr; });
    for (size_t j = 0; j < c.size(); ++j) {
      if (c.s[j] > r.smax) {
        r.smax = c.s[j];
        r.argmax = c.idx[j];
      }
    }
  }
  if (r.status == kOk && r.argmax < 0) r.status = kNoCandidate;
  return r;
}

// Top-p cut on the candidates: returns the score threshold t_p (keep s >= t_p).
// x[j] = (s[j] - m) / T is precomputed in S.tmp.
float top_p_threshold(const Cands& c, const std::vector<float>& x, float top_p, Scratch& S) {
  const size_t n = c.size();
  std::vector<float>& e = S.mass;
  e.resize(n);
  double total = 0.0;
  for (size_t j = 0; j < n; ++j) {
    e[j] = std::exp(x[j]);
    total += e[j];
  }
  const double target = static_cast<double>(top_p) * total;
  auto by_score = [&](int32_t a, int32_t b2) {
    return c.s[a] > c.s[b2] || (c.s[a] == c.s[b2] && a < b2);
  };
  // Walk `ids` (sorted by score descending) from mass `cum`; returns the threshold or +inf if the
  // target is not reached inside them.
  auto walk = [&](std::vector<int32_t>& ids, double cum, float& out) {
    std::sort(ids.begin(), ids.end(), by_score);
    for (int32_t j : ids) {
      cum += e[j];
      if (cum >= target) {
        out = c.s[j];
        return true;
      }
    }
    return false;
  };
  std::vector<int32_t>& ids = S.order;
  float thr = kNegInf;  // default: keep everything (target never reached by rounding)
  if (n <= static_cast<size_t>(kSortLimit)) {
    ids.resize(n);
    std::iota(ids.begin(), ids.end(), 0);
    walk(ids, 0.0, thr);
    return thr;
  }
  // Mass histogram over x in [-kHistRange, 0]; x is monotone in s, so buckets are score-ordered.
  S.hist.assign(kHistBuckets, 0.0);
  const float scale = kHistBuckets / kHistRange;
  auto bucket_of = [&](float xv) {
    const float f = -xv * scale;
    return f >= kHistBuckets - 1 ? kHistBuckets - 1 : static_cast<int>(f);
  };
  for (size_t j = 0; j < n; ++j) S.hist[bucket_of(x[j])] += e[j];
  double cum = 0.0;
  int hb = 0;
  for (; hb < kHistBuckets; ++hb) {
    if (cum + S.hist[hb] >= target) break;
    cum += S.hist[hb];
  }
  if (hb == kHistBuckets) return thr;
  ids.clear();
  for (size_t j = 0; j < n; ++j)
    if (bucket_of(x[j]) == hb) ids.push_back(static_cast<int32_t>(j));
  walk(ids, cum, thr);
  return thr;
}

struct RowOut {
  int64_t token = -1;
  float logprob = std::numeric_limits<float>::quiet_NaN();
};

// Everything for one row. `dist_out` (nullable) receives the full log-distribution.
RowOut process_row(const LogitsView& L, const RowParams& P, int rule, int anchor, int64_t b,
                   bool want_logprob, float* dist_out, int32_t* status) {
  Scratch& S = scratch();
  const float temp = P.temperature[b];
  const bool greedy = temp == 0.0f;
  const int64_t top_k = P.top_k[b];
  const bool plaus = P.log_beta[b] > kNegInf;
  const bool need_dist = !greedy || want_logprob || dist_out != nullptr;

  Collect mode = Collect::kAll;
  if (plaus) {
    mode = Collect::kPlausible;
  } else if (!need_dist) {
    mode = Collect::kNone;
  } else if (top_k > 0 && top_k * 8 < L.V) {
    mode = Collect::kTopK;
  }
  ScanResult r = scan_row(L, P, rule, anchor, b, mode, top_k, S);
  status[b] = r.status;
  RowOut out;
  if (dist_out) std::fill(dist_out, dist_out + L.V, kNegInf);
  if (r.status != kOk) return out;
  if (!need_dist) {
    out.token = r.argmax;
    return out;
  }

  Cands& c = S.c;
  const float m = r.smax;
  const float t = greedy ? 1.0f : temp;
  // top-k on scores (ties kept).
  if (top_k > 0 && top_k < static_cast<int64_t>(c.size())) {
    const float tk = kth_largest(c.s.data(), static_cast<int64_t>(c.size()), top_k, S.keys);
    compact(c, false, [&](size_t j) { return c.s[j] >= tk; });
  }
  std::vector<float>& x = S.tmp;
  x.resize(c.size());
  for (size_t j = 0; j < c.size(); ++j) x[j] = (c.s[j] - m) / t;
  // top-p on scores, then min-p on x.
  const float top_p = P.top_p[b];
  const float tp = top_p < 1.0f ? top_p_threshold(c, x, top_p, S) : kNegInf;
  const float log_min_p = P.log_min_p[b];
  {
    size_t wpos = 0;
    for (size_t j = 0; j < c.size(); ++j) {
      if (c.s[j] >= tp && x[j] >= log_min_p) {
        c.idx[wpos] = c.idx[j];
        c.s[wpos] = c.s[j];
        x[wpos] = x[j];
        ++wpos;
      }
    }
    c.truncate(wpos, false);
    x.resize(wpos);
  }
  // Normaliser and draw (vocabulary order).
  double z = 0.0;
  for (size_t j = 0; j < x.size(); ++j) z += static_cast<double>(std::exp(x[j]));
  const float log_z = static_cast<float>(std::log(z));
  size_t chosen = 0;
  if (dist_out) {
    for (size_t j = 0; j < c.size(); ++j) dist_out[c.idx[j]] = x[j] - log_z;
    return out;
  }
  if (greedy) {
    for (size_t j = 0; j < c.size(); ++j)
      if (c.idx[j] == r.argmax) chosen = j;
  } else {
    const double target = philox_uniform(static_cast<uint64_t>(P.seed[b]),
                                         static_cast<uint64_t>(P.step[b])) * z;
    double cum = 0.0;
    size_t last_pos = 0;
    bool found = false;
    for (size_t j = 0; j < x.size(); ++j) {
      const double e = static_cast<double>(std::exp(x[j]));
      if (e > 0.0) last_pos = j;
      cum += e;
      if (cum > target && e > 0.0) {
        chosen = j;
        found = true;
        break;
      }
    }
    if (!found) chosen = last_pos;
  }
  out.token = c.idx[chosen];
  out.logprob = x[chosen] - log_z;
  return out;
}

int resolve_threads(int num_threads, int64_t rows) {
  int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nt, rows)));
}

}  // namespace

void contrastive_sample_cpu(const LogitsView& logits, const RowParams& params, int rule,
                            int anchor, int64_t* tokens, float* logprobs, int32_t* status,
                            int num_threads) {
  const int nt = resolve_threads(num_threads, logits.B);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < logits.B; ++b) {
    RowOut o = process_row(logits, params, rule, anchor, b, logprobs != nullptr, nullptr, status);
    tokens[b] = o.token;
    if (logprobs) logprobs[b] = o.logprob;
  }
}

void contrastive_logprobs_cpu(const LogitsView& logits, const RowParams& params, int rule,
                              int anchor, float* out, int32_t* status, int num_threads) {
  const int nt = resolve_threads(num_threads, logits.B);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t b = 0; b < logits.B; ++b) {
    process_row(logits, params, rule, anchor, b, false, out + b * logits.V, status);
  }
}

}  // namespace safedecode
