// Fused contrastive sampling on the CPU: the public entry points of the C++ backend.
//
// Semantics: safedecode/ops/reference.py (the spec). Inputs are raw pointers with explicit shapes
// and strides so the extension needs no torch headers and is not tied to one torch ABI.
#pragma once

#include <cstdint>

namespace safedecode {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Rule : int { kLinear = 0, kUnion = 1 };

// Per-row parameters, each a pointer to B contiguous values (see safedecode/ops/params.py).
struct RowParams {
  const float* weights;      // [B, K]
  const float* temperature;  // [B], 0 = greedy
  const int64_t* top_k;      // [B], 0 = off, <= V
  const float* top_p;        // [B], (0, 1]
  const float* log_min_p;    // [B], -inf = off
  const float* log_beta;     // [B], -inf = off
  const int64_t* seed;       // [B]
  const int64_t* step;       // [B]
};

struct LogitsView {
  const void* data;
  int dtype;  // DType
  int64_t K, B, V;
  int64_t stride_k, stride_b;  // in elements; the vocabulary stride is 1
};

// tokens[B] (int64, -1 on bad rows), logprobs[B] (fp32, may be null), status[B] (int32).
void contrastive_sample_cpu(const LogitsView& logits, const RowParams& params, int rule,
                            int anchor, int64_t* tokens, float* logprobs, int32_t* status,
                            int num_threads);

// out[B, V] (fp32, row stride V): the final normalised log-distribution; status[B].
void contrastive_logprobs_cpu(const LogitsView& logits, const RowParams& params, int rule,
                              int anchor, float* out, int32_t* status, int num_threads);

}  // namespace safedecode
