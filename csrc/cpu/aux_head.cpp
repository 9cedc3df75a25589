// CPU kernels of the fused auxiliary head. No torch headers: see kernels/aux_head.h.
#include "../kernels/aux_head.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "scalar.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llkern {
namespace {

using cpu::AccOf;
using cpu::store;

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

template <typename T>
void pool_typed(const PoolParams& p) {
  using Acc = typename AccOf<T>::type;
  const T* in = static_cast<const T*>(p.features);
  Acc* out = static_cast<Acc*>(p.pooled);
  const int64_t C = p.channels, S = p.spatial;
  const Acc inv = Acc(1) / Acc(S);
  if (!p.channels_last) {
    // Each (b, c) plane is S contiguous values.
#pragma omp parallel for schedule(static) if (p.batch * C * S > 32768)
    for (int64_t bc = 0; bc < p.batch * C; ++bc) {
      out[bc] = sum_values<T, Acc>(in + bc * S, S) * inv;
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

template <typename T>
void fused_head_typed(const FusedHeadParams& p) {
  using Acc = typename AccOf<T>::type;
  const T* in = static_cast<const T*>(p.rows_data);
  const Acc* W = static_cast<const Acc*>(p.weight);
  const Acc* Wt = static_cast<const Acc*>(p.weight_t);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const int64_t C = p.channels, K = p.classes;
  const Acc eps = Acc(p.label_smoothing), eps_per_class = eps / Acc(K), scale = Acc(p.grad_scale);
  const int64_t blocks = (p.rows + kFusedBlockRows - 1) / kFusedBlockRows;
  const int64_t partial = p.write_grad ? K * C + K : 0;
  std::vector<Acc> partials(static_cast<size_t>(blocks * partial), Acc(0));
  std::vector<double> block_loss(static_cast<size_t>(blocks), 0.0);
  std::vector<int64_t> block_correct(static_cast<size_t>(blocks), 0);
  Acc* grad_rows = static_cast<Acc*>(p.grad_rows);
#pragma omp parallel if (p.rows * C * K > 32768)
  {
    std::vector<Acc> x(static_cast<size_t>(C)), z(static_cast<size_t>(K));
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      Acc* dW = partials.data() + blk * partial;
      Acc* db = dW + K * C;
      double loss = 0.0;
      int64_t correct = 0;
      const int64_t end = std::min(p.rows, (blk + 1) * kFusedBlockRows);
      for (int64_t row = blk * kFusedBlockRows; row < end; ++row) {
        const int64_t y = p.target[row];
        if (y == p.ignore_index) {
          if (p.write_grad) {
            for (int64_t c = 0; c < C; ++c) grad_rows[row * C + c] = 0;
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) x[c] = Acc(to_float(in[row * C + c]));
        // z = W x + b with the classes innermost: K independent sums that vectorise, where a
        // dot product per class would be one serial chain of C additions.
        for (int64_t k = 0; k < K; ++k) z[k] = bias ? bias[k] : Acc(0);
        for (int64_t c = 0; c < C; ++c) {
          const Acc xc = x[c];
          const Acc* wt = Wt + c * K;
          for (int64_t k = 0; k < K; ++k) z[k] += wt[k] * xc;
        }
        Acc max = z[0], total = 0;
        int64_t argmax = 0;
        for (int64_t k = 0; k < K; ++k) {
          total += z[k];
          if (z[k] > max) { max = z[k]; argmax = k; }
        }
        Acc sum_exp = 0;
        for (int64_t k = 0; k < K; ++k) sum_exp += std::exp(z[k] - max);
        const Acc lse = max + std::log(sum_exp);
        loss += double((Acc(1) - eps) * (lse - z[y]) + eps * (lse - total / Acc(K)));
        correct += argmax == y;
        if (!p.write_grad) continue;
        Acc* dx = grad_rows + row * C;
        for (int64_t c = 0; c < C; ++c) dx[c] = 0;
        for (int64_t k = 0; k < K; ++k) {
          Acc g = std::exp(z[k] - lse) - eps_per_class;
          if (k == y) g -= Acc(1) - eps;
          g *= scale;
          const Acc* w = W + k * C;
          Acc* dw = dW + k * C;
          for (int64_t c = 0; c < C; ++c) {
            dx[c] += g * w[c];
            dw[c] += g * x[c];
          }
          db[k] += g;
        }
      }
      block_loss[blk] = loss;
      block_correct[blk] = correct;
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
