// A CPU emulator of the CUDA execution model, enough to run madfast's SIMT kernels in tests on a
// machine without a GPU: each block's threads are fibers (ucontext) on one OS thread, switched at
// __syncthreads(); blocks run one after another. __shared__ variables are static, so the threads
// of a block share them; atomics are plain adds (nothing runs concurrently). It checks indexing,
// tiling, bounds and barrier placement -- not timing, occupancy or the memory model.
#pragma once

#include <ucontext.h>

#include <cstdint>
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
  std::vector<int> barriers;  // __syncthreads() calls per thread: all must agree
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
      for (int t = 1; t < n; ++t)  // every thread waits at the same barrier, or all have returned
        if (barriers[t] != barriers[0] || done[t] != done[0])
          throw std::runtime_error("cuda_emulator: the threads of a block diverged at __syncthreads()");
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

}  // namespace cuda_emulator

#define threadIdx (::cuda_emulator::thread_idx)
#define blockIdx (::cuda_emulator::block_idx)
#define blockDim (::cuda_emulator::block_dim)
#define gridDim (::cuda_emulator::grid_dim)

inline void __syncthreads() { cuda_emulator::Scheduler::get().sync(); }

template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
