// CUDA kernels of the transport penalty. No torch headers: see kernels/transport.h.
//
// Forward: each block sums the squares of a fixed chunk (16-byte vector loads
// when aligned, fp32 accumulation; fp64 for float64), reduces in a fixed tree
// and writes one partial; a one-block kernel adds the partials in order. The
// partition depends only on numel, so results are bitwise reproducible for the
// same inputs at the same 16-byte alignment (an unaligned view takes the scalar
// path, which visits the elements of a block in another order).
// Backward: one elementwise pass, dy = grad_loss * grad_scale * (y - x), with
// grad_loss read on the device (no host synchronisation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "scalar.cuh"

#include "../kernels/transport.h"

namespace llkern {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 2048;
constexpr int64_t kMinElemsPerBlock = 8192;

using cuda::Acc;
using cuda::load_f;
using cuda::store_f;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T> struct alignas(16) Vec { T v[kVec<T>]; };

inline int64_t num_blocks(int64_t n) {
  int64_t blocks = (n + kMinElemsPerBlock - 1) / kMinElemsPerBlock;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// Elements per block: a multiple of the vector width, so aligned blocks stay aligned.
template <typename T>
inline int64_t chunk_size(int64_t n, int64_t blocks) {
  const int64_t per = (n + blocks - 1) / blocks;
  return (per + kVec<T> - 1) / kVec<T> * kVec<T>;
}

template <typename A>
__device__ A block_sum(A v, A* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? shared[threadIdx.x] : A(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;  // valid in thread 0
}

// With kGrad, also writes dy = g * r in the same pass (the caller wants the gradient now).
template <typename T, bool kHasX, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    sum_of_squares_partial(const T* __restrict__ y, const T* __restrict__ x, T* __restrict__ dy, int64_t n,
                           int64_t chunk, bool vectorised, typename Acc<T>::type g,
                           typename Acc<T>::type* __restrict__ partials) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads / 32];
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  A acc = 0;
  int64_t tail = begin;
  if (vectorised) {
    const int64_t nvec = (end > begin ? end - begin : 0) / kVec<T>;
    const Vec<T>* yv = reinterpret_cast<const Vec<T>*>(y + begin);
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(kHasX ? x + begin : y);
    Vec<T>* dv = reinterpret_cast<Vec<T>*>(kGrad ? dy + begin : nullptr);
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const Vec<T> a = yv[i];
      Vec<T> b, out;
      if (kHasX) b = xv[i];
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) {
        A r = A(load_f(a.v[j]));
        if (kHasX) r -= A(load_f(b.v[j]));
        acc += r * r;
        if (kGrad) out.v[j] = store_f<T>(g * r);
      }
      if (kGrad) dv[i] = out;
    }
    tail = begin + nvec * kVec<T>;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kThreads) {
    A r = A(load_f(y[i]));
    if (kHasX) r -= A(load_f(x[i]));
    acc += r * r;
    if (kGrad) dy[i] = store_f<T>(g * r);
  }
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

template <typename A, typename Out>
__global__ void __launch_bounds__(kThreads)
    finish_sum(const A* __restrict__ partials, int64_t count, double scale, Out* __restrict__ loss) {
  __shared__ double shared[kThreads / 32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += double(partials[i]);
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *loss = Out(scale * acc);
}

template <typename T, bool kHasX>
__global__ void __launch_bounds__(kThreads)
    transport_grad(const T* __restrict__ y, const T* __restrict__ x, T* __restrict__ dy, int64_t n,
                   bool vectorised, const typename Acc<T>::type* __restrict__ grad_loss, double grad_scale) {
  using A = typename Acc<T>::type;
  const A g = A(double(*grad_loss) * grad_scale);
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  int64_t tail = 0;
  if (vectorised) {
    const int64_t nvec = n / kVec<T>;
    const Vec<T>* yv = reinterpret_cast<const Vec<T>*>(y);
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(kHasX ? x : y);
    Vec<T>* dv = reinterpret_cast<Vec<T>*>(dy);
    for (int64_t i = first; i < nvec; i += stride) {
      const Vec<T> a = yv[i];
      Vec<T> b, out;
      if (kHasX) b = xv[i];
#pragma unroll
      for (int j = 0; j < kVec<T>; ++j) {
        A r = A(load_f(a.v[j]));
        if (kHasX) r -= A(load_f(b.v[j]));
        out.v[j] = store_f<T>(g * r);
      }
      dv[i] = out;
    }
    tail = nvec * kVec<T>;
  }
  for (int64_t i = tail + first; i < n; i += stride) {
    A r = A(load_f(y[i]));
    if (kHasX) r -= A(load_f(x[i]));
    dy[i] = store_f<T>(g * r);
  }
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
void forward_typed(const TransportForwardParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t blocks = num_blocks(p.numel);
  const int64_t chunk = chunk_size<T>(p.numel, blocks);
  const bool vectorised = aligned16(p.y) && aligned16(p.x) && aligned16(p.grad_y);
  const T* y = static_cast<const T*>(p.y);
  const T* x = static_cast<const T*>(p.x);
  T* dy = static_cast<T*>(p.grad_y);
  const A g = A(p.grad_scale);
  A* partials = static_cast<A*>(p.workspace);
  const dim3 grid(static_cast<unsigned>(blocks));
  if (x && dy) {
    sum_of_squares_partial<T, true, true><<<grid, kThreads, 0, stream>>>(y, x, dy, p.numel, chunk, vectorised, g, partials);
  } else if (x) {
    sum_of_squares_partial<T, true, false><<<grid, kThreads, 0, stream>>>(y, x, dy, p.numel, chunk, vectorised, g, partials);
  } else if (dy) {
    sum_of_squares_partial<T, false, true><<<grid, kThreads, 0, stream>>>(y, x, dy, p.numel, chunk, vectorised, g, partials);
  } else {
    sum_of_squares_partial<T, false, false><<<grid, kThreads, 0, stream>>>(y, x, dy, p.numel, chunk, vectorised, g, partials);
  }
  finish_sum<A, A><<<1, kThreads, 0, stream>>>(partials, blocks, p.scale, static_cast<A*>(p.loss));
}

template <typename T>
void backward_typed(const TransportBackwardParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const bool vectorised = aligned16(p.y) && aligned16(p.x) && aligned16(p.grad_y);
  const int64_t work = vectorised ? (p.numel + kVec<T> - 1) / kVec<T> : p.numel;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks);
  const T* y = static_cast<const T*>(p.y);
  const T* x = static_cast<const T*>(p.x);
  T* dy = static_cast<T*>(p.grad_y);
  const A* g = static_cast<const A*>(p.grad_loss);
  if (x) {
    transport_grad<T, true><<<blocks, kThreads, 0, stream>>>(y, x, dy, p.numel, vectorised, g, p.grad_scale);
  } else {
    transport_grad<T, false><<<blocks, kThreads, 0, stream>>>(y, x, dy, p.numel, vectorised, g, p.grad_scale);
  }
}

}  // namespace

int64_t transport_forward_cuda_workspace_bytes(int64_t numel, ScalarKind dtype) {
  const int64_t acc_bytes = dtype == ScalarKind::kFloat64 ? 8 : 4;
  return num_blocks(numel) * acc_bytes;
}

void transport_forward_cuda(const TransportForwardParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p, s);
    case ScalarKind::kFloat64: return forward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return forward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return forward_typed<__half>(p, s);
  }
}

void transport_backward_cuda(const TransportBackwardParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p, s);
    case ScalarKind::kFloat64: return backward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return backward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return backward_typed<__half>(p, s);
  }
}

}  // namespace llkern
