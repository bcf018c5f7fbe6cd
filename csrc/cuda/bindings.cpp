// pybind11 bindings of the CUDA kernels (module safedecode._C_cuda). Tensors travel as integer
// device pointers plus shapes and strides, the stream as an integer (cudaStream_t), so this file
// needs neither torch nor CUDA headers and builds with the host compiler alone.
#include <pybind11/pybind11.h>

#include "contrastive_sample.h"

namespace py = pybind11;
using safedecode::cuda::Problem;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

Problem make_problem(uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk,
                     int64_t sb, uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p,
                     uintptr_t log_min_p, uintptr_t log_beta, uintptr_t seed, uintptr_t step,
                     int rule, int anchor) {
  Problem p;
  p.logits = ptr<const void>(data);
  p.dtype = dtype;
  p.K = K;
  p.B = B;
  p.V = V;
  p.stride_k = sk;
  p.stride_b = sb;
  p.weights = ptr<const float>(w);
  p.temperature = ptr<const float>(temp);
  p.top_k = ptr<const int64_t>(top_k);
  p.top_p = ptr<const float>(top_p);
  p.log_min_p = ptr<const float>(log_min_p);
  p.log_beta = ptr<const float>(log_beta);
  p.seed = ptr<const int64_t>(seed);
  p.step = ptr<const int64_t>(step);
  p.rule = rule;
  p.anchor = anchor;
  return p;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "safedecode CUDA kernels (fused contrastive sampling)";
  m.def("workspace_bytes", &safedecode::cuda::workspace_bytes, py::arg("B"), py::arg("V"),
        "Scratch bytes contrastive_sample / contrastive_logprobs need on the current device.");
  m.def(
      "contrastive_sample",
      [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
         uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
         uintptr_t log_beta, uintptr_t seed, uintptr_t step, int rule, int anchor, uintptr_t ws,
         size_t ws_bytes, uintptr_t tokens, uintptr_t logprobs, uintptr_t status,
         uintptr_t stream) {
        const Problem p = make_problem(data, dtype, K, B, V, sk, sb, w, temp, top_k, top_p,
                                       log_min_p, log_beta, seed, step, rule, anchor);
        safedecode::cuda::contrastive_sample(p, ptr<void>(ws), ws_bytes, ptr<int64_t>(tokens),
                                             ptr<float>(logprobs), ptr<int32_t>(status),
                                             ptr<void>(stream));
      },
      "Fused contrastive sampling (asynchronous on `stream`); see safedecode.ops.reference.");
  m.def(
      "contrastive_logprobs",
      [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
         uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
         uintptr_t log_beta, int rule, int anchor, uintptr_t ws, size_t ws_bytes, uintptr_t out,
         uintptr_t status, uintptr_t stream) {
        const Problem p = make_problem(data, dtype, K, B, V, sk, sb, w, temp, top_k, top_p,
                                       log_min_p, log_beta, 0, 0, rule, anchor);
        safedecode::cuda::contrastive_logprobs(p, ptr<void>(ws), ws_bytes, ptr<float>(out),
                                               ptr<int32_t>(status), ptr<void>(stream));
      },
      "Final normalised log-distribution [B, V] of the fused op (asynchronous on `stream`).");
  m.def(
      "philox_uniform_device",
      [](uintptr_t seed, uintptr_t step, uintptr_t out, int64_t n, uintptr_t stream) {
        safedecode::cuda::philox_uniform_device(ptr<const int64_t>(seed), ptr<const int64_t>(step),
                                                ptr<double>(out), n, ptr<void>(stream));
      },
      "out[i] = philox_uniform(seed[i], step[i]) computed by a CUDA kernel.");
}
