// Helpers that let GCC vectorize the CPU kernels' inner loops, in one binary for every x86 CPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

// An x86-64-v3 (AVX2, FMA, F16C) clone of the function, chosen at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MADFAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MADFAST_CPU_CLONES
#endif

namespace madfast {

// exp(x) for x <= 0 without a libm call, so that loops over it vectorize (glibc's expf does
// not, short of -ffast-math): 2^n * p(r) with n = round(x / ln 2), |r| <= ln2 / 2 and Cephes'
// degree-6 polynomial; within 2 ulp of expf over [-87, 0]. Below -87 it returns 0. Branch-free.
inline float exp_nonpositive(float x) {
  const float keep = x >= -87.0f ? 1.0f : 0.0f;  // a select, not a branch
  x = std::max(x, -87.0f);
  // x <= 0: truncating x/ln2 - 0.5 toward zero rounds x/ln2 to nearest.
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f - 0.5f);
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f;  // ln 2 in two parts, for an exact product with n
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (ni + 127) << 23);  // 2^n
  return p * scale * keep;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace madfast
