// Division of 32-bit unsigned indices by a divisor fixed at launch, as one multiply-high, an add and a
// shift (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994): a per-element
// 64-bit division costs dozens of instructions on a GPU, and the broadcast kernels are memory-bound.
// Host and device; no torch, no CUDA headers (the device path uses the __umulhi intrinsic).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LLKERN_HOST_DEVICE inline
#endif

namespace llkern {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;  // m = floor(2^32 (2^shift − d) / d) + 1
  uint32_t shift = 0;       // ceil(log2 d)

  FastDivmod() = default;
  // d >= 1. Exact for every 32-bit numerator: q = (umulhi(n, m) + n) >> shift, the sum taken in 64 bits.
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  LLKERN_HOST_DEVICE uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = uint32_t((uint64_t(n) * multiplier) >> 32);
#endif
    return uint32_t((uint64_t(hi) + n) >> shift);
  }

  LLKERN_HOST_DEVICE void divmod(uint32_t n, uint32_t& quotient, uint32_t& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }
};

}  // namespace llkern
