// MADFAST_HD marks the per-element math that both the CPU kernels (csrc/*.cpp) and the CUDA
// kernels (csrc/cuda/) call, so the CPU build tests what the GPU runs.
#pragma once

#ifdef __CUDACC__
#define MADFAST_HD __host__ __device__ __forceinline__
#else
#define MADFAST_HD inline
#endif
