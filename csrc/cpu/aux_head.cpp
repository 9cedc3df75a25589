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
      a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
      a1 = _mm256_add_ps(a1, _mm256_loadu_ps(v + i + 8));
    }
    if (i < S) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(v + i));
    out[bc] = hsum_avx2(_mm256_add_ps(a0, a1)) * inv;
  }
}

#endif

template <typename T>
void pool_typed(const PoolParams& p) {
  using Acc = typename AccOf<T>::type;
  const T* in = static_cast<const T*>(p.features);
  Acc* out = static_cast<Acc*>(p.pooled);
  const int64_t C = p.channels, S = p.spatial;
  const Acc inv = Acc(1) / Acc(S);
  if (!p.channels_last) {
    // Each (b, c) plane is S contiguous values; each thread takes one range of planes.
    const int64_t planes = p.batch * C;
#pragma omp parallel if (planes * S > 32768)
    {
      const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t begin = planes * id / threads, end = planes * (id + 1) / threads;
      bool done = false;
#if defined(LLKERN_X86_CLONES)
      if constexpr (std::is_same_v<T, float>) {
        if (S % 8 == 0 && cpu_has_avx2_fma()) {
          pool_planes_float_avx2(in, out, begin, end, S, inv);
          done = true;
        }
      }
#endif
      if (!done) {
        for (int64_t bc = begin; bc < end; ++bc) out[bc] = sum_values<T, Acc>(in + bc * S, S) * inv;
      }
    }
  } else {
    // (b, s, c): add the S rows of C channels of each image.
#pragma omp parallel for schedule(static) if (p.batch * C * S > 32768)
    for (int64_t b = 0; b < p.batch; ++b) {
      Acc* row = out + b * C;
      for (int64_t c = 0; c < C; ++c) row[c] = 0;
      const T* image = in + b * S * C;
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t c = 0; c < C; ++c) row[c] += Acc(to_float(image[s * C + c]));
      }
      for (int64_t c = 0; c < C; ++c) row[c] *= inv;
    }
  }
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
          for (int64_t s = 0; s < S; s += 4) _mm_stream_ps(plane + s, v);
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

// One block of at most kFusedBlockRows rows of the fused head, row by row: logits as dot
// products with the rows of W, the softmax from one exp per logit, then d x and the block's
// d W, d b as axpys along the channels (contiguous, vectorised). `z` holds `classes` values,
// `xbuf` one row in Acc.
template <typename T, typename Acc, bool kAvx2 = false>
LLKERN_ALWAYS_INLINE inline void fused_block(const FusedHeadParams& p, int64_t row0, int64_t n, Acc* xbuf, Acc* z,
                                             Acc* dW, Acc* db, double& loss, int64_t& correct) {
  const Acc* W = static_cast<const Acc*>(p.weight);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const int64_t C = p.channels, K = p.classes;
  const Acc eps = Acc(p.label_smoothing), eps_per_class = eps / Acc(K), scale = Acc(p.grad_scale);
  Acc* grad_rows = static_cast<Acc*>(p.grad_rows);
  for (int64_t row = row0; row < row0 + n; ++row) {
    const int64_t y = p.target[row];
    if (y == p.ignore_index) {
      if (p.write_grad) {
        for (int64_t c = 0; c < C; ++c) grad_rows[row * C + c] = 0;
      }
      continue;
    }
    const Acc* x;
    if constexpr (std::is_same_v<T, Acc>) {
      x = static_cast<const T*>(p.rows_data) + row * C;
    } else {
      const T* in = static_cast<const T*>(p.rows_data) + row * C;
      for (int64_t c = 0; c < C; ++c) xbuf[c] = Acc(to_float(in[c]));
      x = xbuf;
    }
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) dots<4>(x, W + k * C, C, z + k);
    for (; k < K; ++k) dots<1>(x, W + k * C, C, z + k);
    Acc max = 0, total = 0;
    int64_t argmax = 0;
    for (k = 0; k < K; ++k) {
      const Acc zk = z[k] + (bias ? bias[k] : Acc(0));
      z[k] = zk;
      total += zk;
      if (k == 0 || zk > max) {
        max = zk;
        argmax = k;
      }
    }
    const Acc z_true = z[y];
    Acc sum_exp = 0;
#if defined(LLKERN_X86_CLONES)
    if constexpr (kAvx2) {
      sum_exp = exp_shifted_sum_avx2(z, K, max);
    } else
#endif
    {
      for (k = 0; k < K; ++k) {
        z[k] = std::exp(z[k] - max);
        sum_exp += z[k];
      }
    }
    const Acc lse = max + std::log(sum_exp);
    loss += double((Acc(1) - eps) * (lse - z_true) + eps * (lse - total / Acc(K)));
    correct += argmax == y;
    if (!p.write_grad) continue;
    Acc* dx = grad_rows + row * C;
    for (int64_t c = 0; c < C; ++c) dx[c] = 0;
    const Acc inv = scale / sum_exp;
    for (k = 0; k < K; ++k) z[k] = z[k] * inv - scale * eps_per_class;  // z becomes d loss / d z
    z[y] -= scale * (Acc(1) - eps);
    if (db) {
      for (k = 0; k < K; ++k) db[k] += z[k];
    }
    // Four classes per sweep over the channels: one load and store of d x per four rows of W.
    // Written in vector lanes: the compiler will not vectorise six possibly aliasing pointers.
    using V = typename Lanes8<Acc>::type;
    for (k = 0; k + 4 <= K; k += 4) {
      const Acc g0 = z[k], g1 = z[k + 1], g2 = z[k + 2], g3 = z[k + 3];
      const Acc *w0 = W + k * C, *w1 = w0 + C, *w2 = w1 + C, *w3 = w2 + C;
      Acc *d0 = dW + k * C, *d1 = d0 + C, *d2 = d1 + C, *d3 = d2 + C;
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        const V xv = load8(x + c);
        store8(dx + c, load8(dx + c) + ((g0 * load8(w0 + c) + g1 * load8(w1 + c)) +
                                        (g2 * load8(w2 + c) + g3 * load8(w3 + c))));
        store8(d0 + c, load8(d0 + c) + g0 * xv);
        store8(d1 + c, load8(d1 + c) + g1 * xv);
        store8(d2 + c, load8(d2 + c) + g2 * xv);
        store8(d3 + c, load8(d3 + c) + g3 * xv);
      }
      for (; c < C; ++c) {
        dx[c] += (g0 * w0[c] + g1 * w1[c]) + (g2 * w2[c] + g3 * w3[c]);
        d0[c] += g0 * x[c];
        d1[c] += g1 * x[c];
        d2[c] += g2 * x[c];
        d3[c] += g3 * x[c];
      }
    }
    for (; k < K; ++k) {
      const Acc g = z[k];
      const Acc* w = W + k * C;
      Acc* dw = dW + k * C;
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        store8(dx + c, load8(dx + c) + g * load8(w + c));
        store8(dw + c, load8(dw + c) + g * load8(x + c));
      }
      for (; c < C; ++c) {
        dx[c] += g * w[c];
        dw[c] += g * x[c];
      }
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
#pragma omp parallel if (p.rows * C * K > 32768)
  {
    std::vector<Acc> xbuf(static_cast<size_t>(C)), z(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      Acc* dW = partials.data() + blk * partial;
      Acc* db = p.write_grad && p.grad_bias ? dW + K * C : nullptr;
      const int64_t row0 = blk * kFusedBlockRows;
      const int64_t n = std::min(p.rows - row0, kFusedBlockRows);
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
