// A tiny CPU emulator of the CUDA features the safedecode kernels use, so their logic can be tested
// on machines without a GPU: blocks run one after another, __syncthreads and warp collectives are
// barriers, `__shared__` variables are statics (shared by the threads of the one running block).
// Each CUDA thread is a fiber (its own stack, switched in user space on one OS thread): a thread
// runs until it waits at a barrier, then the block's next thread runs, so a run is the same every
// time however busy the machine is. A barrier that some threads never reach (a divergent
// __syncthreads) stops the program with a message instead of hanging. Under ThreadSanitizer the
// fibers are TSan fibers that synchronise only through the barriers (and atomics), so a missing
// barrier around shared memory is a reported race (scripts/check_cuda_races.sh).
// Build with g++ -std=c++20 -DSD_EMULATE -ffp-contract=off. It checks logic and synchronisation,
// not speed or GPU rounding of expf/logf.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define SD_EMU_TSAN 1
#endif
// The emulator's own bookkeeping (who waits where) is not the kernels' memory: TSan skips it.
#define SD_EMU_INTERNAL __attribute__((no_sanitize_thread, noinline))

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

inline thread_local dim3 t_thread_idx;

struct Barrier;

// One CUDA thread of the running block.
struct Fiber {
  ucontext_t ctx;
  const Barrier* waits_on = nullptr;  // blocked until that barrier's phase moves on
  unsigned phase = 0;
  bool done = false;
};

// The running block's fibers, their stacks (reused from block to block) and the scheduler.
struct Scheduler {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::function<void()> body;
  int current = -1;
#ifdef SD_EMU_TSAN
  std::vector<void*> tsan;  // a TSan fiber per thread, reused like the stacks
  void* tsan_main = nullptr;
  char finished = 0;  // sync object: a thread's whole run happens before the block's end
#endif
};
inline Scheduler g_sched;
constexpr size_t kFiberStack = 256 * 1024;

SD_EMU_INTERNAL inline void to_scheduler(Fiber& f) {
#ifdef SD_EMU_TSAN
  __tsan_switch_to_fiber(g_sched.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f.ctx, &g_sched.main);
}

// A barrier of n threads: the last to arrive goes on, the others wait for the phase to move.
// For TSan, arriving releases and leaving acquires the phase's sync object (two alternate: no
// thread can arrive at phase p + 2 before every thread has left phase p). Switches between
// threads do not synchronise, so two threads' accesses are ordered by barriers only.
struct Barrier {
  explicit Barrier(int n) : expected(n) {}
  SD_EMU_INTERNAL void arrive_and_wait() {
    const unsigned my = phase;
#ifdef SD_EMU_TSAN
    __tsan_release(&sync[my & 1u]);
#endif
    if (++arrived == expected) {
      arrived = 0;
      ++phase;
    } else {
      Fiber& f = g_sched.fibers[g_sched.current];
      f.waits_on = this;
      f.phase = my;
      to_scheduler(f);
    }
#ifdef SD_EMU_TSAN
    __tsan_acquire(&sync[my & 1u]);
#endif
  }
  int expected, arrived = 0;
  unsigned phase = 0;
  char sync[2] = {};
};

SD_EMU_INTERNAL inline void fiber_entry() {
  g_sched.body();
  g_sched.fibers[g_sched.current].done = true;
#ifdef SD_EMU_TSAN
  __tsan_release(&g_sched.finished);
  __tsan_switch_to_fiber(g_sched.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
}  // uc_link returns to the scheduler

// Runs body() as threads 0..nt-1 until all return: round after round, each thread that is not
// waiting runs to its next barrier (or its end). Under TSan, what the launching code wrote
// happens before each thread starts, and each thread's run before the block's end.
SD_EMU_INTERNAL inline void run_fibers(int nt, std::function<void()> body) {
  Scheduler& s = g_sched;
  s.body = std::move(body);
  s.fibers.assign(nt, Fiber{});
  while (static_cast<int>(s.stacks.size()) < nt) s.stacks.emplace_back(new char[kFiberStack]);
#ifdef SD_EMU_TSAN
  s.tsan_main = __tsan_get_current_fiber();
  while (static_cast<int>(s.tsan.size()) < nt) s.tsan.push_back(__tsan_create_fiber(0));
#endif
  for (int t = 0; t < nt; ++t) {
    Fiber& f = s.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = s.stacks[t].get();
    f.ctx.uc_stack.ss_size = kFiberStack;
    f.ctx.uc_link = &s.main;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (int live = nt, started = 0; live > 0; started = 1) {
    bool ran = false;
    live = 0;
    for (int t = 0; t < nt; ++t) {
      Fiber& f = s.fibers[t];
      if (f.done) continue;
      if (f.waits_on == nullptr || f.waits_on->phase != f.phase) {
        f.waits_on = nullptr;
        s.current = t;
        t_thread_idx = dim3(static_cast<unsigned>(t));
#ifdef SD_EMU_TSAN
        __tsan_switch_to_fiber(s.tsan[t], started ? __tsan_switch_to_fiber_no_sync : 0);
#endif
        swapcontext(&s.main, &f.ctx);
        ran = true;
      }
      live += f.done ? 0 : 1;
    }
    if (live > 0 && !ran) {
      std::fprintf(stderr, "emu: deadlock: %d threads wait at a barrier the others never reach\n",
                   live);
      std::abort();
    }
  }
  s.current = -1;
#ifdef SD_EMU_TSAN
  __tsan_acquire(&s.finished);
#endif
}

struct Warp {
  Barrier bar{32};
  alignas(16) unsigned char slot[32][16];
};

struct Block {
  explicit Block(int nt) : bar(nt), warps(new Warp[(nt + 31) / 32]) {}
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
};

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
        run_fibers(nt, [&] { kernel(args...); });
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
