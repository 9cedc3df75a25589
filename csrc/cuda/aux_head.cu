// CUDA kernels of the fused auxiliary head. No torch headers: see kernels/aux_head.h.
//
// pool: one warp per (b, c) plane (NCHW) or one thread per (b, c) (channels_last, coalesced over c).
// cross-entropy rows: one warp per row; pass 1 finds max / first argmax / sum of logits, pass 2
// the sum of exponentials, pass 3 writes the gradient over the logits. Per-row losses go to an
// array that one block adds up in a fixed order (bitwise reproducible).
// broadcast: one thread per element of d features.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "scalar.cuh"

#include "../kernels/aux_head.h"
#include "../kernels/fast_divmod.h"

namespace llkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using cuda::Acc;
using cuda::load_f;
using cuda::store_f;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  return static_cast<unsigned>(blocks);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_nchw(const T* __restrict__ in, int64_t planes, int64_t spatial, typename Acc<T>::type* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x % 32;
  for (int64_t plane = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; plane < planes;
       plane += int64_t(gridDim.x) * kWarps) {
    const T* values = in + plane * spatial;
    A sum = 0;
    for (int64_t s = lane; s < spatial; s += 32) sum += A(load_f(values[s]));
    sum = warp_sum(sum);
    if (lane == 0) out[plane] = sum / A(spatial);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pool_nhwc(const T* __restrict__ in, int64_t batch, int64_t channels, int64_t spatial,
              typename Acc<T>::type* __restrict__ out) {
  using A = typename Acc<T>::type;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < batch * channels;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t b = i / channels, c = i % channels;
    const T* image = in + b * spatial * channels + c;
    A sum = 0;
    for (int64_t s = 0; s < spatial; ++s) sum += A(load_f(image[s * channels]));
    out[i] = sum / A(spatial);
  }
}

__global__ void count_targets(const int64_t* __restrict__ target, int64_t n, int64_t classes, int64_t ignore_index,
                              unsigned long long* __restrict__ counts) {
  unsigned long long valid = 0, invalid = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = target[i];
    if (y != ignore_index) {
      ++valid;
      if (y < 0 || y >= classes) ++invalid;
    }
  }
  valid = warp_sum(valid);
  invalid = warp_sum(invalid);
  if (threadIdx.x % 32 == 0) {  // integer atomics: order-independent, so still deterministic
    atomicAdd(&counts[0], valid);
    atomicAdd(&counts[1], invalid);
  }
}

template <typename A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000LL); }

// "mean": 1 / the number of non-ignored targets (counts[0], on the device), as the CPU forms it in double.
__device__ __forceinline__ double mean_scale(const unsigned long long* counts, bool mean) {
  const unsigned long long valid = counts[0];
  return mean ? 1.0 / double(valid > 0 ? valid : 1) : 1.0;
}

// T: the logits' storage (A, or bfloat16 for the low-memory head: read and rewritten as bfloat16, every
// step computed in float).
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows(T* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows, int64_t classes,
                       int64_t ignore_index, A eps, const unsigned long long* __restrict__ counts, bool mean,
                       bool write_grad, A* __restrict__ row_loss, int32_t* __restrict__ row_correct) {
  const int lane = threadIdx.x % 32;
  const A scale = A(mean_scale(counts, mean));
  for (int64_t row = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; row < rows;
       row += int64_t(gridDim.x) * kWarps) {
    T* z = logits + row * classes;
    const int64_t y = target[row];
    if (y == ignore_index) {
      if (write_grad) {
        for (int64_t k = lane; k < classes; k += 32) z[k] = store_f<T>(A(0));
      }
      if (lane == 0) {
        row_loss[row] = A(0);
        row_correct[row] = 0;
      }
      continue;
    }
    if (y < 0 || y >= classes) {  // unchecked on the host (no sync): poison the row, never read z[y]
      if (write_grad) {
        for (int64_t k = lane; k < classes; k += 32) z[k] = store_f<T>(quiet_nan<A>());
      }
      if (lane == 0) {
        row_loss[row] = quiet_nan<A>();
        row_correct[row] = 0;
      }
      continue;
    }
    // Pass 1: max, its first index, and the sum of the logits. (A NaN logit gives a NaN loss;
    // the comparisons skip it for the argmax, where torch.argmax would pick it.)
    A max = load_f(z[0]);
    int64_t argmax = 0;
    A total = 0;
    for (int64_t k = lane; k < classes; k += 32) {
      const A v = load_f(z[k]);
      if (v > max || (v == max && k < argmax)) {
        max = v;
        argmax = k;
      }
      total += v;
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      const A other_max = __shfl_xor_sync(0xffffffffu, max, offset);
      const int64_t other_arg = __shfl_xor_sync(0xffffffffu, argmax, offset);
      if (other_max > max || (other_max == max && other_arg < argmax)) {
        max = other_max;
        argmax = other_arg;
      }
    }
    total = warp_sum(total);
    // Pass 2: the sum of exponentials.
    A sum_exp = 0;
    for (int64_t k = lane; k < classes; k += 32) sum_exp += exp(load_f(z[k]) - max);
    sum_exp = warp_sum(sum_exp);
    const A lse = max + log(sum_exp);
    const A z_y = load_f(z[y]);
    if (lane == 0) {
      row_loss[row] = (A(1) - eps) * (lse - z_y) + eps * (lse - total / A(classes));
      row_correct[row] = argmax == y;
    }
    // Pass 3: d loss / d logits over the logits. Every lane has read z[y] above; the warp
    // synchronises so that no lane overwrites it first.
    __syncwarp();
    if (write_grad) {
      const A eps_per_class = eps / A(classes);
      for (int64_t k = lane; k < classes; k += 32) {
        A g = exp(load_f(z[k]) - lse) - eps_per_class;
        if (k == y) g -= A(1) - eps;
        z[k] = store_f<T>(scale * g);
      }
    }
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    finish(const A* __restrict__ row_loss, const int32_t* __restrict__ row_correct, int64_t rows,
           const unsigned long long* __restrict__ counts, bool mean, A* __restrict__ loss,
           int64_t* __restrict__ correct) {
  __shared__ double loss_parts[kWarps];
  __shared__ long long correct_parts[kWarps];
  double l = 0.0;
  long long c = 0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
    l += double(row_loss[i]);
    c += row_correct[i];
  }
  l = warp_sum(l);
  c = warp_sum(c);
  if (threadIdx.x % 32 == 0) {
    loss_parts[threadIdx.x / 32] = l;
    correct_parts[threadIdx.x / 32] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long count = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += loss_parts[w];
      count += correct_parts[w];
    }
    const double scale = counts[0] == 0 ? 0.0 : mean_scale(counts, mean);  // all ignored: loss 0, not NaN
    *loss = A(scale * total);
    *correct = count;
  }
}

// Element i of d features reads grad_pooled[b·C + c]: NCHW i = (b·C + c)·HW + s, so b·C + c = i / HW;
// NHWC i = (b·HW + s)·C + c, so b·C + c = (i / (HW·C))·C + i % C.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    broadcast(const typename Acc<T>::type* __restrict__ grad_pooled, const typename Acc<T>::type* __restrict__ grad_loss,
              double scale, T* __restrict__ out, int64_t batch, int64_t channels, int64_t spatial, bool channels_last) {
  using A = typename Acc<T>::type;
  const A g = A(double(*grad_loss) * scale);
  const int64_t n = batch * channels * spatial;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t bc = channels_last ? (i / (spatial * channels)) * channels + i % channels : i / spatial;
    out[i] = store_f<T>(g * grad_pooled[bc]);
  }
}

// The same below 2^31 elements (every realistic feature map): 32-bit indices, and the divisions by HW
// (NCHW) or HW·C and C (NHWC) fixed at launch as multiply-shifts instead of 64-bit divisions per element.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    broadcast32(const typename Acc<T>::type* __restrict__ grad_pooled, const typename Acc<T>::type* __restrict__ grad_loss,
                double scale, T* __restrict__ out, uint32_t n, FastDivmod outer, FastDivmod inner, bool channels_last) {
  using A = typename Acc<T>::type;
  const A g = A(double(*grad_loss) * scale);
  const uint32_t stride = gridDim.x * kThreads;
  for (uint32_t i = blockIdx.x * kThreads + threadIdx.x; i < n; i += stride) {
    uint32_t bc;
    if (channels_last) {
      uint32_t c, unused;
      inner.divmod(i, unused, c);
      bc = outer.div(i) * inner.divisor + c;
    } else {
      bc = outer.div(i);
    }
    out[i] = store_f<T>(g * grad_pooled[bc]);
  }
}

template <typename T>
void pool_typed(const PoolParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const T* in = static_cast<const T*>(p.features);
  A* out = static_cast<A*>(p.pooled);
  if (p.channels_last) {
    pool_nhwc<T><<<blocks_for(p.batch * p.channels, kThreads), kThreads, 0, stream>>>(in, p.batch, p.channels,
                                                                                      p.spatial, out);
  } else {
    pool_nchw<T><<<blocks_for(p.batch * p.channels, kWarps), kThreads, 0, stream>>>(in, p.batch * p.channels,
                                                                                    p.spatial, out);
  }
}

template <typename T>
void broadcast_typed(const BroadcastParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t n = p.batch * p.channels * p.spatial;
  // (i + the grid's stride stays below 2^32 when n < 2^31: blocks_for caps the grid far below 2^31 threads)
  if (n < (int64_t(1) << 31)) {
    const FastDivmod outer(uint32_t(p.channels_last ? p.spatial * p.channels : p.spatial));
    const FastDivmod inner(uint32_t(p.channels));
    broadcast32<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const A*>(p.grad_pooled), static_cast<const A*>(p.grad_loss), p.scale,
        static_cast<T*>(p.grad_features), uint32_t(n), outer, inner, p.channels_last);
    return;
  }
  broadcast<T><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
      static_cast<const A*>(p.grad_pooled), static_cast<const A*>(p.grad_loss), p.scale,
      static_cast<T*>(p.grad_features), p.batch, p.channels, p.spatial, p.channels_last);
}

}  // namespace

void pool_cuda(const PoolParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return pool_typed<float>(p, s);
    case ScalarKind::kFloat64: return pool_typed<double>(p, s);
    case ScalarKind::kBFloat16: return pool_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return pool_typed<__half>(p, s);
  }
}

void count_targets_cuda(const CountTargetsParams& p, void* stream) {
  count_targets<<<blocks_for(p.n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      p.target, p.n, p.classes, p.ignore_index, reinterpret_cast<unsigned long long*>(p.counts));
}

void cross_entropy_rows_cuda(const CrossEntropyRowsParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(p.rows, kWarps);
  const auto* counts = reinterpret_cast<const unsigned long long*>(p.counts);
  if (p.is_double) {
    cross_entropy_rows<double, double><<<blocks, kThreads, 0, s>>>(
        static_cast<double*>(p.logits), p.target, p.rows, p.classes, p.ignore_index, p.label_smoothing,
        counts, p.mean, p.write_grad, static_cast<double*>(p.row_loss), p.row_correct);
  } else if (p.bfloat16_logits) {
    cross_entropy_rows<__nv_bfloat16, float><<<blocks, kThreads, 0, s>>>(
        static_cast<__nv_bfloat16*>(p.logits), p.target, p.rows, p.classes, p.ignore_index,
        float(p.label_smoothing), counts, p.mean, p.write_grad, static_cast<float*>(p.row_loss), p.row_correct);
  } else {
    cross_entropy_rows<float, float><<<blocks, kThreads, 0, s>>>(
        static_cast<float*>(p.logits), p.target, p.rows, p.classes, p.ignore_index, float(p.label_smoothing),
        counts, p.mean, p.write_grad, static_cast<float*>(p.row_loss), p.row_correct);
  }
}

void finish_cross_entropy_cuda(const FinishParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const auto* counts = reinterpret_cast<const unsigned long long*>(p.counts);
  if (p.is_double) {
    finish<double><<<1, kThreads, 0, s>>>(static_cast<const double*>(p.row_loss), p.row_correct, p.rows, counts,
                                          p.mean, static_cast<double*>(p.loss), p.correct);
  } else {
    finish<float><<<1, kThreads, 0, s>>>(static_cast<const float*>(p.row_loss), p.row_correct, p.rows, counts,
                                         p.mean, static_cast<float*>(p.loss), p.correct);
  }
}

void broadcast_pooled_grad_cuda(const BroadcastParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return broadcast_typed<float>(p, s);
    case ScalarKind::kFloat64: return broadcast_typed<double>(p, s);
    case ScalarKind::kBFloat16: return broadcast_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return broadcast_typed<__half>(p, s);
  }
}

}  // namespace llkern
