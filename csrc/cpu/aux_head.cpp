// CPU kernels of the fused auxiliary head. No torch headers: see kernels/aux_head.h.
#include "../kernels/aux_head.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "scalar.h"
#include "x86_simd.h"

#if defined(__GNUC__)
#define LLKERN_ALWAYS_INLINE __attribute__((always_inline))
#else
#define LLKERN_ALWAYS_INLINE
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <omp.h>

namespace llkern {
namespace {

using cpu::AccOf;
using cpu::store;
#if defined(LLKERN_X86_CLONES)
using cpu::cpu_has_avx2_fma;
using cpu::exp_shifted_sum_avx2;
using cpu::hsum_avx2;
#endif

#if defined(__SSE2__)
// float planes of a multiple of 4 values (the common case): four SSE accumulators.
inline float sum_floats_sse(const float* v, int64_t n) {
  __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm_add_ps(a0, _mm_loadu_ps(v + i));
    a1 = _mm_add_ps(a1, _mm_loadu_ps(v + i + 4));
    a2 = _mm_add_ps(a2, _mm_loadu_ps(v + i + 8));
    a3 = _mm_add_ps(a3, _mm_loadu_ps(v + i + 12));
  }
  for (; i < n; i += 4) a0 = _mm_add_ps(a0, _mm_loadu_ps(v + i));
  __m128 a = _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}
#endif

// Sum of n values in kLanes independent partial sums (vectorisable, fixed order).
template <typename T, typename Acc>
inline Acc sum_values(const T* v, int64_t n) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    if (n % 4 == 0) return sum_floats_sse(v, n);
  }
#endif
  constexpr int kLanes = 16;
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += Acc(to_float(v[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += Acc(to_float(v[i]));
  // Pairwise: 4 dependent adds instead of 16 (this runs once per (b, c) plane).
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

#if defined(LLKERN_X86_CLONES)
// Means of float planes of S values, S a multiple of 8: two 8-wide accumulators per plane. (Eight
// planes at a time with one horizontal-add tree measured slower: eight read streams.)
__attribute__((target("avx2,fma"))) void pool_planes_float_avx2(const float* in, float* out, int64_t begin,
                                                                int64_t end, int64_t S, float inv) {
  for (int64_t bc = begin; bc < end; ++bc) {
    const float* v = in + bc * S;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= S; i += 16) {
      // Eight lines ahead, non-temporal: the hardware prefetcher stops at each 4 KiB page, and
      // features read once should not evict the cache's contents (the rest of the training
      // step's code and data). Measured: pooling 0.83 -> 0.67 ms, the whole op 2.2 -> 1.8 ms.
      // A prefetch past the end of the features is harmless: prefetches never fault.
      _mm_prefetch(reinterpret_cast<const char*>(v + i) + 512, _MM_HINT_NTA);
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(v + i + 8));
    }
    if (i < S) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
    out[bc] = hsum_avx2(_mm256_add_ps(a0, a1)) * inv;
  }
}

#endif

// Pooling work comes in units: (b, c) planes of S contiguous values for contiguous features,
// whole images for channels_last ones. Rows r0..r1 are units r0 C..r1 C, or r0..r1.
inline int64_t pool_units_per_row(const PoolParams& p) { return p.channels_last ? 1 : p.channels; }

// Means of the pooling units u0 <= u < u1 into the pooled rows (one thread).
template <typename T>
void pool_units(const PoolParams& p, int64_t u0, int64_t u1) {
  using Acc = typename AccOf<T>::type;
  const T* in = static_cast<const T*>(p.features);
  Acc* out = static_cast<Acc*>(p.pooled);
  const int64_t C = p.channels, S = p.spatial;
  const Acc inv = Acc(1) / Acc(S);
  if (!p.channels_last) {
#if defined(LLKERN_X86_CLONES)
    if constexpr (std::is_same_v<T, float>) {
      if (S % 8 == 0 && cpu_has_avx2_fma()) return pool_planes_float_avx2(in, out, u0, u1, S, inv);
    }
#endif
    for (int64_t bc = u0; bc < u1; ++bc) out[bc] = sum_values<T, Acc>(in + bc * S, S) * inv;
    return;
  }
  for (int64_t b = u0; b < u1; ++b) {  // (b, s, c): add the S rows of C channels of each image
    Acc* row = out + b * C;
    for (int64_t c = 0; c < C; ++c) row[c] = 0;
    const T* image = in + b * S * C;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t c = 0; c < C; ++c) row[c] += Acc(to_float(image[s * C + c]));
    }
    for (int64_t c = 0; c < C; ++c) row[c] *= inv;
  }
}

template <typename T>
void pool_typed(const PoolParams& p) {
  const int64_t units = p.batch * pool_units_per_row(p);
#pragma omp parallel if (p.batch * p.channels * p.spatial > 32768)
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    pool_units<T>(p, units * id / threads, units * (id + 1) / threads);
  }
}

// The pooling of rows r0..r1 inside the fused pass, by the features' dtype.
using PoolRowsFn = void (*)(const PoolParams&, int64_t, int64_t);

template <typename T>
void pool_rows(const PoolParams& p, int64_t r0, int64_t r1) {
  const int64_t per_row = pool_units_per_row(p);
  pool_units<T>(p, r0 * per_row, r1 * per_row);
}

inline PoolRowsFn pick_pool_rows(ScalarKind dtype) {
  switch (dtype) {
    case ScalarKind::kFloat32: return &pool_rows<float>;
    case ScalarKind::kFloat64: return &pool_rows<double>;
    case ScalarKind::kBFloat16: return &pool_rows<BF16>;
    case ScalarKind::kFloat16: return &pool_rows<F16>;
  }
  return nullptr;
}

template <typename Acc>
void cross_entropy_rows_typed(const CrossEntropyRowsParams& p) {
  Acc* logits = static_cast<Acc*>(p.logits);
  const int64_t K = p.classes;
  const Acc eps = Acc(p.label_smoothing);
  const Acc eps_per_class = eps / Acc(K);
  const Acc scale = Acc(p.grad_scale);
  std::vector<double> row_loss(static_cast<size_t>(p.rows), 0.0);
  std::vector<char> row_correct(static_cast<size_t>(p.rows), 0);
#pragma omp parallel for schedule(static) if (p.rows * K > 16384)
  for (int64_t i = 0; i < p.rows; ++i) {
    Acc* z = logits + i * K;
    const int64_t y = p.target[i];
    if (y == p.ignore_index) {
      if (p.write_grad) {
        for (int64_t k = 0; k < K; ++k) z[k] = 0;
      }
      continue;
    }
    Acc max = z[0];
    int64_t argmax = 0;
    Acc total = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (z[k] > max) { max = z[k]; argmax = k; }
      total += z[k];
    }
    Acc sum_exp = 0;
    for (int64_t k = 0; k < K; ++k) sum_exp += std::exp(z[k] - max);
    const Acc lse = max + std::log(sum_exp);
    row_loss[i] = double((Acc(1) - eps) * (lse - z[y]) + eps * (lse - total / Acc(K)));
    row_correct[i] = argmax == y;
    if (p.write_grad) {
      for (int64_t k = 0; k < K; ++k) z[k] = scale * (std::exp(z[k] - lse) - eps_per_class);
      z[y] -= scale * (Acc(1) - eps);
    }
  }
  double loss = 0.0;
  int64_t correct = 0;
  for (int64_t i = 0; i < p.rows; ++i) {  // in order: deterministic
    loss += row_loss[i];
    correct += row_correct[i];
  }
  *p.loss_sum += loss;
  *p.correct += correct;
}

template <typename T>
void broadcast_typed(const BroadcastParams& p) {
  using Acc = typename AccOf<T>::type;
  const Acc* dp = static_cast<const Acc*>(p.grad_pooled);
  const Acc g = Acc(double(*static_cast<const Acc*>(p.grad_loss)) * p.scale);
  T* out = static_cast<T*>(p.grad_features);
  const int64_t C = p.channels, S = p.spatial;
#if defined(__SSE2__)
  // float32 planes of a multiple of 4 values: streaming stores skip reading the destination
  // lines before writing them, which is half the memory traffic of a plain fill.
  if constexpr (std::is_same_v<T, float>) {
    if (!p.channels_last && S % 4 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
#pragma omp parallel if (p.batch * C * S > 32768)
      {
#pragma omp for schedule(static)
        for (int64_t bc = 0; bc < p.batch * C; ++bc) {
          const __m128 v = _mm_set1_ps(g * dp[bc]);
          float* plane = out + bc * S;
          // A whole 64-byte line per iteration: with one 16-byte store per iteration the loop's
          // issue rate, not memory, set the speed (it varied by 25 % with the loop's alignment).
          int64_t s = 0;
          for (; s + 16 <= S; s += 16) {
            _mm_stream_ps(plane + s, v);
            _mm_stream_ps(plane + s + 4, v);
            _mm_stream_ps(plane + s + 8, v);
            _mm_stream_ps(plane + s + 12, v);
          }
          for (; s < S; s += 4) _mm_stream_ps(plane + s, v);
        }
        _mm_sfence();  // each writing thread orders its streaming stores before the region ends
      }
      return;
    }
  }
#endif
  if (!p.channels_last) {
#pragma omp parallel for schedule(static) if (p.batch * C * S > 32768)
    for (int64_t bc = 0; bc < p.batch * C; ++bc) {
      const T v = store<T>(g * dp[bc]);
      T* plane = out + bc * S;
      for (int64_t s = 0; s < S; ++s) plane[s] = v;
    }
  } else {
#pragma omp parallel for schedule(static) if (p.batch * C * S > 32768)
    for (int64_t b = 0; b < p.batch; ++b) {
      std::vector<T> row(static_cast<size_t>(C));
      for (int64_t c = 0; c < C; ++c) row[c] = store<T>(g * dp[b * C + c]);
      T* image = out + b * S * C;
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t c = 0; c < C; ++c) image[s * C + c] = row[c];
      }
    }
  }
}

// Eight lanes of Acc in one value (GCC/Clang vector extension: kept in registers, where an
// array of partial sums ends up on the stack; one AVX register for float, two SSE ones without).
template <typename Acc>
struct Lanes8 {
  typedef Acc type __attribute__((vector_size(8 * sizeof(Acc))));
};

template <typename Acc>
LLKERN_ALWAYS_INLINE inline typename Lanes8<Acc>::type load8(const Acc* p) {
  typename Lanes8<Acc>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename Acc>
LLKERN_ALWAYS_INLINE inline void store8(Acc* p, typename Lanes8<Acc>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// The eight lanes added pairwise (fixed order).
template <typename Acc>
LLKERN_ALWAYS_INLINE inline Acc sum8(typename Lanes8<Acc>::type v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// out[j] = x . w_j for the kDots (1 or 4) rows w_j = w + j C of W: eight lanes per dot, the rows
// sharing the loads of x, kDots independent accumulators hiding the add latency.
template <int kDots, typename Acc>
LLKERN_ALWAYS_INLINE inline void dots(const Acc* x, const Acc* w, int64_t C, Acc* out) {
  static_assert(kDots == 1 || kDots == 4, "dots: 1 or 4 rows");
  using V = typename Lanes8<Acc>::type;
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const V xv = load8(x + c);
    a0 += xv * load8(w + c);
    if constexpr (kDots == 4) {
      a1 += xv * load8(w + C + c);
      a2 += xv * load8(w + 2 * C + c);
      a3 += xv * load8(w + 3 * C + c);
    }
  }
  const V acc[4] = {a0, a1, a2, a3};
  for (int j = 0; j < kDots; ++j) {
    Acc tail = 0;
    for (int64_t t = c; t < C; ++t) tail += x[t] * w[j * C + t];
    out[j] = sum8<Acc>(acc[j]) + tail;
  }
}

// Z (n x K) = X W^T without bias: pairs of rows by four classes, eight independent dot products
// sharing their loads (a dot product alone waits on its own adds); leftovers one row or class at
// a time.
template <typename Acc>
LLKERN_ALWAYS_INLINE inline void block_logits(const Acc* X, const Acc* W, int64_t n, int64_t K, int64_t C,
                                              Acc* Z) {
  using V = typename Lanes8<Acc>::type;
  int64_t r = 0;
  for (; r + 2 <= n; r += 2) {
    const Acc *x0 = X + r * C, *x1 = x0 + C;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const Acc* w = W + k * C;
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        const V u = load8(x0 + c), v = load8(x1 + c);
        const V w0 = load8(w + c), w1 = load8(w + C + c), w2 = load8(w + 2 * C + c), w3 = load8(w + 3 * C + c);
        a0 += u * w0; a1 += u * w1; a2 += u * w2; a3 += u * w3;
        b0 += v * w0; b1 += v * w1; b2 += v * w2; b3 += v * w3;
      }
      // the channel tail summed on its own, then added: the same rounding as dots<>, so a
      // logit does not depend on where its row falls in the block
      Acc t0[4] = {}, t1[4] = {};
      for (; c < C; ++c) {
        for (int j = 0; j < 4; ++j) {
          t0[j] += x0[c] * w[j * C + c];
          t1[j] += x1[c] * w[j * C + c];
        }
      }
      Acc* z0 = Z + r * K + k;
      Acc* z1 = z0 + K;
      z0[0] = sum8<Acc>(a0) + t0[0]; z0[1] = sum8<Acc>(a1) + t0[1];
      z0[2] = sum8<Acc>(a2) + t0[2]; z0[3] = sum8<Acc>(a3) + t0[3];
      z1[0] = sum8<Acc>(b0) + t1[0]; z1[1] = sum8<Acc>(b1) + t1[1];
      z1[2] = sum8<Acc>(b2) + t1[2]; z1[3] = sum8<Acc>(b3) + t1[3];
    }
    for (; k < K; ++k) {
      dots<1>(x0, W + k * C, C, Z + r * K + k);
      dots<1>(x1, W + k * C, C, Z + (r + 1) * K + k);
    }
  }
  for (; r < n; ++r) {
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) dots<4>(X + r * C, W + k * C, C, Z + r * K + k);
    for (; k < K; ++k) dots<1>(X + r * C, W + k * C, C, Z + r * K + k);
  }
}

// d W (K x C) += G^T X over the m rows rows[0..m) of the block (those not ignored: a non-finite
// ignored row must not reach d W through 0 * inf): tiles of two classes by 32 channels held in
// registers across the rows, so d W is read and written once per block, not once per row.
template <typename Acc>
LLKERN_ALWAYS_INLINE inline void add_grad_weight(const Acc* G, const Acc* X, const int32_t* rows, int64_t m,
                                                 int64_t K, int64_t C, Acc* dW) {
  using V = typename Lanes8<Acc>::type;
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    Acc *d0 = dW + k * C, *d1 = d0 + C;
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = rows[i];
        const Acc* x = X + r * C + c;
        const Acc g0 = G[r * K + k], g1 = G[r * K + k + 1];
        const V x0 = load8(x), x1 = load8(x + 8), x2 = load8(x + 16), x3 = load8(x + 24);
        a0 += g0 * x0; a1 += g0 * x1; a2 += g0 * x2; a3 += g0 * x3;
        b0 += g1 * x0; b1 += g1 * x1; b2 += g1 * x2; b3 += g1 * x3;
      }
      store8(d0 + c, load8(d0 + c) + a0); store8(d0 + c + 8, load8(d0 + c + 8) + a1);
      store8(d0 + c + 16, load8(d0 + c + 16) + a2); store8(d0 + c + 24, load8(d0 + c + 24) + a3);
      store8(d1 + c, load8(d1 + c) + b0); store8(d1 + c + 8, load8(d1 + c + 8) + b1);
      store8(d1 + c + 16, load8(d1 + c + 16) + b2); store8(d1 + c + 24, load8(d1 + c + 24) + b3);
    }
    for (; c + 8 <= C; c += 8) {
      V a = {}, b = {};
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = rows[i];
        const V x = load8(X + r * C + c);
        a += G[r * K + k] * x;
        b += G[r * K + k + 1] * x;
      }
      store8(d0 + c, load8(d0 + c) + a);
      store8(d1 + c, load8(d1 + c) + b);
    }
    for (; c < C; ++c) {
      Acc a = 0, b = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t r = rows[i];
        a += G[r * K + k] * X[r * C + c];
        b += G[r * K + k + 1] * X[r * C + c];
      }
      d0[c] += a;
      d1[c] += b;
    }
  }
  for (; k < K; ++k) {  // the last class of an odd count
    Acc* d = dW + k * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      V a = {};
      for (int64_t i = 0; i < m; ++i) a += G[rows[i] * K + k] * load8(X + rows[i] * C + c);
      store8(d + c, load8(d + c) + a);
    }
    for (; c < C; ++c) {
      Acc a = 0;
      for (int64_t i = 0; i < m; ++i) a += G[rows[i] * K + k] * X[rows[i] * C + c];
      d[c] += a;
    }
  }
}

// d X (n x C) = G W, written over d X: tiles of two rows by 32 channels held in registers across
// the classes, each row of W loaded once per pair of rows.
template <typename Acc>
LLKERN_ALWAYS_INLINE inline void write_grad_rows(const Acc* G, const Acc* W, int64_t n, int64_t K, int64_t C,
                                                 Acc* dX) {
  using V = typename Lanes8<Acc>::type;
  int64_t r = 0;
  for (; r + 2 <= n; r += 2) {
    const Acc *g0 = G + r * K, *g1 = g0 + K;
    Acc *o0 = dX + r * C, *o1 = o0 + C;
    int64_t c = 0;
    for (; c + 32 <= C; c += 32) {
      V a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
      for (int64_t k = 0; k < K; ++k) {
        const Acc* w = W + k * C + c;
        const V w0 = load8(w), w1 = load8(w + 8), w2 = load8(w + 16), w3 = load8(w + 24);
        a0 += g0[k] * w0; a1 += g0[k] * w1; a2 += g0[k] * w2; a3 += g0[k] * w3;
        b0 += g1[k] * w0; b1 += g1[k] * w1; b2 += g1[k] * w2; b3 += g1[k] * w3;
      }
      store8(o0 + c, a0); store8(o0 + c + 8, a1); store8(o0 + c + 16, a2); store8(o0 + c + 24, a3);
      store8(o1 + c, b0); store8(o1 + c + 8, b1); store8(o1 + c + 16, b2); store8(o1 + c + 24, b3);
    }
    for (; c + 8 <= C; c += 8) {
      V a = {}, b = {};
      for (int64_t k = 0; k < K; ++k) {
        const V w = load8(W + k * C + c);
        a += g0[k] * w;
        b += g1[k] * w;
      }
      store8(o0 + c, a);
      store8(o1 + c, b);
    }
    for (; c < C; ++c) {
      Acc a = 0, b = 0;
      for (int64_t k = 0; k < K; ++k) {
        a += g0[k] * W[k * C + c];
        b += g1[k] * W[k * C + c];
      }
      o0[c] = a;
      o1[c] = b;
    }
  }
  for (; r < n; ++r) {  // the last row of an odd count
    const Acc* g = G + r * K;
    Acc* o = dX + r * C;
    int64_t c = 0;
    for (; c + 8 <= C; c += 8) {
      V a = {};
      for (int64_t k = 0; k < K; ++k) a += g[k] * load8(W + k * C + c);
      store8(o + c, a);
    }
    for (; c < C; ++c) {
      Acc a = 0;
      for (int64_t k = 0; k < K; ++k) a += g[k] * W[k * C + c];
      o[c] = a;
    }
  }
}

// One block of at most kFusedBlockRows rows of the fused head, in three passes over the block:
// logits as dot products with the rows of W and the softmax from one exp per logit, turned into
// G = d loss / d logits (n x K, in `z`); then d W += G^T X, d b += column sums of G; then
// d X = G W. Ignored rows have G = 0, hence zero gradients. `xbuf` holds the block's rows in Acc
// when T is not Acc (kFusedBlockRows x C), `z` holds kFusedBlockRows x K values.
template <typename T, typename Acc, bool kAvx2 = false>
LLKERN_ALWAYS_INLINE inline void fused_block(const FusedHeadParams& p, int64_t row0, int64_t n, Acc* xbuf, Acc* z,
                                             Acc* dW, Acc* db, double& loss, int64_t& correct) {
  const Acc* W = static_cast<const Acc*>(p.weight);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const int64_t C = p.channels, K = p.classes;
  const Acc eps = Acc(p.label_smoothing), eps_per_class = eps / Acc(K), scale = Acc(p.grad_scale);
  const Acc* X;  // the block's rows, n x C in Acc
  if constexpr (std::is_same_v<T, Acc>) {
    X = static_cast<const T*>(p.rows_data) + row0 * C;
  } else {
    const T* in = static_cast<const T*>(p.rows_data) + row0 * C;
    for (int64_t i = 0; i < n * C; ++i) xbuf[i] = Acc(to_float(in[i]));
    X = xbuf;
  }
  block_logits<Acc>(X, W, n, K, C, z);  // ignored rows too (their logits are dropped below)
  int32_t valid[kFusedBlockRows];  // the block's rows whose target is not ignored
  int64_t m = 0;
  for (int64_t r = 0; r < n; ++r) {
    Acc* zr = z + r * K;
    const int64_t y = p.target[row0 + r];
    if (y == p.ignore_index) {
      for (int64_t k = 0; k < K; ++k) zr[k] = 0;
      continue;
    }
    valid[m++] = int32_t(r);
    int64_t k = 0;
    Acc max = 0, total = 0;
    int64_t argmax = 0;
    for (k = 0; k < K; ++k) {
      const Acc zk = zr[k] + (bias ? bias[k] : Acc(0));
      zr[k] = zk;
      total += zk;
      if (k == 0 || zk > max) {
        max = zk;
        argmax = k;
      }
    }
    const Acc z_true = zr[y];
    Acc sum_exp = 0;
#if defined(LLKERN_X86_CLONES)
    if constexpr (kAvx2) {
      sum_exp = exp_shifted_sum_avx2(zr, K, max);
    } else
#endif
    {
      for (k = 0; k < K; ++k) {
        zr[k] = std::exp(zr[k] - max);
        sum_exp += zr[k];
      }
    }
    const Acc lse = max + std::log(sum_exp);
    loss += double((Acc(1) - eps) * (lse - z_true) + eps * (lse - total / Acc(K)));
    correct += argmax == y;
    if (!p.write_grad) continue;
    const Acc inv = scale / sum_exp;
    for (k = 0; k < K; ++k) zr[k] = zr[k] * inv - scale * eps_per_class;  // z becomes d loss / d z
    zr[y] -= scale * (Acc(1) - eps);
  }
  if (!p.write_grad) return;
  if (db) {
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t k = 0; k < K; ++k) db[k] += z[valid[i] * K + k];
    }
  }
  add_grad_weight<Acc>(z, X, valid, m, K, C, dW);
  Acc* dX = static_cast<Acc*>(p.grad_rows) + row0 * C;
  write_grad_rows<Acc>(z, W, n, K, C, dX);
  if (m < n) {  // ignored rows: exactly zero, whatever W holds
    for (int64_t r = 0; r < n; ++r) {
      if (p.target[row0 + r] == p.ignore_index) std::memset(dX + r * C, 0, sizeof(Acc) * C);
    }
  }
}

template <typename Acc>
using FusedBlockFn = void (*)(const FusedHeadParams&, int64_t, int64_t, Acc*, Acc*, Acc*, Acc*, double&, int64_t&);

template <typename T>
void fused_block_baseline(const FusedHeadParams& p, int64_t row0, int64_t n, typename AccOf<T>::type* xbuf,
                          typename AccOf<T>::type* z, typename AccOf<T>::type* dW, typename AccOf<T>::type* db,
                          double& loss, int64_t& correct) {
  fused_block<T, typename AccOf<T>::type>(p, row0, n, xbuf, z, dW, db, loss, correct);
}

#if defined(LLKERN_X86_CLONES)
// float heads are compute-bound: the block pass for AVX2 + FMA.
__attribute__((target("avx2,fma"))) void fused_block_float_avx2(const FusedHeadParams& p, int64_t row0, int64_t n,
                                                                float* xbuf, float* z, float* dW, float* db,
                                                                double& loss, int64_t& correct) {
  fused_block<float, float, true>(p, row0, n, xbuf, z, dW, db, loss, correct);
}
#endif

template <typename T>
FusedBlockFn<typename AccOf<T>::type> pick_fused_block() {
#if defined(LLKERN_X86_CLONES)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) return &fused_block_float_avx2;
  }
#endif
  return &fused_block_baseline<T>;
}

template <typename T>
void fused_head_typed(const FusedHeadParams& p) {
  using Acc = typename AccOf<T>::type;
  const FusedBlockFn<Acc> block_fn = pick_fused_block<T>();
  const int64_t C = p.channels, K = p.classes;
  const int64_t blocks = (p.rows + kFusedBlockRows - 1) / kFusedBlockRows;
  const int64_t partial = p.write_grad ? K * C + K : 0;
  std::vector<Acc> partials(static_cast<size_t>(blocks * partial), Acc(0));
  std::vector<double> block_loss(static_cast<size_t>(blocks), 0.0);
  std::vector<int64_t> block_correct(static_cast<size_t>(blocks), 0);
  // With fewer blocks than two per thread, some threads would pool nothing: pool first then,
  // over all (b, c) planes in parallel. Either way each plane is summed by the same loop in the
  // same order, so the thread count changes where, not what.
  const bool pool_in_pass = p.pool && blocks >= 2 * int64_t(omp_get_max_threads());
  if (p.pool && !pool_in_pass) pool_cpu(*p.pool);
  const PoolRowsFn pool_fn = pool_in_pass ? pick_pool_rows(p.pool->dtype) : nullptr;
  const int64_t work = p.rows * C * (K + (pool_in_pass ? p.pool->spatial : 0));
#pragma omp parallel if (work > 32768)
  {
    std::vector<Acc> xbuf(std::is_same_v<T, Acc> ? 0 : static_cast<size_t>(kFusedBlockRows * C));
    std::vector<Acc> z(static_cast<size_t>(kFusedBlockRows * K));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      Acc* dW = partials.data() + blk * partial;
      Acc* db = p.write_grad && p.grad_bias ? dW + K * C : nullptr;
      const int64_t row0 = blk * kFusedBlockRows;
      const int64_t n = std::min(p.rows - row0, kFusedBlockRows);
      if (pool_fn) pool_fn(*p.pool, row0, row0 + n);
      block_fn(p, row0, n, xbuf.data(), z.data(), dW, db, block_loss[blk], block_correct[blk]);
    }
  }
  double loss = 0.0;
  int64_t correct = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) {  // in order: deterministic
    loss += block_loss[blk];
    correct += block_correct[blk];
  }
  *p.loss_sum = loss;
  *p.correct = correct;
  if (p.write_grad) {
    Acc* gw = static_cast<Acc*>(p.grad_weight);
    Acc* gb = static_cast<Acc*>(p.grad_bias);
    for (int64_t i = 0; i < K * C; ++i) gw[i] = 0;
    if (gb) {
      for (int64_t k = 0; k < K; ++k) gb[k] = 0;
    }
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const Acc* dW = partials.data() + blk * partial;
      for (int64_t i = 0; i < K * C; ++i) gw[i] += dW[i];
      if (gb) {
        for (int64_t k = 0; k < K; ++k) gb[k] += dW[K * C + k];
      }
    }
  }
}

}  // namespace

void fused_head_cpu(const FusedHeadParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return fused_head_typed<float>(p);
    case ScalarKind::kFloat64: return fused_head_typed<double>(p);
    case ScalarKind::kBFloat16: return fused_head_typed<BF16>(p);
    case ScalarKind::kFloat16: return fused_head_typed<F16>(p);
  }
}

void pool_cpu(const PoolParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return pool_typed<float>(p);
    case ScalarKind::kFloat64: return pool_typed<double>(p);
    case ScalarKind::kBFloat16: return pool_typed<BF16>(p);
    case ScalarKind::kFloat16: return pool_typed<F16>(p);
  }
}

void cross_entropy_rows_cpu(const CrossEntropyRowsParams& p) {
  if (p.is_double) {
    cross_entropy_rows_typed<double>(p);
  } else {
    cross_entropy_rows_typed<float>(p);
  }
}

void broadcast_pooled_grad_cpu(const BroadcastParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return broadcast_typed<float>(p);
    case ScalarKind::kFloat64: return broadcast_typed<double>(p);
    case ScalarKind::kBFloat16: return broadcast_typed<BF16>(p);
    case ScalarKind::kFloat16: return broadcast_typed<F16>(p);
  }
}

}  // namespace llkern
