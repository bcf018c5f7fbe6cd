// pybind11 bindings of the CPU kernels (module safedecode._C). Tensors travel as integer data
// pointers plus shapes and strides, so this module needs no torch headers.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <string>

#include "../philox.h"
#include "block_kernels.h"
#include "contrastive_sample.h"
#include "small_gemm.h"

namespace py = pybind11;
using safedecode::LogitsView;
using safedecode::RowParams;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

LogitsView make_view(uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk,
                     int64_t sb) {
  if (dtype < 0 || dtype > 2) throw py::value_error("logits: unknown dtype code");
  if (K < 1 || K > 64) throw py::value_error("logits: K must be in [1, 64]");
  if (V < 1 || V > 0x7fffffff) throw py::value_error("logits: V must be in [1, 2^31)");
  return LogitsView{ptr<const void>(data), dtype, K, B, V, sk, sb};
}

RowParams make_params(uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p,
                      uintptr_t log_min_p, uintptr_t log_beta, uintptr_t seed, uintptr_t step) {
  return RowParams{ptr<const float>(w),        ptr<const float>(temp),
                   ptr<const int64_t>(top_k),  ptr<const float>(top_p),
                   ptr<const float>(log_min_p), ptr<const float>(log_beta),
                   ptr<const int64_t>(seed),   ptr<const int64_t>(step)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "safedecode C++ CPU kernels (fused contrastive sampling)";
  m.def(
      "contrastive_sample",
      [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
         uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
         uintptr_t log_beta, uintptr_t seed, uintptr_t step, int rule, int anchor,
         uintptr_t tokens, uintptr_t logprobs, uintptr_t status, int num_threads) {
        LogitsView view = make_view(data, dtype, K, B, V, sk, sb);
        RowParams params = make_params(w, temp, top_k, top_p, log_min_p, log_beta, seed, step);
        py::gil_scoped_release release;
        safedecode::contrastive_sample_cpu(view, params, rule, anchor, ptr<int64_t>(tokens),
                                           ptr<float>(logprobs), ptr<int32_t>(status),
                                           num_threads);
      },
      "Fused contrastive sampling; see safedecode.ops.reference for the semantics.");
  m.def(
      "contrastive_logprobs",
      [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
         uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
         uintptr_t log_beta, int rule, int anchor, uintptr_t out, uintptr_t status,
         int num_threads) {
        LogitsView view = make_view(data, dtype, K, B, V, sk, sb);
        RowParams params = make_params(w, temp, top_k, top_p, log_min_p, log_beta, 0, 0);
        py::gil_scoped_release release;
        safedecode::contrastive_logprobs_cpu(view, params, rule, anchor, ptr<float>(out),
                                             ptr<int32_t>(status), num_threads);
      },
      "Final normalised log-distribution [B, V] of the fused op.");
  m.def("philox_uniform",
        [](uint64_t seed, uint64_t step) { return safedecode::philox_uniform(seed, step); },
        "The shared Philox stream's uniform for (seed, step), for cross-checking.");
  m.def("cpu_isa", []() { return std::string(safedecode::block_kernels().isa); },
        "Vector ISA level of the block kernels in use (avx512, avx2 or baseline).");
  m.def(
      "cpu_isas",
      []() {
        const char* names[8];
        const int n = safedecode::available_isas(names, 8);
        py::list out;
        for (int i = 0; i < n; ++i) out.append(std::string(names[i]));
        return out;
      },
      "ISA levels built into this module that this CPU runs, best first.");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        if (!safedecode::set_block_isa(isa.c_str())) {
          const char* names[8];
          const int n = safedecode::available_isas(names, 8);
          std::string ok;
          for (int i = 0; i < n; ++i) ok += (i ? ", " : "") + std::string(names[i]);
          throw py::value_error("set_cpu_isa: '" + isa +
                                "' is not built or not supported here; choose one of: " + ok);
        }
      },
      "Switch the block kernels to another ISA level (for tests and benchmarks).");
  m.def(
      "linear_small",
      [](uintptr_t x, int64_t ldx, uintptr_t w, uintptr_t bias, uintptr_t y, int64_t ldy,
         int64_t M, int64_t N, int64_t K, int num_threads) {
        if (M < 0 || N < 0 || K < 0) throw py::value_error("linear_small: negative size");
        if ((M > 1 && ldx < K) || (M > 1 && ldy < N))
          throw py::value_error("linear_small: row strides ldx >= K and ldy >= N required");
        if (M > 0 && N > 0 && (!y || (K > 0 && (!x || !w))))
          throw py::value_error("linear_small: null pointer");
        py::gil_scoped_release release;
        safedecode::small_gemm().linear(ptr<const float>(x), ldx, ptr<const float>(w),
                                        ptr<const float>(bias), ptr<float>(y), ldy, M, N, K,
                                        num_threads);
      },
      "y[M, N] = x[M, K] @ w[N, K].T (+ bias), fp32, for small M (decode-time linear layers).");
  m.def("max_threads", []() { return omp_get_max_threads(); },
        "OpenMP threads the kernels use by default.");
}
