// CPU kernels of relu_with_mask / relu_mask_backward. No torch headers: see kernels/relu_mask.h.
//
// Both are one pass over memory. The work is cut into blocks of 64 elements (8 mask bytes) so that
// threads never share a mask byte; float32 and float64 use SSE2 compares and movemask (the x86-64
// baseline) to form 4 or 2 mask bits at a time, the 16-bit types decide on the bit patterns.
#include "../kernels/relu_mask.h"

#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llkern {
namespace {

constexpr int64_t kBlock = 64;                 // elements per unit of work: 8 whole mask bytes
constexpr int64_t kParallelMin = int64_t(1) << 16;

// "x <= 0" for the 16-bit patterns: a non-NaN value with the sign bit set, or a zero.
template <uint16_t kExponentMask>
inline bool le_zero_16(uint16_t b) {
  const uint16_t magnitude = b & 0x7fffu;
  const bool nan = magnitude > kExponentMask;
  return !nan && ((b & 0x8000u) || magnitude == 0);
}

template <typename T> struct Bits16;
template <> struct Bits16<BF16> { static constexpr uint16_t kExponent = 0x7f80u; };
template <> struct Bits16<F16> { static constexpr uint16_t kExponent = 0x7c00u; };

// One block of n <= 64 elements: y and its 64-bit mask word.
template <typename T>
uint64_t forward_block(const T* x, T* y, int64_t n) {
  uint64_t word = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(__SSE2__)
    const __m128 zero = _mm_setzero_ps();
    for (; i + 4 <= n; i += 4) {
      const __m128 v = _mm_loadu_ps(x + i);
      const __m128 le = _mm_cmple_ps(v, zero);  // false for NaN: NaN passes, as torch.relu keeps it
      _mm_storeu_ps(y + i, _mm_andnot_ps(le, v));
      word |= uint64_t(~_mm_movemask_ps(le) & 0xf) << i;
    }
#endif
  } else if constexpr (std::is_same_v<T, double>) {
#if defined(__SSE2__)
    const __m128d zero = _mm_setzero_pd();
    for (; i + 2 <= n; i += 2) {
      const __m128d v = _mm_loadu_pd(x + i);
      const __m128d le = _mm_cmple_pd(v, zero);
      _mm_storeu_pd(y + i, _mm_andnot_pd(le, v));
      word |= uint64_t(~_mm_movemask_pd(le) & 0x3) << i;
    }
#endif
  }
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    // 16-bit patterns, 8 elements (one mask byte) at a time, branch-free so that the compiler vectorises.
    for (; i + 8 <= n; i += 8) {
      uint32_t byte = 0;
      for (int j = 0; j < 8; ++j) {
        const uint16_t b = x[i + j].bits;
        const uint32_t le = le_zero_16<Bits16<T>::kExponent>(b);
        y[i + j].bits = uint16_t(b & (le - 1u));  // le: 0, else b
        byte |= (le ^ 1u) << j;
      }
      word |= uint64_t(byte) << i;
    }
  }
  for (; i < n; ++i) {
    bool le;
    T out = x[i];
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      le = x[i] <= T(0);
      if (le) out = T(0);
    } else {
      le = le_zero_16<Bits16<T>::kExponent>(x[i].bits);
      if (le) out.bits = 0;
    }
    y[i] = out;
    word |= uint64_t(!le) << i;
  }
  return word;
}

template <typename T>
void backward_block(const T* grad, uint64_t word, T* grad_x, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(__SSE2__)
    const __m128i lane_bits = _mm_set_epi32(8, 4, 2, 1);
    for (; i + 4 <= n; i += 4) {
      const __m128i bits = _mm_set1_epi32(int((word >> i) & 0xf));
      const __m128 keep = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_and_si128(bits, lane_bits), lane_bits));
      _mm_storeu_ps(grad_x + i, _mm_and_ps(_mm_loadu_ps(grad + i), keep));  // 0 bits give +0, inf and NaN too
    }
#endif
  }
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
    for (; i + 8 <= n; i += 8) {
      const uint32_t byte = uint32_t(word >> i) & 0xffu;
      for (int j = 0; j < 8; ++j) {
        const uint16_t keep = uint16_t(0u - ((byte >> j) & 1u));  // all ones or zero
        grad_x[i + j].bits = uint16_t(grad[i + j].bits & keep);
      }
    }
  }
  for (; i < n; ++i) {
    if ((word >> i) & 1u) {
      grad_x[i] = grad[i];
    } else {
      std::memset(static_cast<void*>(grad_x + i), 0, sizeof(T));
    }
  }
}

inline void store_word(uint8_t* mask, uint64_t word, int64_t bytes) {
  for (int64_t b = 0; b < bytes; ++b) mask[b] = uint8_t(word >> (8 * b));  // little-endian bit order on any host
}

inline uint64_t load_word(const uint8_t* mask, int64_t bytes) {
  uint64_t word = 0;
  for (int64_t b = 0; b < bytes; ++b) word |= uint64_t(mask[b]) << (8 * b);
  return word;
}

template <typename T>
void forward_typed(const ReluMaskForwardParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t blocks = (p.numel + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock;
    const int64_t n = p.numel - begin < kBlock ? p.numel - begin : kBlock;
    store_word(p.mask + b * 8, forward_block(x + begin, y + begin, n), (n + 7) / 8);
  }
}

template <typename T>
void backward_typed(const ReluMaskBackwardParams& p) {
  const T* grad = static_cast<const T*>(p.grad);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t blocks = (p.numel + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (p.numel >= kParallelMin)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock;
    const int64_t n = p.numel - begin < kBlock ? p.numel - begin : kBlock;
    backward_block(grad + begin, load_word(p.mask + b * 8, (n + 7) / 8), grad_x + begin, n);
  }
}

}  // namespace

void relu_mask_forward_cpu(const ReluMaskForwardParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p);
    case ScalarKind::kFloat64: return forward_typed<double>(p);
    case ScalarKind::kBFloat16: return forward_typed<BF16>(p);
    case ScalarKind::kFloat16: return forward_typed<F16>(p);
  }
}

void relu_mask_backward_cpu(const ReluMaskBackwardParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p);
    case ScalarKind::kFloat64: return backward_typed<double>(p);
    case ScalarKind::kBFloat16: return backward_typed<BF16>(p);
    case ScalarKind::kFloat16: return backward_typed<F16>(p);
  }
}

}  // namespace llkern
