// CUDA kernels of BatchNorm + ReLU, recomputed. No torch headers: see kernels/batch_norm_relu.h.
//
// Every pass walks the tensor the same way, a Plan made from the shape alone:
//  - (batch, channels, inner): one block per (channel, slice); a slice is a fixed range of "units", V
//    consecutive elements of the channel's batch * inner (V = one 16-byte vector), and thread t takes
//    units t, t + 256, ... of it. The per-channel coefficients sit in registers for the whole block.
//  - (rows, channels), channels_last (and (batch, channels, 1), the same memory): blocks over (row slice,
//    channel tile); a thread owns V consecutive channels and walks rows with a stride, so its
//    coefficients and sums stay in registers; threads next to each other read neighbouring channels.
// A unit is loaded as one vector when it is whole and 16-byte aligned, else element by element; either way
// a thread adds the same elements in the same order, so the sums do not depend on the alignment, and the
// partition does not depend on the GPU: the backward's sums are reproducible bit for bit (no atomics).
// Backward: pass 1 writes per-(channel, slice) partial sums to the workspace (plus grad_x in eval mode,
// which needs no sum); pass 2, a warp per channel, adds each channel's partials in a fixed order; pass 3
// (training) writes grad_x from the sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "scalar.cuh"

#include "../kernels/batch_norm_relu.h"
#include "../kernels/fast_divmod.h"

namespace llkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Units a thread loads before it uses any: more bytes in flight.
constexpr int kUnroll = 2;
// Blocks a pass aims at: several waves on 132 SMs (little left idle in the last one), while each block
// still covers at least kMinBlockElements, so its setup and reduction stay small next to its traffic.
// Also the bound on slices per channel, hence on the partials the second pass adds.
constexpr int64_t kTargetBlocks = 4096;
constexpr int64_t kMinBlockElements = 4096;

using cuda::Acc;
using cuda::load_f;
using cuda::store_f;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T> struct alignas(16) Vec { T v[kVec<T>]; };

// What a pass does; kReduce | kGradEval is pass 1 in eval mode.
enum Mode : int { kForward = 1, kReduce = 2, kGradEval = 4, kGradTrain = 8 };

// The recomputed BN output must equal the forward's bit for bit: explicit roundings, never contracted
// into a fused multiply-add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

inline int element_bytes(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat64: return 8;
    case ScalarKind::kFloat32: return 4;
    default: return 2;
  }
}

struct Plan {
  bool rows_layout = false;  // (rows, channels) walk; else (batch, channels, inner)
  int64_t channels = 0;
  int64_t batch = 0, inner = 0;  // the (batch, channels, inner) walk
  int64_t count = 0;             // elements per channel, M
  int64_t extent = 0;            // units per channel, or rows
  int64_t slices = 0, chunk = 0; // chunk: units or rows per slice
  int64_t tiles = 1;             // rows walk: channel tiles
  int width = 1, lanes = 1;      // rows walk: channel groups per tile, rows in flight per block
  int64_t blocks = 0;
};

// The walk of every pass, from the shape alone (workspace size included).
Plan make_plan(const BatchNormReluShape& shape) {
  Plan p;
  const int64_t numel = shape.numel();
  if (numel <= 0) return p;
  const int64_t V = 16 / element_bytes(shape.dtype);
  p.channels = shape.channels;
  p.count = numel / shape.channels;
  p.batch = shape.batch;
  p.inner = shape.inner;
  if (shape.channels == 1) {  // one channel: the tensor is one contiguous run, whatever the layout
    p.batch = 1;
    p.inner = numel;
  } else if (shape.channels_last || shape.inner == 1) {
    p.rows_layout = true;
  }
  if (p.rows_layout) {
    const int64_t groups = ceil_div(p.channels, V);
    p.tiles = ceil_div(groups, kThreads);
    p.width = static_cast<int>(ceil_div(groups, p.tiles));  // balanced tiles: fewer idle threads
    p.lanes = kThreads / p.width;
    const int64_t min_rows = clamp64(ceil_div(kMinBlockElements, p.width * V), p.lanes, INT64_MAX);
    p.extent = p.batch * p.inner;
    p.slices = clamp64(ceil_div(kTargetBlocks, p.tiles), 1, ceil_div(p.extent, min_rows));
  } else {
    p.extent = ceil_div(p.count, V);
    p.slices = clamp64(ceil_div(kTargetBlocks, p.channels), 1, ceil_div(p.extent, kMinBlockElements / V));
  }
  p.chunk = ceil_div(p.extent, p.slices);
  p.slices = ceil_div(p.extent, p.chunk);  // no empty slice
  p.blocks = p.rows_layout ? p.slices * p.tiles : p.channels * p.slices;
  return p;
}

inline int64_t acc_bytes(ScalarKind kind) { return kind == ScalarKind::kFloat64 ? 8 : 4; }

// Partials [2][channels][slices], then the sums [2][channels] for when the caller wants grad_x but not them.
inline int64_t workspace_elements(const Plan& p) { return 2 * p.channels * p.slices + 2 * p.channels; }

template <typename T>
struct Args {
  using A = typename Acc<T>::type;
  const T* x = nullptr;
  const T* grad = nullptr;
  T* out = nullptr;  // y or grad_x
  const A* scale = nullptr;
  const A* shift = nullptr;
  const A* mean = nullptr;
  const A* invstd = nullptr;
  const A* total_g = nullptr;  // kGradTrain: sum_g, sum_gxh per channel
  const A* total_d = nullptr;
  A* partials = nullptr;       // kReduce: [2][channels][slices]
  A norm = 0;                  // 1 / M
  int64_t channels = 0, inner = 0, count = 0, extent = 0, slices = 0, chunk = 0, tiles = 1;
  int width = 1, lanes = 1;
  FastDivmod inner_div;        // by inner, for indices below 2^32
  bool wide = false;           // count >= 2^32: 64-bit division
  bool aligned = false;        // x, grad and out 16-byte aligned (those the pass touches)
};

template <typename A>
struct Coef {
  A scale, shift, mean, mean_g, proj;
};

template <int kMode, typename T>
__device__ __forceinline__ Coef<typename Acc<T>::type> load_coef(const Args<T>& a, int64_t c) {
  using A = typename Acc<T>::type;
  Coef<A> k{A(0), A(0), A(0), A(0), A(0)};
  k.scale = a.scale[c];
  k.shift = a.shift[c];
  if (kMode & (kReduce | kGradTrain)) k.mean = a.mean[c];
  if (kMode & kGradTrain) {
    // PyTorch's batch_norm_backward_elemt: grad_mean = sum_dy / M, proj = dot / M * invstd^2, where
    // total_d = dot * invstd already.
    k.mean_g = a.total_g[c] * a.norm;
    k.proj = a.total_d[c] * a.norm * a.invstd[c];
  }
  return k;
}

// One element: returns y (forward) or grad_x, and adds g and g * (x - mean) to the sums (kReduce).
template <int kMode, typename T, typename A>
__device__ __forceinline__ T element(T xv, T gv, const Coef<A>& k, A& sum_g, A& sum_d) {
  const A x = A(load_f(xv));
  const A z = add_rn(mul_rn(x, k.scale), k.shift);
  const bool keep = !(z <= A(0));  // NaN passes, as in ReLU
  if constexpr ((kMode & kForward) != 0) {
    return store_f<T>(keep ? z : A(0));
  } else {
    const A g = keep ? A(load_f(gv)) : A(0);  // a select: an inf or NaN gradient where masked gives 0
    if constexpr ((kMode & kReduce) != 0) {
      sum_g += g;
      sum_d += g * (x - k.mean);
    }
    if constexpr ((kMode & kGradTrain) != 0) return store_f<T>((g - k.mean_g - (x - k.mean) * k.proj) * k.scale);
    if constexpr ((kMode & kGradEval) != 0) return store_f<T>(g * k.scale);
    return xv;  // pure reduction: not stored
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // valid in lane 0
}

// (batch, channels, inner): block = (channel c, slice s).
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads) channel_kernel(const Args<T> a) {
  using A = typename Acc<T>::type;
  constexpr int V = kVec<T>;
  constexpr bool kGrad = (kMode & kForward) == 0;
  constexpr bool kStore = (kMode & (kForward | kGradEval | kGradTrain)) != 0;
  const int64_t c = blockIdx.x / a.slices;
  const int64_t s = blockIdx.x - c * a.slices;
  const int64_t begin = s * a.chunk;
  const int64_t end = begin + a.chunk < a.extent ? begin + a.chunk : a.extent;
  const Coef<A> k = load_coef<kMode>(a, c);
  // Moving from the last element of a batch entry's run to the next entry's first skips the other channels.
  const int64_t jump = (a.channels - 1) * a.inner;
  A sum_g = 0, sum_d = 0;
  for (int64_t u0 = begin + threadIdx.x; u0 < end; u0 += kUnroll * kThreads) {
    Vec<T> xs[kUnroll], gs[kUnroll];
    int64_t offset[kUnroll], pos[kUnroll];  // memory offset and index within inner of the unit's first element
    int valid[kUnroll];
    bool whole[kUnroll];
    // Whole, aligned units are loaded as vectors up front; the others element by element when their turn
    // comes, so that the order of the sums is the same either way.
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int64_t u = u0 + q * kThreads;
      valid[q] = 0;
      whole[q] = false;
      if (u >= end) continue;
      const int64_t m = u * V;
      int64_t b, r;
      if (a.wide) {
        b = m / a.inner;
        r = m - b * a.inner;
      } else {
        uint32_t qb, qr;
        a.inner_div.divmod(static_cast<uint32_t>(m), qb, qr);
        b = qb;
        r = qr;
      }
      offset[q] = (b * a.channels + c) * a.inner + r;
      pos[q] = r;
      valid[q] = a.count - m < V ? static_cast<int>(a.count - m) : V;
      whole[q] = a.aligned && valid[q] == V && r + V <= a.inner && offset[q] % V == 0;
      if (whole[q]) {
        xs[q] = reinterpret_cast<const Vec<T>*>(a.x)[offset[q] / V];
        if (kGrad) gs[q] = reinterpret_cast<const Vec<T>*>(a.grad)[offset[q] / V];
      }
    }
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      if (whole[q]) {
        Vec<T> out;
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = element<kMode>(xs[q].v[j], kGrad ? gs[q].v[j] : xs[q].v[j], k, sum_g, sum_d);
        if constexpr (kStore) reinterpret_cast<Vec<T>*>(a.out)[offset[q] / V] = out;
      } else {
        // A unit may run past the end of a batch entry's run into the next entry's.
        int64_t o = offset[q], rr = pos[q];
#pragma unroll 1
        for (int j = 0; j < valid[q]; ++j) {
          const T xv = a.x[o];
          const T v = element<kMode>(xv, kGrad ? a.grad[o] : xv, k, sum_g, sum_d);
          if constexpr (kStore) a.out[o] = v;
          if (++rr == a.inner) {
            rr = 0;
            o += jump;
          }
          ++o;
        }
      }
    }
  }
  if constexpr ((kMode & kReduce) != 0) {
    __shared__ A shared[2][kWarps];
    sum_g = warp_sum(sum_g);
    sum_d = warp_sum(sum_d);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      shared[0][warp] = sum_g;
      shared[1][warp] = sum_d;
    }
    __syncthreads();
    if (warp == 0) {
      sum_g = warp_sum(lane < kWarps ? shared[0][lane] : A(0));
      sum_d = warp_sum(lane < kWarps ? shared[1][lane] : A(0));
      if (lane == 0) {
        a.partials[c * a.slices + s] = sum_g;
        a.partials[(a.channels + c) * a.slices + s] = sum_d;
      }
    }
  }
}

// (rows, channels): block = (row slice, channel tile); thread = (row lane, group of V channels).
template <typename T, int kMode>
__global__ void __launch_bounds__(kThreads) rows_kernel(const Args<T> a) {
  using A = typename Acc<T>::type;
  constexpr int V = kVec<T>;
  constexpr bool kGrad = (kMode & kForward) == 0;
  constexpr bool kStore = (kMode & (kForward | kGradEval | kGradTrain)) != 0;
  const int64_t tile = blockIdx.x % a.tiles;
  const int64_t s = blockIdx.x / a.tiles;
  const int group_in_tile = threadIdx.x % a.width;
  const int lane_row = threadIdx.x / a.width;
  const int64_t c0 = (tile * a.width + group_in_tile) * V;
  int channels_here = 0;  // of this thread's V channels, those that exist
  if (lane_row < a.lanes && c0 < a.channels) {
    channels_here = a.channels - c0 < V ? static_cast<int>(a.channels - c0) : V;
  }
  Coef<A> k[V];
  A sum_g[V], sum_d[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    k[j] = j < channels_here ? load_coef<kMode>(a, c0 + j) : Coef<A>{A(0), A(0), A(0), A(0), A(0)};
    sum_g[j] = 0;
    sum_d[j] = 0;
  }
  const int64_t begin = s * a.chunk;
  const int64_t end = begin + a.chunk < a.extent ? begin + a.chunk : a.extent;
  if (channels_here > 0) {
    for (int64_t r0 = begin + lane_row; r0 < end; r0 += int64_t(kUnroll) * a.lanes) {
      Vec<T> xs[kUnroll], gs[kUnroll];
      int64_t offset[kUnroll];
      bool live[kUnroll], whole[kUnroll];
      // As in channel_kernel: vectors up front, the rest element by element in their turn.
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        const int64_t r = r0 + int64_t(q) * a.lanes;
        live[q] = r < end;
        offset[q] = r * a.channels + c0;
        whole[q] = live[q] && a.aligned && channels_here == V && offset[q] % V == 0;
        if (whole[q]) {
          xs[q] = reinterpret_cast<const Vec<T>*>(a.x)[offset[q] / V];
          if (kGrad) gs[q] = reinterpret_cast<const Vec<T>*>(a.grad)[offset[q] / V];
        }
      }
#pragma unroll
      for (int q = 0; q < kUnroll; ++q) {
        if (whole[q]) {
          Vec<T> out;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            out.v[j] = element<kMode>(xs[q].v[j], kGrad ? gs[q].v[j] : xs[q].v[j], k[j], sum_g[j], sum_d[j]);
          }
          if constexpr (kStore) reinterpret_cast<Vec<T>*>(a.out)[offset[q] / V] = out;
        } else if (live[q]) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            if (j < channels_here) {
              const T xv = a.x[offset[q] + j];
              const T v = element<kMode>(xv, kGrad ? a.grad[offset[q] + j] : xv, k[j], sum_g[j], sum_d[j]);
              if constexpr (kStore) a.out[offset[q] + j] = v;
            }
          }
        }
      }
    }
  }
  if constexpr ((kMode & kReduce) != 0) {
    // Rows of red: a block's row lanes; columns: the tile's channels. A fixed halving tree over the rows.
    __shared__ A red[2][kThreads * V];
    const int wv = a.width * V;
    if (lane_row < a.lanes) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        red[0][lane_row * wv + group_in_tile * V + j] = sum_g[j];
        red[1][lane_row * wv + group_in_tile * V + j] = sum_d[j];
      }
    }
    __syncthreads();
    for (int n = a.lanes; n > 1;) {
      const int half = (n + 1) / 2;
      for (int i = threadIdx.x; i < (n - half) * wv; i += kThreads) {
        red[0][i] += red[0][i + half * wv];
        red[1][i] += red[1][i + half * wv];
      }
      n = half;
      __syncthreads();
    }
    for (int i = threadIdx.x; i < wv; i += kThreads) {
      const int64_t c = tile * wv + i;
      if (c < a.channels) {
        a.partials[c * a.slices + s] = red[0][i];
        a.partials[(a.channels + c) * a.slices + s] = red[1][i];
      }
    }
  }
}

// A warp per channel adds its partials: lane l takes slices l, l + 32, ... in order, then a fixed tree.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finish_sums(const A* __restrict__ partials, int64_t channels, int64_t slices, const A* __restrict__ invstd,
                A* __restrict__ sum_g, A* __restrict__ sum_gxh) {
  const int64_t c = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // the whole warp
  A g = 0, d = 0;
  for (int64_t i = lane; i < slices; i += 32) {
    g += partials[c * slices + i];
    d += partials[(channels + c) * slices + i];
  }
  g = warp_sum(g);
  d = warp_sum(d);
  if (lane == 0) {
    sum_g[c] = g;
    sum_gxh[c] = d * invstd[c];
  }
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
Args<T> plan_args(const Plan& plan) {
  Args<T> a;
  a.channels = plan.channels;
  a.inner = plan.inner;
  a.count = plan.count;
  a.extent = plan.extent;
  a.slices = plan.slices;
  a.chunk = plan.chunk;
  a.tiles = plan.tiles;
  a.width = plan.width;
  a.lanes = plan.lanes;
  // Element indices within a channel stay below count: 32-bit division when they fit.
  a.wide = plan.count > int64_t(UINT32_MAX);
  if (!a.wide && !plan.rows_layout) a.inner_div = FastDivmod(static_cast<uint32_t>(plan.inner));
  return a;
}

template <typename T, int kMode>
void launch(const Plan& plan, const Args<T>& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.blocks));
  if (plan.rows_layout) {
    rows_kernel<T, kMode><<<grid, kThreads, 0, stream>>>(a);
  } else {
    channel_kernel<T, kMode><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename T>
void forward_typed(const BatchNormReluForwardParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const Plan plan = make_plan(p.shape);
  if (plan.blocks == 0) return;
  Args<T> a = plan_args<T>(plan);
  a.x = static_cast<const T*>(p.x);
  a.out = static_cast<T*>(p.y);
  a.scale = static_cast<const A*>(p.scale);
  a.shift = static_cast<const A*>(p.shift);
  a.aligned = aligned16(a.x) && aligned16(a.out);
  launch<T, kForward>(plan, a, stream);
}

template <typename T>
void backward_typed(const BatchNormReluBackwardParams& p, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const Plan plan = make_plan(p.shape);
  const int64_t channels = p.shape.channels;
  if (plan.blocks == 0) {  // no element: the sums over none are 0
    if (channels > 0) {
      if (p.sum_grad) cudaMemsetAsync(p.sum_grad, 0, channels * sizeof(A), stream);
      if (p.sum_grad_xhat) cudaMemsetAsync(p.sum_grad_xhat, 0, channels * sizeof(A), stream);
    }
    return;
  }
  Args<T> a = plan_args<T>(plan);
  a.x = static_cast<const T*>(p.x);
  a.grad = static_cast<const T*>(p.grad);
  a.scale = static_cast<const A*>(p.scale);
  a.shift = static_cast<const A*>(p.shift);
  a.mean = static_cast<const A*>(p.mean);
  a.invstd = static_cast<const A*>(p.invstd);
  a.norm = A(1) / A(plan.count);
  T* grad_x = static_cast<T*>(p.grad_x);
  const bool sums_wanted = p.sum_grad != nullptr || p.sum_grad_xhat != nullptr;
  const bool train_grad = grad_x != nullptr && p.training;
  if (sums_wanted || train_grad) {
    A* partials = static_cast<A*>(p.workspace);
    A* spare = partials + 2 * plan.channels * plan.slices;  // sums the caller did not ask for
    A* total_g = p.sum_grad ? static_cast<A*>(p.sum_grad) : spare;
    A* total_d = p.sum_grad_xhat ? static_cast<A*>(p.sum_grad_xhat) : spare + channels;
    a.partials = partials;
    if (grad_x != nullptr && !p.training) {  // eval: grad_x needs no sum, so it comes in the same pass
      a.out = grad_x;
      a.aligned = aligned16(a.x) && aligned16(a.grad) && aligned16(a.out);
      launch<T, kReduce | kGradEval>(plan, a, stream);
    } else {
      a.aligned = aligned16(a.x) && aligned16(a.grad);
      launch<T, kReduce>(plan, a, stream);
    }
    const unsigned finish_blocks = static_cast<unsigned>(ceil_div(channels, kWarps));
    finish_sums<A><<<finish_blocks, kThreads, 0, stream>>>(partials, channels, plan.slices, a.invstd, total_g, total_d);
    if (train_grad) {
      a.total_g = total_g;
      a.total_d = total_d;
      a.out = grad_x;
      a.aligned = aligned16(a.x) && aligned16(a.grad) && aligned16(a.out);
      launch<T, kGradTrain>(plan, a, stream);
    }
  } else if (grad_x != nullptr) {  // eval, no weight or bias gradient: one elementwise pass
    a.out = grad_x;
    a.aligned = aligned16(a.x) && aligned16(a.grad) && aligned16(a.out);
    launch<T, kGradEval>(plan, a, stream);
  }
}

}  // namespace

void batch_norm_relu_forward_cuda(const BatchNormReluForwardParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.shape.dtype) {
    case ScalarKind::kFloat32: return forward_typed<float>(p, s);
    case ScalarKind::kFloat64: return forward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return forward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return forward_typed<__half>(p, s);
  }
}

int64_t batch_norm_relu_backward_cuda_workspace_bytes(const BatchNormReluShape& shape) {
  const Plan plan = make_plan(shape);
  if (plan.blocks == 0) return 0;
  return workspace_elements(plan) * acc_bytes(shape.dtype);
}

void batch_norm_relu_backward_cuda(const BatchNormReluBackwardParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.shape.dtype) {
    case ScalarKind::kFloat32: return backward_typed<float>(p, s);
    case ScalarKind::kFloat64: return backward_typed<double>(p, s);
    case ScalarKind::kBFloat16: return backward_typed<__nv_bfloat16>(p, s);
    case ScalarKind::kFloat16: return backward_typed<__half>(p, s);
  }
}

}  // namespace llkern
