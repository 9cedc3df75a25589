// CPU kernels of the fused auxiliary head. No torch headers: see kernels/aux_head.h.
#include "../kernels/aux_head.h"

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace llkern {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T, typename Acc>
inline T store(Acc v) {
  if constexpr (sizeof(T) == sizeof(Acc)) {
    return T(v);
  } else {
    return from_float<T>(float(v));
  }
}

// Sum of n values in kLanes independent partial sums (vectorisable, fixed order).
template <typename T, typename Acc>
inline Acc sum_values(const T* v, int64_t n) {
  constexpr int kLanes = 16;
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += Acc(to_float(v[i + l]));
  }
  for (int l = 0; i < n; ++i, ++l) lanes[l] += Acc(to_float(v[i]));
  Acc total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
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

}  // namespace

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
