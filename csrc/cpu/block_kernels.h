// The per-block inner loops of the CPU backend, vectorised and built once per ISA level
// (AVX-512, AVX2, baseline); the best level the CPU supports is picked at load time.
//
// A "block" is up to kBlock consecutive vocabulary entries of one row. Every value is rounded
// exactly as the scalar code (and PyTorch) rounds it: no FMA contraction, the same operation order.
#pragma once

#include <cstdint>

namespace safedecode {

// Per-block results of the fused linear-rule pass.
struct BlockStats {
  float amax;  // max anchor logit (-inf for none)
  float smax;  // max combined score over kept entries (-inf for none)
  int bad;     // non-zero iff some logit of some branch is NaN or +inf
  int64_t emitted;  // candidates written (see Emission)
};

enum EmitMode : int { kEmitNone = 0, kEmitByScore = 1, kEmitByAnchor = 2 };

// Candidates the fused pass writes as it goes: entry i (token v0 + i) when key >= thr and
// s[i] > -inf, key being s[i] (kEmitByScore) or the anchor logit (kEmitByAnchor). The outputs
// need room for n entries; za may be null.
struct Emission {
  int mode = kEmitNone;
  float thr = 0.0f;
  int64_t v0 = 0;
  int32_t* idx = nullptr;
  float* s = nullptr;
  float* za = nullptr;
};

// Widest branch count the fused pass handles; larger K takes the generic scalar path.
constexpr int kFusedMaxK = 4;

struct SmallGemm;  // small_gemm.h

struct BlockKernels {
  const char* isa;  // "avx512", "avx2" or "baseline"
  int lanes;        // floats per vector register

  // bf16 (dtype 1) or fp16 (dtype 2) -> fp32, n values.
  void (*convert)(const uint16_t* src, int dtype, int64_t n, float* dst);

  // Linear rule with every branch weighted (w[k] != 0) and 1 <= K <= kFusedMaxK:
  // s[i] = sum_k w[k] * z[k][i] (left to right), -inf where any branch is -inf; plus the block's
  // anchor max, score max, NaN/+inf flag and the candidates of `e`, in one pass.
  BlockStats (*linear)(int K, const float* const* z, const float* w, int anchor, int64_t n,
                       float* s, const Emission& e);

  // Writes i (as token v0 + i) where key[i] >= thr and s[i] > -inf, in order, to idx_out / s_out
  // (and za_out[j] = za[i] when za_out is non-null); returns how many. The outputs need room for n.
  int64_t (*compact)(const float* key, float thr, const float* s, const float* za, int64_t n,
                     int64_t v0, int32_t* idx_out, float* s_out, float* za_out);

  // k-th largest of x[0..n), 1 <= k <= n, exactly (no NaN in x). `keys` is scratch for n + lanes.
  float (*kth_largest)(const float* x, int64_t n, int64_t k, uint32_t* keys);

  // This level's small-M GEMM (small_gemm.cpp, built with the same flags): switching the level
  // switches both.
  const SmallGemm* gemm;
};

// The kernels in use: the best level the CPU supports, or SAFEDECODE_CPU_ISA's choice.
const BlockKernels& block_kernels();

// Levels built into this binary that the CPU can run, best first.
int available_isas(const char** out, int cap);

// Switch to level `isa` (tests and benchmarks); false if unknown or unsupported here.
bool set_block_isa(const char* isa);

}  // namespace safedecode
