// CPU kernels of the transport penalty. No torch headers: see kernels/transport.h.
//
// The forward cuts the input into fixed chunks (independent of the thread
// count), sums each chunk in kLanes independent float lanes (which the
// compiler vectorises) and adds the chunk sums in order in double, so the same
// input gives the same bits on any number of threads.
#include "../kernels/transport.h"

#include <vector>

#include "scalar.h"

namespace llkern {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int kLanes = 16;

using cpu::AccOf;
using cpu::store;

// Sum of r^2 over one chunk; with kGrad also writes dy = g * r in the same pass.
template <typename T, bool kHasX, bool kGrad>
double chunk_sum_of_squares(const T* y, const T* x, T* dy, int64_t n, typename AccOf<T>::type g) {
  using Acc = typename AccOf<T>::type;
  Acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      Acc r = Acc(to_float(y[i + l]));
      if (kHasX) r -= Acc(to_float(x[i + l]));
      lanes[l] += r * r;
      if (kGrad) dy[i + l] = store<T>(g * r);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    Acc r = Acc(to_float(y[i]));
    if (kHasX) r -= Acc(to_float(x[i]));
    lanes[l] += r * r;
    if (kGrad) dy[i] = store<T>(g * r);
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += double(lanes[l]);
  return total;
}

template <typename T, bool kHasX, bool kGrad>
double sum_of_squares(const T* y, const T* x, T* dy, int64_t n, typename AccOf<T>::type g) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t len = (n - begin) < kChunk ? (n - begin) : kChunk;
    partial[c] = chunk_sum_of_squares<T, kHasX, kGrad>(y + begin, kHasX ? x + begin : nullptr,
                                                       kGrad ? dy + begin : nullptr, len, g);
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

template <typename T>
void forward_typed(const TransportForwardParams& p) {
  using Acc = typename AccOf<T>::type;
  const T* y = static_cast<const T*>(p.y);
  const T* x = static_cast<const T*>(p.x);
  T* dy = static_cast<T*>(p.grad_y);
  const Acc g = Acc(p.grad_scale);
  double s;
  if (x) {
    s = dy ? sum_of_squares<T, true, true>(y, x, dy, p.numel, g) : sum_of_squares<T, true, false>(y, x, dy, p.numel, g);
  } else {
    s = dy ? sum_of_squares<T, false, true>(y, x, dy, p.numel, g)
           : sum_of_squares<T, false, false>(y, x, dy, p.numel, g);
  }
  if (p.dtype == ScalarKind::kFloat64) {
    *static_cast<double*>(p.loss) = p.scale * s;
  } else {
    *static_cast<float*>(p.loss) = float(p.scale * s);
  }
}

template <typename T, bool kHasX>
void backward_loop(const T* y, const T* x, T* dy, int64_t n, typename AccOf<T>::type g) {
  using Acc = typename AccOf<T>::type;
#pragma omp parallel for schedule(static) if (n > 4 * kChunk)
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t end = (c + kChunk) < n ? (c + kChunk) : n;
    for (int64_t i = c; i < end; ++i) {
      Acc r = Acc(to_float(y[i]));
      if (kHasX) r -= Acc(to_float(x[i]));
      dy[i] = store<T>(g * r);
    }
  }
}

template <typename T>
void backward_typed(const TransportBackwardParams& p) {
  using Acc = typename AccOf<T>::type;
  const double grad_loss = p.dtype == ScalarKind::kFloat64 ? *static_cast<const double*>(p.grad_loss)
                                                          : double(*static_cast<const float*>(p.grad_loss));
  const Acc g = Acc(grad_loss * p.grad_scale);
  const T* y = static_cast<const T*>(p.y);
  const T* x = static_cast<const T*>(p.x);
  T* dy = static_cast<T*>(p.grad_y);
  if (x) {
    backward_loop<T, true>(y, x, dy, p.numel, g);
  } else {
    backward_loop<T, false>(y, nullptr, dy, p.numel, g);
  }
}

}  // namespace

void transport_forward_cpu(const TransportForwardParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p);
    case ScalarKind::kFloat64: return forward_typed<double>(p);
    case ScalarKind::kBFloat16: return forward_typed<BF16>(p);
    case ScalarKind::kFloat16: return forward_typed<F16>(p);
  }
}

void transport_backward_cpu(const TransportBackwardParams& p) {
  switch (p.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p);
    case ScalarKind::kFloat64: return backward_typed<double>(p);
    case ScalarKind::kBFloat16: return backward_typed<BF16>(p);
    case ScalarKind::kFloat16: return backward_typed<F16>(p);
  }
}

}  // namespace llkern
