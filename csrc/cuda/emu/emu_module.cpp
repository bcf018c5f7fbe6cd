// The CUDA kernels compiled for the CPU emulator (emu.h) as a pybind11 module, so tests can check
// their logic against the reference without a GPU. Built on the fly by tests/test_cuda_emulated.py:
//   g++ -std=c++20 -O1 -ffp-contract=off -DSD_EMULATE -shared -fPIC -pthread ...
// The module name comes from -DSD_EMU_MODULE=<name>. Pointers are host addresses (CPU tensors).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "../contrastive_sample.h"
#include "../contrastive_sample.cuh"

namespace safedecode {
namespace cuda {

#define SD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::launch(kernel, grid, block, smem, __VA_ARGS__))

#include "../launch.inc"

}  // namespace cuda
}  // namespace safedecode

namespace py = pybind11;
using safedecode::cuda::Params;
using safedecode::cuda::Plan;
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

// variant 0: 64-thread row blocks, 32-thread split blocks (fast to emulate);
// variant 1: the CUDA build's 512 / 256 (kRowThreads / kSplitThreads of contrastive_sample.cu).
void run(const Problem& pr, int mode, uintptr_t ws, size_t ws_bytes, int64_t* tokens, float* lps,
         float* out, int32_t* status, int num_sms, int cap, int variant) {
  using namespace safedecode::cuda;
  check_problem(pr);
  if (pr.B == 0) return;
  const int split_nt = variant == 0 ? 32 : 256;
  const Plan pl = make_plan(pr.B, pr.V, num_sms, cap, split_nt);
  if (ws_bytes < pl.bytes) throw std::invalid_argument("workspace too small");
  Params p = make_params(pr, pl, ptr<void>(ws), mode);
  p.tokens = tokens;
  p.lps = lps;
  p.out = out;
  p.status = status;
  if (variant == 0) {
    launch_all<64, 32>(p, pl, nullptr);
  } else {
    launch_all<512, 256>(p, pl, nullptr);
  }
}

}  // namespace

#ifndef SD_EMU_MODULE
#define SD_EMU_MODULE _sd_cuda_emu
#endif

PYBIND11_MODULE(SD_EMU_MODULE, m) {
  m.doc() = "safedecode CUDA kernels run by the CPU emulator (tests only)";
  m.def("workspace_bytes", [](int64_t B, int64_t V, int num_sms, int cap, int variant) {
    return safedecode::cuda::make_plan(B, V, num_sms, cap, variant == 0 ? 32 : 256).bytes;
  });
  m.def("candidates_offset", [](int64_t B, int64_t V, int num_sms, int cap, int variant) {
    // byte offset of the per-row compacted-candidate counts (uint64 [B]) in the workspace
    return safedecode::cuda::make_plan(B, V, num_sms, cap, variant == 0 ? 32 : 256).off_cand;
  });
  m.def("contrastive_sample",
        [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
           uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
           uintptr_t log_beta, uintptr_t seed, uintptr_t step, int rule, int anchor,
           uintptr_t ws, size_t ws_bytes, uintptr_t tokens, uintptr_t logprobs, uintptr_t status,
           int num_sms, int cap, int variant) {
          const Problem pr = make_problem(data, dtype, K, B, V, sk, sb, w, temp, top_k, top_p,
                                          log_min_p, log_beta, seed, step, rule, anchor);
          py::gil_scoped_release release;
          run(pr, safedecode::cuda::kModeSample, ws, ws_bytes, ptr<int64_t>(tokens),
              ptr<float>(logprobs), nullptr, ptr<int32_t>(status), num_sms, cap, variant);
        });
  m.def("contrastive_logprobs",
        [](uintptr_t data, int dtype, int64_t K, int64_t B, int64_t V, int64_t sk, int64_t sb,
           uintptr_t w, uintptr_t temp, uintptr_t top_k, uintptr_t top_p, uintptr_t log_min_p,
           uintptr_t log_beta, int rule, int anchor, uintptr_t ws, size_t ws_bytes,
           uintptr_t out, uintptr_t status, int num_sms, int cap, int variant) {
          const Problem pr = make_problem(data, dtype, K, B, V, sk, sb, w, temp, top_k, top_p,
                                          log_min_p, log_beta, 0, 0, rule, anchor);
          py::gil_scoped_release release;
          run(pr, safedecode::cuda::kModeLogprobs, ws, ws_bytes, nullptr, nullptr,
              ptr<float>(out), ptr<int32_t>(status), num_sms, cap, variant);
        });
  m.def("philox_uniform", [](uint64_t seed, uint64_t step) {
    return safedecode::philox_uniform(seed, step);
  });
}
