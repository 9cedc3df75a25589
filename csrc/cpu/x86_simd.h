// x86 SIMD helpers shared by the CPU kernels: AVX2 + FMA code paths chosen at run time. No
// torch headers.
//
// The package is built for the baseline x86-64 ISA; the compute-heavy loops have copies compiled
// for AVX2 + FMA (target attribute). Each such copy is a function of its own called from inside
// an OpenMP region: an outlined parallel region would not inherit a target attribute.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#define LLKERN_X86_CLONES 1

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

namespace llkern {
namespace cpu {

// LLKERN_CPU_BASELINE=1 forces the baseline copies (to test them on AVX2 machines).
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("LLKERN_CPU_BASELINE") == nullptr;
  return has;
}

// Sum of the eight lanes.
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// Largest of the eight lanes.
__attribute__((target("avx2,fma"))) inline float hmax_avx2(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// Eight exponentials: Cephes' single-precision exp (range reduction by ln 2 in two parts,
// degree-6 polynomial, about 1 ulp). Arguments below -87 give exp(-87), 1.6e-38, instead of a
// denormal: the callers only use exp(x - max), where such terms sit next to exp(0) = 1.
__attribute__((target("avx2,fma"))) inline __m256 exp8_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Mask of the first n (0..8) lanes.
__attribute__((target("avx2,fma"))) inline __m256 first_lanes_avx2(int64_t n) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// z[k] = exp(z[k] - shift) for k < n, returning their sum, eight at a time (exp8_avx2).
__attribute__((target("avx2,fma"))) inline float exp_shifted_sum_avx2(float* z, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 total = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(z + i), s));
    _mm256_storeu_ps(z + i, v);
    total = _mm256_add_ps(total, v);
  }
  if (i < n) {  // the tail through a padded copy; lanes past n are masked out of the sum
    alignas(32) float tail[8];
    for (int l = 0; l < 8; ++l) tail[l] = i + l < n ? z[i + l] : shift;
    const __m256 v = exp8_avx2(_mm256_sub_ps(_mm256_load_ps(tail), s));
    _mm256_store_ps(tail, v);
    for (int l = 0; i + l < n; ++l) z[i + l] = tail[l];
    const __m256 mask = first_lanes_avx2(n - i);
    total = _mm256_add_ps(total, _mm256_and_ps(v, mask));
  }
  return hsum_avx2(total);
}


// max_j x_j (n >= 1 or -inf).
__attribute__((target("avx2,fma"))) inline float max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-__builtin_inff());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  float best = hmax_avx2(m);
  for (; j < n; ++j) best = x[j] > best ? x[j] : best;
  return best;
}

// acc_j += exp(x_j - shift_j) for j < n (n a multiple of 8 or not; the tail through expf).
__attribute__((target("avx2,fma"))) inline void add_exp_avx2(const float* x, const float* shift, float* acc,
                                                              int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(shift + j)));
    _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), e));
  }
  for (; j < n; ++j) acc[j] += __builtin_expf(x[j] - shift[j]);
}

// x_j = scale * (exp(x_j - a) + exp(x_j - b_j)) for j < n.
__attribute__((target("avx2,fma"))) inline void two_exp_avx2(float* x, int64_t n, float a, const float* b,
                                                              float scale) {
  const __m256 av = _mm256_set1_ps(a), sv = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    const __m256 e = _mm256_add_ps(exp8_avx2(_mm256_sub_ps(v, av)), exp8_avx2(_mm256_sub_ps(v, _mm256_loadu_ps(b + j))));
    _mm256_storeu_ps(x + j, _mm256_mul_ps(sv, e));
  }
  for (; j < n; ++j) x[j] = scale * (__builtin_expf(x[j] - a) + __builtin_expf(x[j] - b[j]));
}

}  // namespace cpu
}  // namespace llkern

#endif
