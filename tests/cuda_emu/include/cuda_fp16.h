// half for tests/cuda_emu: a storage type with CUDA's conversion functions (GCC's _Float16 rounds to
// nearest even, as the device does).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};

inline float __half2float(__half v) {
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return float(h);
}

inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half out;
  std::memcpy(&out.bits, &h, 2);
  return out;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
