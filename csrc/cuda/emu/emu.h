// A tiny CPU emulator of the CUDA features the safedecode kernels use, so their logic can be tested
// on machines without a GPU: each CUDA thread is an OS thread, blocks run one after another,
// __syncthreads and warp collectives are barriers, `__shared__` variables are statics (shared by
// the threads of the one running block). Build with g++ -std=c++20 -DSD_EMULATE
// -ffp-contract=off. It checks logic and synchronisation, not speed or GPU rounding of expf/logf.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  alignas(16) unsigned char slot[32][16];
};

struct Block {
  explicit Block(int nt) : bar(nt), warps(new Warp[(nt + 31) / 32]) {}
  std::barrier<> bar;
  std::unique_ptr<Warp[]> warps;
};

inline thread_local dim3 t_thread_idx;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
inline Block* g_block = nullptr;
inline unsigned char* g_dyn_smem = nullptr;

inline unsigned lane() { return t_thread_idx.x & 31u; }
inline Warp& warp() { return g_block->warps[t_thread_idx.x / 32]; }

// Every lane publishes v; returns lane src's value. All 32 lanes of the warp must call.
template <typename T>
T exchange(const T& v, int src) {
  static_assert(sizeof(T) <= 16, "exchange: type too large");
  Warp& w = warp();
  std::memcpy(w.slot[lane()], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r;
  std::memcpy(&r, w.slot[src & 31], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

// Every lane publishes v; out[i] = lane i's value.
template <typename T>
void gather(const T& v, T (&out)[32]) {
  Warp& w = warp();
  std::memcpy(w.slot[lane()], &v, sizeof(T));
  w.bar.arrive_and_wait();
  for (int i = 0; i < 32; ++i) std::memcpy(&out[i], w.slot[i], sizeof(T));
  w.bar.arrive_and_wait();
}

// Runs kernel(args...) on grid x block threads (1-D blocks), block after block.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  g_grid_dim = grid;
  g_block_dim = block;
  std::vector<unsigned char> dyn(smem + 64);
  unsigned char* base = dyn.data();
  base += (16 - reinterpret_cast<uintptr_t>(base) % 16) % 16;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(base, 0xA5, smem);  // garbage, like real shared memory
        g_dyn_smem = base;
        g_block_idx = dim3(x, y, z);
        Block blk(nt);
        g_block = &blk;
        std::vector<std::thread> threads;
        threads.reserve(nt);
        for (int t = 0; t < nt; ++t)
          threads.emplace_back([&, t] {
            t_thread_idx = dim3(static_cast<unsigned>(t));
            kernel(args...);
          });
        for (auto& th : threads) th.join();
        g_block = nullptr;
      }
}

}  // namespace emu

#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

typedef void* cudaStream_t;

inline void __syncthreads() { emu::g_block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp().bar.arrive_and_wait(); }

template <typename T>
T __shfl_sync(unsigned, T v, int src, int = 32) {
  return emu::exchange(v, src);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m, int = 32) {
  return emu::exchange(v, static_cast<int>(emu::lane()) ^ m);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) {
  const int l = static_cast<int>(emu::lane());
  return emu::exchange(v, l - static_cast<int>(d) >= 0 ? l - static_cast<int>(d) : l);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) {
  const int l = static_cast<int>(emu::lane());
  return emu::exchange(v, l + static_cast<int>(d) <= 31 ? l + static_cast<int>(d) : l);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  int all[32];
  emu::gather(pred ? 1 : 0, all);
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= (all[i] ? 1u : 0u) << i;
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline unsigned __match_any_sync(unsigned, unsigned v) {
  unsigned all[32];
  emu::gather(v, all);
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= (all[i] == v ? 1u : 0u) << i;
  return m;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

template <typename T>
T atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned long long __float2ull_rz(float f) { return static_cast<unsigned long long>(f); }
