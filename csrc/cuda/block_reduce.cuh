// Sums over the threads of a block, through shared memory (a tree of kThreads / 2, / 4, ... adds).
#pragma once

namespace madfast {

// a and b summed over the block's kThreads threads; thread 0 returns with the totals. Every
// thread of the block must call it (it holds __syncthreads()).
template <int kThreads, typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b) {
  static_assert((kThreads & (kThreads - 1)) == 0, "a power of two");
  __shared__ T ra[kThreads], rb[kThreads];
  ra[threadIdx.x] = a;
  rb[threadIdx.x] = b;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      ra[threadIdx.x] += ra[threadIdx.x + stride];
      rb[threadIdx.x] += rb[threadIdx.x + stride];
    }
    __syncthreads();
  }
  a = ra[0];
  b = rb[0];
}

}  // namespace madfast
