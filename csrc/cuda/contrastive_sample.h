// Fused contrastive sampling on CUDA GPUs: the host entry points of the CUDA backend.
//
// Plain C++ (no CUDA, no torch headers): tensors arrive as raw device pointers with explicit
// shapes and strides, the stream as an opaque handle (torch.cuda.current_stream().cuda_stream).
// Semantics: safedecode/ops/reference.py. Kernel design: contrastive_sample.cuh.
#pragma once

#include <cstddef>
#include <cstdint>

namespace safedecode {
namespace cuda {

struct Problem {
  const void* logits;  // [K, B, V], V contiguous
  int dtype;           // 0 fp32, 1 bf16, 2 fp16
  int64_t K, B, V;
  int64_t stride_k, stride_b;  // in elements
  // Per-row parameters: device pointers to B contiguous values (weights: [B, K]).
  const float* weights;
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const float* log_min_p;
  const float* log_beta;
  const int64_t* seed;  // may be null for contrastive_logprobs
  const int64_t* step;
  int rule;    // 0 linear, 1 union
  int anchor;  // anchor branch
};

// Bytes of device scratch memory contrastive_sample / contrastive_logprobs need on the current
// device (fp32 scores [B, round_up(V, 4)] plus per-chunk partials).
size_t workspace_bytes(int64_t B, int64_t V);

// tokens[B] int64 (-1 on bad rows), logprobs[B] fp32 (nullable; NaN on bad rows), status[B] int32.
// Asynchronous on `stream`; throws std::invalid_argument / std::runtime_error.
void contrastive_sample(const Problem& p, void* workspace, size_t workspace_size, int64_t* tokens,
                        float* logprobs, int32_t* status, void* stream);

// out[B, V] fp32 (row stride V): the final normalised log-distribution (-inf outside the final
// set, -inf everywhere on bad rows); status[B] int32.
void contrastive_logprobs(const Problem& p, void* workspace, size_t workspace_size, float* out,
                          int32_t* status, void* stream);

// out[i] = philox_uniform(seed[i], step[i]) computed on the device (to cross-check the stream).
void philox_uniform_device(const int64_t* seed, const int64_t* step, double* out, int64_t n,
                           void* stream);

}  // namespace cuda
}  // namespace safedecode
