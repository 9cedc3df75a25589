// bfloat16 and half for tests/cuda_emu: storage types with CUDA's conversion functions, rounding to nearest
// even as the device does.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
  const uint32_t b = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{uint16_t((b >> 16) | 0x40u)};  // NaN stays quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return __nv_bfloat16{uint16_t(b >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
