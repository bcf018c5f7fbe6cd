// Data-race check of the CUDA kernels' synchronisation: runs them in the CPU emulator under
// ThreadSanitizer (each CUDA thread a TSan fiber, ordered only by __syncthreads and the warp
// shuffles' barriers, so a missing barrier around shared memory is a reported race). Used by
// scripts/check_cuda_races.sh:
//   g++ -std=c++20 -O1 -g -fsanitize=thread -ffp-contract=off -DSD_EMULATE -pthread race_check.cpp
// Arguments: V cap rule (rule 0 linear, 1 union). Exit status 66 (TSan) on any race.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>
#include <vector>

#include "../contrastive_sample.h"
#include "../contrastive_sample.cuh"

namespace safedecode {
namespace cuda {
#define SD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::launch(kernel, grid, block, smem, __VA_ARGS__))
#include "../launch.inc"
}  // namespace cuda
}  // namespace safedecode

using namespace safedecode::cuda;

int main(int argc, char** argv) {
  const int64_t K = 2, B = 4;
  const int64_t V = argc > 1 ? std::atoll(argv[1]) : 1500;
  const int cap = argc > 2 ? std::atoi(argv[2]) : 256;
  const int rule = argc > 3 ? std::atoi(argv[3]) : 0;
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> logits(K * B * V);
  for (float& x : logits) x = normal(gen);
  const float ninf = -INFINITY;
  // Rows: top-k + top-p + beta / greedy with log-prob / top-p + min-p / plain temperature.
  std::vector<float> w = {1.0f, rule ? 3.0f : -0.5f, 1.0f, 0.5f, 1.0f, 0.0f, 1.5f, 0.2f};
  std::vector<float> temp = {1.0f, 0.0f, 0.7f, 1.3f}, top_p = {0.9f, 1.0f, 0.5f, 1.0f};
  std::vector<float> log_min_p = {ninf, -2.0f, -3.0f, ninf}, log_beta = {-2.3f, ninf, ninf, -5.0f};
  std::vector<int64_t> top_k = {50, 0, 0, 0}, seed = {1, 2, 3, 4}, step = {0, 0, 0, 7};
  Problem pr{logits.data(), kF32, K, B, V, B * V, V, w.data(), temp.data(), top_k.data(),
             top_p.data(), log_min_p.data(), log_beta.data(), seed.data(), step.data(), rule, 0};
  check_problem(pr);
  const Plan pl = make_plan(B, V, 8, cap, 32);
  std::vector<unsigned char> ws(pl.bytes);
  std::vector<int64_t> tokens(B);
  std::vector<float> lps(B), out(B * V);
  std::vector<int32_t> status(B);

  Params p = make_params(pr, pl, ws.data(), kModeSample);
  p.tokens = tokens.data();
  p.lps = lps.data();
  p.status = status.data();
  launch_all<64, 32>(p, pl, nullptr);
  Params q = make_params(pr, pl, ws.data(), kModeLogprobs);
  q.out = out.data();
  q.status = status.data();
  launch_all<64, 32>(q, pl, nullptr);
  std::printf("V=%lld cap=%d rule=%d tokens %lld %lld %lld %lld\n", static_cast<long long>(V),
              cap, rule, static_cast<long long>(tokens[0]), static_cast<long long>(tokens[1]),
              static_cast<long long>(tokens[2]), static_cast<long long>(tokens[3]));
  return 0;
}
