// CUDA kernels of the ReLU with a 1-bit mask. No torch headers: see kernels/relu_mask.h.
//
// Forward: a warp takes 32 lanes x one 16-byte vector of x per step (32 * V consecutive elements, V
// mask words); each lane packs its V bits and a segmented OR across the lanes of a word assembles the
// word, written as one uint32 (the whole step lies inside numel, so every word is full). What remains
// (fewer than 32 * V elements, or everything when x or y is not 16-byte aligned) goes 32 elements per
// warp step with __ballot_sync: one mask word per step, the last partial word written byte by byte.
// Backward: the same two paths; a lane's V bits lie in one mask byte (V divides 8), so it reads that
// byte, whatever the mask's alignment.
// Both kernels are grid-stride loops over exactly one wave of resident blocks: memory-bound, and an
// equal share per block leaves no half-empty last wave.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "scalar.cuh"

#include "../kernels/relu_mask.h"

namespace llkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Steps whose loads a warp issues before it uses any: more bytes in flight per thread. The scalar path
// moves 2 to 8 bytes a lane, so it needs more of them than the 16-byte path.
constexpr int kVecUnroll = 2;
constexpr int kScalarUnroll = 4;
constexpr unsigned kFull = 0xffffffffu;

using cuda::Acc;
using cuda::load_f;
using cuda::store_f;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T> struct alignas(16) Vec { T v[kVec<T>]; };

// "not (v <= 0)": NaN passes, and keeps its payload below (the input is copied, not converted).
template <typename T> __device__ __forceinline__ bool passes(T v) { return !(load_f(v) <= 0); }

template <typename T> __device__ __forceinline__ T zero() { return store_f<T>(typename Acc<T>::type(0)); }

// Word k of the mask (elements 32k .. 32k + 31), known to all lanes: one 32-bit store when the word lies
// inside the mask's bytes (the last word of an odd-sized mask does not) and the buffer is word-aligned,
// else the bytes that exist, one per lane.
__device__ __forceinline__ void store_mask_word(uint8_t* __restrict__ mask, int64_t k, uint32_t word,
                                                int64_t mask_bytes, bool word_aligned, int lane) {
  const int64_t first = 4 * k;
  if (word_aligned && first + 4 <= mask_bytes) {
    if (lane == 0) reinterpret_cast<uint32_t*>(mask)[k] = word;
  } else if (lane < 4 && first + lane < mask_bytes) {
    mask[first + lane] = uint8_t(word >> (8 * lane));
  }
}

// x and y may be the same buffer (in place): no __restrict__ on them. Each element is read and then
// written by the same lane, so that is safe.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    relu_mask_forward_kernel(const T* x, T* y, uint8_t* __restrict__ mask, int64_t n, bool word_aligned) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  int64_t first_word = 0;
  if (kVector) {  // x, y 16-byte aligned, mask word-aligned
    constexpr int V = kVec<T>;
    constexpr int kLanesPerWord = 32 / V;
    const int64_t groups = n / (32 * V);
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x);
    Vec<T>* yv = reinterpret_cast<Vec<T>*>(y);
    uint32_t* words = reinterpret_cast<uint32_t*>(mask);
    for (int64_t g = warp; g < groups; g += kVecUnroll * warps) {
      Vec<T> a[kVecUnroll];
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t gu = g + u * warps;
        if (gu < groups) a[u] = xv[gu * 32 + lane];
      }
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t gu = g + u * warps;
        if (gu >= groups) break;  // warp-uniform: the shuffles below see the whole warp
        Vec<T> out;
        uint32_t bits = 0;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const bool keep = passes(a[u].v[j]);
          out.v[j] = keep ? a[u].v[j] : zero<T>();
          bits |= uint32_t(keep) << j;
        }
        yv[gu * 32 + lane] = out;
        // Lane l holds elements 32 * (l / kLanesPerWord) + V * (l % kLanesPerWord) + j of this step's words.
        uint32_t word = bits << (V * (lane % kLanesPerWord));
#pragma unroll
        for (int offset = 1; offset < kLanesPerWord; offset <<= 1) word |= __shfl_xor_sync(kFull, word, offset);
        if (lane % kLanesPerWord == 0) words[gu * V + lane / kLanesPerWord] = word;
      }
    }
    first_word = groups * V;
  }
  const int64_t words_total = (n + 31) / 32;
  const int64_t mask_bytes = (n + 7) / 8;
  for (int64_t k = first_word + warp; k < words_total; k += kScalarUnroll * warps) {
    T a[kScalarUnroll];
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int64_t i = (k + u * warps) * 32 + lane;
      a[u] = i < n ? x[i] : zero<T>();
    }
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int64_t ku = k + u * warps;
      if (ku >= words_total) break;  // warp-uniform
      const int64_t i = ku * 32 + lane;
      const bool valid = i < n;
      const bool keep = valid && passes(a[u]);
      if (valid) y[i] = keep ? a[u] : zero<T>();
      const uint32_t word = __ballot_sync(kFull, keep);  // bits past n are 0
      store_mask_word(mask, ku, word, mask_bytes, word_aligned, lane);
    }
  }
}

// grad and grad_x may be the same buffer, as x and y above.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads)
    relu_mask_backward_kernel(const T* grad, const uint8_t* __restrict__ mask, T* grad_x, int64_t n) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = int64_t(gridDim.x) * kWarps;
  int64_t first_word = 0;
  if (kVector) {  // grad, grad_x 16-byte aligned
    constexpr int V = kVec<T>;
    const int64_t groups = n / (32 * V);
    const Vec<T>* gv = reinterpret_cast<const Vec<T>*>(grad);
    Vec<T>* ov = reinterpret_cast<Vec<T>*>(grad_x);
    for (int64_t g = warp; g < groups; g += kVecUnroll * warps) {
      Vec<T> a[kVecUnroll];
      uint32_t bits[kVecUnroll];
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t v = (g + u * warps) * 32 + lane;  // vector index; its first element is v * V
        if (g + u * warps < groups) {
          a[u] = gv[v];
          bits[u] = uint32_t(mask[(v * V) >> 3]) >> ((v * V) & 7);
        }
      }
#pragma unroll
      for (int u = 0; u < kVecUnroll; ++u) {
        const int64_t gu = g + u * warps;
        if (gu >= groups) break;
        Vec<T> out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = (bits[u] >> j) & 1u ? a[u].v[j] : zero<T>();
        ov[gu * 32 + lane] = out;
      }
    }
    first_word = groups * V;
  }
  const int64_t words_total = (n + 31) / 32;
  for (int64_t k = first_word + warp; k < words_total; k += kScalarUnroll * warps) {
    T a[kScalarUnroll];
    uint32_t bit[kScalarUnroll];
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int64_t i = (k + u * warps) * 32 + lane;
      const bool valid = k + u * warps < words_total && i < n;
      a[u] = valid ? grad[i] : zero<T>();
      bit[u] = valid ? (uint32_t(mask[i >> 3]) >> (i & 7)) & 1u : 0u;
    }
#pragma unroll
    for (int u = 0; u < kScalarUnroll; ++u) {
      const int64_t i = (k + u * warps) * 32 + lane;
      if (k + u * warps < words_total && i < n) grad_x[i] = bit[u] ? a[u] : zero<T>();
    }
  }
}

inline bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks that fit on the device at once: the grid-stride loops then run in exactly one wave. Host-side
// queries only (no synchronisation). The blocks per SM depend on the kernel and the architecture, and are
// kept from the first call (a process mixing GPU generations would only get a less even grid); a failed
// query falls back to an H100's 132 SMs x 8 blocks. The kernel is a template argument, not a function
// argument: a vector and a scalar kernel share a function type but not their register counts, and each
// needs its own cached count.
template <auto Kernel>
int64_t resident_blocks() {
  static const int per_sm = [] {
    int blocks = 0;
    const bool ok = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, 0) == cudaSuccess;
    return ok && blocks > 0 ? blocks : 8;
  }();
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) {
    sms = 132;
  }
  return int64_t(sms) * per_sm;
}

// Warp steps of work -> blocks, at most one resident wave.
inline unsigned grid_for(int64_t warp_steps, int64_t resident) {
  int64_t blocks = (warp_steps + kWarps - 1) / kWarps;
  blocks = blocks < 1 ? 1 : (blocks > resident ? resident : blocks);
  return static_cast<unsigned>(blocks);
}

template <typename T>
void forward_typed(const ReluMaskForwardParams& p, cudaStream_t stream) {
  const int64_t n = p.numel;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const bool word_aligned = aligned(p.mask, 4);
  const int64_t words = (n + 31) / 32;
  if (aligned(x, 16) && aligned(y, 16) && word_aligned) {
    constexpr int V = kVec<T>;
    const int64_t groups = n / (32 * V);
    const int64_t steps = groups + (words - groups * V);
    constexpr auto kernel = relu_mask_forward_kernel<T, true>;
    kernel<<<grid_for(steps, resident_blocks<kernel>()), kThreads, 0, stream>>>(x, y, p.mask, n, word_aligned);
  } else {
    constexpr auto kernel = relu_mask_forward_kernel<T, false>;
    kernel<<<grid_for(words, resident_blocks<kernel>()), kThreads, 0, stream>>>(x, y, p.mask, n, word_aligned);
  }
}

template <typename T>
void backward_typed(const ReluMaskBackwardParams& p, cudaStream_t stream) {
  const int64_t n = p.numel;
  const T* grad = static_cast<const T*>(p.grad);
  T* grad_x = static_cast<T*>(p.grad_x);
  const int64_t words = (n + 31) / 32;
  if (aligned(grad, 16) && aligned(grad_x, 16)) {
    constexpr int V = kVec<T>;
    const int64_t groups = n / (32 * V);
    const int64_t steps = groups + (words - groups * V);
    constexpr auto kernel = relu_mask_backward_kernel<T, true>;
    kernel<<<grid_for(steps, resident_blocks<kernel>()), kThreads, 0, stream>>>(grad, p.mask, grad_x, n);
  } else {
    constexpr auto kernel = relu_mask_backward_kernel<T, false>;
    kernel<<<grid_for(words, resident_blocks<kernel>()), kThreads, 0, stream>>>(grad, p.mask, grad_x, n);
  }
}

}  // namespace

void relu_mask_forward_cuda(const ReluMaskForwardParams& p, void* stream) {
  if (p.numel <= 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p, s);
    case ScalarKind::kFloat64: return forward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return forward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return forward_typed<__half>(p, s);
  }
}

void relu_mask_backward_cuda(const ReluMaskBackwardParams& p, void* stream) {
  if (p.numel <= 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p, s);
    case ScalarKind::kFloat64: return backward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return backward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return backward_typed<__half>(p, s);
  }
}

}  // namespace llkern
