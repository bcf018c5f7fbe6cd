// Host entry points of the CUDA backend: device queries, workspace plan, launches.
// Kernels and design notes: contrastive_sample.cuh.
#include "contrastive_sample.h"

#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>

#include "contrastive_sample.cuh"

namespace safedecode {
namespace cuda {

#define SD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

#include "launch.inc"

namespace {

constexpr int kRowThreads = 512;  // 1024 caps registers at 64 and spills (ptxas -v)
constexpr int kSplitThreads = 256;
constexpr int kMaxDevices = 64;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("safedecode CUDA backend: ") + what + ": " +
                             cudaGetErrorString(e));
  }
}

struct DeviceInfo {
  int num_sms = 0;
  int cap = 0;           // candidate capacity of the row kernel
  size_t row_smem = 0;   // its dynamic shared memory
};

// Per-device facts, computed once; also raises the row kernel's dynamic shared-memory limit.
const DeviceInfo& device_info() {
  static DeviceInfo infos[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("device index out of range");
  std::call_once(once[dev], [dev] {
    DeviceInfo d;
    int optin = 0;
    check(cudaDeviceGetAttribute(&d.num_sms, cudaDevAttrMultiProcessorCount, dev),
          "cudaDeviceGetAttribute(SMs)");
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
          "cudaDeviceGetAttribute(smem opt-in)");
    cudaFuncAttributes attr;
    check(cudaFuncGetAttributes(&attr, row_kernel<kRowThreads>), "cudaFuncGetAttributes");
    d.cap = cap_for_smem(static_cast<size_t>(optin), attr.sharedSizeBytes);
    d.row_smem = kRowSmemFixed + 8 * static_cast<size_t>(d.cap);
    check(cudaFuncSetAttribute(row_kernel<kRowThreads>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(d.row_smem)),
          "cudaFuncSetAttribute(row kernel shared memory)");
    infos[dev] = d;
  });
  return infos[dev];
}

Plan plan_for(int64_t B, int64_t V) {
  const DeviceInfo& d = device_info();
  return make_plan(B, V, d.num_sms, d.cap, kSplitThreads);
}

void run(const Problem& pr, void* ws, size_t ws_bytes, int mode, int64_t* tokens, float* lps,
         float* out, int32_t* status, void* stream) {
  check_problem(pr);
  if (pr.B == 0) return;
  const Plan pl = plan_for(pr.B, pr.V);
  if (ws == nullptr || ws_bytes < pl.bytes)
    throw std::invalid_argument("workspace too small: need " + std::to_string(pl.bytes) +
                                " bytes (see workspace_bytes)");
  Params p = make_params(pr, pl, ws, mode);
  p.tokens = tokens;
  p.lps = lps;
  p.out = out;
  p.status = status;
  launch_all<kRowThreads, kSplitThreads>(p, pl, static_cast<cudaStream_t>(stream));
  check(cudaGetLastError(), "kernel launch");
}

}  // namespace

size_t workspace_bytes(int64_t B, int64_t V) {
  if (B <= 0 || V <= 0) return 256;
  return plan_for(B, V).bytes;
}

void contrastive_sample(const Problem& p, void* workspace, size_t workspace_size, int64_t* tokens,
                        float* logprobs, int32_t* status, void* stream) {
  if (p.seed == nullptr || p.step == nullptr)
    throw std::invalid_argument("contrastive_sample needs seed and step");
  run(p, workspace, workspace_size, kModeSample, tokens, logprobs, nullptr, status, stream);
}

void contrastive_logprobs(const Problem& p, void* workspace, size_t workspace_size, float* out,
                          int32_t* status, void* stream) {
  run(p, workspace, workspace_size, kModeLogprobs, nullptr, nullptr, out, status, stream);
}

void philox_uniform_device(const int64_t* seed, const int64_t* step, double* out, int64_t n,
                           void* stream) {
  if (n <= 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  philox_kernel<<<static_cast<unsigned>(blocks), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      seed, step, out, n);
  check(cudaGetLastError(), "philox kernel launch");
}

}  // namespace cuda
}  // namespace safedecode
