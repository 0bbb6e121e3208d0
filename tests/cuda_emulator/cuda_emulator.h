// A CPU emulator of the CUDA execution model, enough to run madfast's kernels in tests on a machine
// without a GPU: each block's threads are fibers (ucontext) on one OS thread, switched at
// __syncthreads() and at warp shuffles; blocks run one after another. __shared__ variables are
// static, so the threads of a block share them; atomics are plain adds (nothing runs concurrently).
// A thread that has returned no longer takes part, as on sm_70+. It checks indexing, tiling,
// bounds and barrier placement -- not timing, occupancy or the memory model.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_emulator {

inline dim3 thread_idx, block_idx, block_dim, grid_dim;

struct Scheduler {
  static constexpr size_t kStack = 256 * 1024;
  ucontext_t main;
  std::vector<ucontext_t> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<bool> done;
  std::vector<int> barriers;  // sync points reached per thread: all threads still running must agree
  std::vector<uint64_t> lanes;  // each thread's value published for a warp shuffle
  int current = 0;
  const std::function<void()>* body = nullptr;

  static Scheduler& get() {
    static Scheduler s;
    return s;
  }

  static void entry() {
    Scheduler& s = get();
    (*s.body)();
    s.done[s.current] = true;  // returning resumes `main` through uc_link
  }

  void run_block(int n, const std::function<void()>& kernel) {
    body = &kernel;
    threads.assign(n, ucontext_t{});
    done.assign(n, false);
    barriers.assign(n, 0);
    lanes.assign(n, 0);
    while (static_cast<int>(stacks.size()) < n) stacks.emplace_back(new char[kStack]);
    for (int t = 0; t < n; ++t) {
      getcontext(&threads[t]);
      threads[t].uc_stack.ss_sp = stacks[t].get();
      threads[t].uc_stack.ss_size = kStack;
      threads[t].uc_link = &main;
      makecontext(&threads[t], &Scheduler::entry, 0);
    }
    for (bool all_done = false; !all_done;) {  // one round = every thread up to its next barrier
      all_done = true;
      for (int t = 0; t < n; ++t) {
        if (done[t]) continue;
        current = t;
        thread_idx = dim3(t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y));
        swapcontext(&main, &threads[t]);
        all_done = all_done && done[t];
      }
      int at = -1;  // every thread still running waits at the same sync point
      for (int t = 0; t < n; ++t) {
        if (done[t]) continue;
        if (at >= 0 && barriers[t] != at)
          throw std::runtime_error("cuda_emulator: the threads of a block diverged at a sync point");
        at = barriers[t];
      }
    }
  }

  void sync() {
    ++barriers[current];
    swapcontext(&threads[current], &main);
  }
};

// kernel<<<grid, block>>>(args...), run to completion.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
  const std::function<void()> body = [&] { kernel(args...); };
  grid_dim = grid;
  block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        Scheduler::get().run_block(static_cast<int>(block.x * block.y * block.z), body);
      }
}

// __shfl_xor_sync: the lanes of a warp swap values; every thread of the block syncs twice (the
// kernels shuffle in whole warps, uniformly across the block's running threads).
template <typename T>
T shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffled value fits 8 bytes");
  Scheduler& s = Scheduler::get();
  const int me = s.current, partner = (me & ~31) | ((me & 31) ^ lane_mask);
  std::memcpy(&s.lanes[me], &value, sizeof(T));
  s.sync();  // every lane has published
  T out;
  std::memcpy(&out, &s.lanes[partner], sizeof(T));
  s.sync();  // every lane has read before the next shuffle overwrites
  return out;
}

}  // namespace cuda_emulator

#define threadIdx (::cuda_emulator::thread_idx)
#define blockIdx (::cuda_emulator::block_idx)
#define blockDim (::cuda_emulator::block_dim)
#define gridDim (::cuda_emulator::grid_dim)

inline void __syncthreads() { cuda_emulator::Scheduler::get().sync(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask: whole warps here*/, T value, int lane_mask) {
  return cuda_emulator::shfl_xor(value, lane_mask);
}

using std::max;
using std::min;

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
