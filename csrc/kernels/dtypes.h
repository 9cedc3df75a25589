// Scalar types shared by the torch-free kernels.
//
// Kernels receive raw pointers plus a ScalarKind tag; this header gives the
// host-side 16-bit float conversions (the CUDA kernels use cuda_bf16.h /
// cuda_fp16.h instead). Conversions round to nearest even, as PyTorch does.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace llkern {

enum class ScalarKind : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Storage-only 16-bit types for the CPU kernels.
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(BF16 v) { return bits_to_float(uint32_t(v.bits) << 16); }

inline BF16 bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return BF16{uint16_t(u >> 16)};
}

inline float to_float(F16 v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline F16 f16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x7f800000u) return F16{uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  if (u >= 0x477ff000u) return F16{uint16_t(sign | 0x7c00u)};  // rounds to infinity
  if (u < 0x38800000u) {  // below the smallest normal half: exact scale, then round
    const float scaled = bits_to_float(u) * 16777216.0f;  // * 2^24, exact
    return F16{uint16_t(sign | uint16_t(std::nearbyint(scaled)))};
  }
  u = u - 0x38000000u + 0xfffu + ((u >> 13) & 1u);  // rebias exponent, round to nearest even
  return F16{uint16_t(sign | uint16_t(u >> 13))};
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline BF16 from_float<BF16>(float f) { return bf16_from_float(f); }
template <> inline F16 from_float<F16>(float f) { return f16_from_float(f); }

}  // namespace llkern
