// CPU kernels of batch_norm_relu / batch_norm_relu_backward. No torch headers: see
// kernels/batch_norm_relu.h.
//
// z = x * scale + shift is formed as a product and a sum rounded separately, as PyTorch's two
// element-wise ops do; this file is compiled without floating-point contraction so that no compiler
// fuses them into one multiply-add and the backward's recomputed mask always equals the forward's.
// The sums of the backward are taken in float lanes per row or plane and added in double in an order
// fixed by the shape: the same input gives the same bits on any number of threads.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "../kernels/batch_norm_relu.h"

#include <algorithm>
#include <vector>

#include "scalar.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace llkern {
namespace {

using cpu::AccOf;
using cpu::store;

constexpr int64_t kRowsPerChunk = 256;  // channels_last reduction: rows per partial sum
constexpr int kLanes = 8;

template <typename Acc>
inline Acc pre_activation(Acc x, Acc scale, Acc shift) {
  const Acc product = x * scale;
  return product + shift;
}

template <typename Acc>
inline Acc relu_keep(Acc z) { return z <= Acc(0) ? Acc(0) : z; }  // NaN passes, as torch.relu

template <typename T>
void forward_typed(const BatchNormReluForwardParams& p) {
  using Acc = typename AccOf<T>::type;
  const BatchNormReluShape& s = p.shape;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const Acc* shift = static_cast<const Acc*>(p.shift);
  if (!s.channels_last) {
    const int64_t planes = s.batch * s.channels;
#pragma omp parallel for schedule(static) if (s.numel() >= (int64_t(1) << 15))
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t c = plane % s.channels;
      const Acc a = scale[c], b = shift[c];
      const T* xp = x + plane * s.inner;
      T* yp = y + plane * s.inner;
      for (int64_t i = 0; i < s.inner; ++i) yp[i] = store<T>(relu_keep(pre_activation(Acc(to_float(xp[i])), a, b)));
    }
  } else {
    const int64_t rows = s.batch * s.inner;
#pragma omp parallel for schedule(static) if (s.numel() >= (int64_t(1) << 15))
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * s.channels;
      T* yr = y + r * s.channels;
      for (int64_t c = 0; c < s.channels; ++c) {
        yr[c] = store<T>(relu_keep(pre_activation(Acc(to_float(xr[c])), scale[c], shift[c])));
      }
    }
  }
}

// The masked gradient g at one element (0 where z <= 0), and its contribution to both sums.
template <typename T, typename Acc>
inline Acc masked_grad(T grad, T x, Acc scale, Acc shift) {
  const Acc z = pre_activation(Acc(to_float(x)), scale, shift);
  return z <= Acc(0) ? Acc(0) : Acc(to_float(grad));
}

// Per-channel sums, NC* layout: each channel's planes in batch order, each plane in kLanes float lanes.
template <typename T>
void sums_planes(const BatchNormReluBackwardParams& p, double* sum_g, double* sum_gx) {
  using Acc = typename AccOf<T>::type;
  const BatchNormReluShape& s = p.shape;
  const T* grad = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const Acc* shift = static_cast<const Acc*>(p.shift);
  const Acc* mean = static_cast<const Acc*>(p.mean);
#pragma omp parallel for schedule(static) if (s.numel() >= (int64_t(1) << 15))
  for (int64_t c = 0; c < s.channels; ++c) {
    const Acc a = scale[c], b = shift[c], m = mean[c];
    double total_g = 0.0, total_gx = 0.0;
    for (int64_t n = 0; n < s.batch; ++n) {
      const T* __restrict__ gp = grad + (n * s.channels + c) * s.inner;
      const T* __restrict__ xp = x + (n * s.channels + c) * s.inner;
      Acc lanes_g[kLanes] = {}, lanes_gx[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= s.inner; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const Acc g = masked_grad(gp[i + l], xp[i + l], a, b);
          lanes_g[l] += g;
          lanes_gx[l] += g * (Acc(to_float(xp[i + l])) - m);
        }
      }
      for (int l = 0; i < s.inner; ++i, ++l) {
        const Acc g = masked_grad(gp[i], xp[i], a, b);
        lanes_g[l] += g;
        lanes_gx[l] += g * (Acc(to_float(xp[i])) - m);
      }
      for (int l = 0; l < kLanes; ++l) {
        total_g += double(lanes_g[l]);
        total_gx += double(lanes_gx[l]);
      }
    }
    sum_g[c] = total_g;
    sum_gx[c] = total_gx;
  }
}

// Per-channel sums, channels_last layout: fixed chunks of rows, each summed per channel in float, the
// chunk partials added in chunk order in double.
template <typename T>
void sums_rows(const BatchNormReluBackwardParams& p, double* sum_g, double* sum_gx) {
  using Acc = typename AccOf<T>::type;
  const BatchNormReluShape& s = p.shape;
  const T* grad = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const Acc* shift = static_cast<const Acc*>(p.shift);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const int64_t rows = s.batch * s.inner, C = s.channels;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  std::vector<double> partial(size_t(chunks * 2 * C));
#pragma omp parallel if (s.numel() >= (int64_t(1) << 15))
  {
    std::vector<Acc> acc_g(static_cast<size_t>(C)), acc_gx(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      std::fill(acc_g.begin(), acc_g.end(), Acc(0));
      std::fill(acc_gx.begin(), acc_gx.end(), Acc(0));
      const int64_t end = (chunk + 1) * kRowsPerChunk < rows ? (chunk + 1) * kRowsPerChunk : rows;
      for (int64_t r = chunk * kRowsPerChunk; r < end; ++r) {
        const T* gr = grad + r * C;
        const T* xr = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const Acc g = masked_grad(gr[c], xr[c], scale[c], shift[c]);
          acc_g[size_t(c)] += g;
          acc_gx[size_t(c)] += g * (Acc(to_float(xr[c])) - mean[c]);
        }
      }
      double* out = partial.data() + chunk * 2 * C;
      for (int64_t c = 0; c < C; ++c) {
        out[c] = double(acc_g[size_t(c)]);
        out[C + c] = double(acc_gx[size_t(c)]);
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) sum_g[c] = sum_gx[c] = 0.0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const double* in = partial.data() + chunk * 2 * C;
    for (int64_t c = 0; c < C; ++c) {
      sum_g[c] += in[c];
      sum_gx[c] += in[C + c];
    }
  }
}

// grad_x over a run of n elements of one channel, the coefficients in registers.
template <typename T, typename Acc = typename AccOf<T>::type>
inline void grad_x_run(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x, int64_t n,
                       Acc scale, Acc shift, Acc mean, Acc mean_g, Acc k, bool training) {
  if (!training) {  // eval: the statistics are constants (and a NaN input must not leak through 0 * NaN)
    for (int64_t i = 0; i < n; ++i) grad_x[i] = store<T>(scale * masked_grad(grad[i], x[i], scale, shift));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const Acc g = masked_grad(grad[i], x[i], scale, shift);
    grad_x[i] = store<T>(scale * (g - mean_g - (Acc(to_float(x[i])) - mean) * k));
  }
}

template <typename T>
void backward_typed(const BatchNormReluBackwardParams& p) {
  using Acc = typename AccOf<T>::type;
  const BatchNormReluShape& s = p.shape;
  const int64_t C = s.channels;
  const Acc* scale = static_cast<const Acc*>(p.scale);
  const Acc* shift = static_cast<const Acc*>(p.shift);
  const Acc* mean = static_cast<const Acc*>(p.mean);
  const Acc* invstd = static_cast<const Acc*>(p.invstd);
  // grad_x = scale * (g - mean_g - (x - mean) * k) with k = invstd^2 * sum(g (x - mean)) / M: the
  // statistics' share of the gradient (zero in eval mode).
  std::vector<Acc> mean_g(static_cast<size_t>(C), Acc(0)), k(static_cast<size_t>(C), Acc(0));
  if (p.sum_grad != nullptr) {
    std::vector<double> sum_g(static_cast<size_t>(C)), sum_gx(static_cast<size_t>(C));
    if (s.channels_last) {
      sums_rows<T>(p, sum_g.data(), sum_gx.data());
    } else {
      sums_planes<T>(p, sum_g.data(), sum_gx.data());
    }
    const double count = double(s.batch * s.inner);
    Acc* out_g = static_cast<Acc*>(p.sum_grad);
    Acc* out_gxhat = static_cast<Acc*>(p.sum_grad_xhat);
    for (int64_t c = 0; c < C; ++c) {
      out_g[c] = Acc(sum_g[size_t(c)]);
      out_gxhat[c] = Acc(sum_gx[size_t(c)] * double(invstd[c]));
      if (p.training) {
        mean_g[size_t(c)] = Acc(sum_g[size_t(c)] / count);
        k[size_t(c)] = Acc(sum_gx[size_t(c)] * double(invstd[c]) * double(invstd[c]) / count);
      }
    }
  }
  if (p.grad_x == nullptr) return;
  const T* grad = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  T* grad_x = static_cast<T*>(p.grad_x);
  if (!s.channels_last) {
    const int64_t planes = s.batch * C;
#pragma omp parallel for schedule(static) if (s.numel() >= (int64_t(1) << 15))
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t c = plane % C;
      const int64_t offset = plane * s.inner;
      grad_x_run<T>(grad + offset, x + offset, grad_x + offset, s.inner, scale[c], shift[c], mean[c],
                    mean_g[size_t(c)], k[size_t(c)], p.training);
    }
  } else {
    const int64_t rows = s.batch * s.inner;
#pragma omp parallel for schedule(static) if (s.numel() >= (int64_t(1) << 15))
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        grad_x_run<T>(grad + r * C + c, x + r * C + c, grad_x + r * C + c, 1, scale[c], shift[c], mean[c],
                      mean_g[size_t(c)], k[size_t(c)], p.training);
      }
    }
  }
}

}  // namespace

void batch_norm_relu_forward_cpu(const BatchNormReluForwardParams& p) {
  switch (p.shape.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p);
    case ScalarKind::kFloat64: return forward_typed<double>(p);
    case ScalarKind::kBFloat16: return forward_typed<BF16>(p);
    case ScalarKind::kFloat16: return forward_typed<F16>(p);
  }
}

void batch_norm_relu_backward_cpu(const BatchNormReluBackwardParams& p) {
  switch (p.shape.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p);
    case ScalarKind::kFloat64: return backward_typed<double>(p);
    case ScalarKind::kBFloat16: return backward_typed<BF16>(p);
    case ScalarKind::kFloat16: return backward_typed<F16>(p);
  }
}

}  // namespace llkern
