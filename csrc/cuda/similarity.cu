// CUDA kernels of the similarity-matrix losses: the elementwise passes over one block of rows.
// No torch headers: see kernels/similarity.h.
//
// contrast rows and Gaussian rows: one thread block per row (rows are long, up to N values):
// pass 1 maxima / positive sums / counts, pass 2 the sum of exponentials, pass 3 the gradient
// written over the row. Block reductions combine the warps in a fixed order (reproducible).
// column statistics: one thread per column, walking down the block's rows (coalesced).
// symmetric gradient: one thread per value.
#include <cuda_runtime.h>

#include <cstdint>

#include "../kernels/similarity.h"

namespace llkern {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

inline unsigned blocks_for(int64_t work, int64_t per_block) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  return static_cast<unsigned>(blocks);
}

struct Sum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a > b ? a : b; }
};

// Every thread gets op over the block's values, combined warp by warp in a fixed order.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, shared[w]);
  __syncthreads();  // the shared slots may be reused right after
  return v;
}

template <typename A>
__device__ __forceinline__ A negative_infinity() {
  return -A(INFINITY);
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    contrast_rows(A* __restrict__ logits, int64_t rows, int64_t cols, int64_t row0, const int64_t* __restrict__ labels,
                  bool write_grad, A scale, A* __restrict__ lse_out, A* __restrict__ diagonal_out,
                  double* __restrict__ row_loss, double* __restrict__ row_anchor) {
  __shared__ A shared_a[kWarps];
  __shared__ long long shared_n[kWarps];
  const bool supervised = labels != nullptr;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    A* s = logits + i * cols;
    const int64_t self = row0 + i;
    const int64_t y = supervised ? labels[self] : 0;
    // Pass 1: the maximum over the candidates, and (supervised) the positives' sum and count.
    A max = negative_infinity<A>(), positive_sum = 0;
    long long positives = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const A v = s[j];
      if (supervised && j == self) continue;
      max = v > max ? v : max;
      if (supervised && labels[j] == y) {
        positive_sum += v;
        ++positives;
      }
    }
    const A diagonal = supervised ? A(0) : s[self];
    max = block_reduce(max, Max(), shared_a);
    if (supervised) {
      positive_sum = block_reduce(positive_sum, Sum(), shared_a);
      positives = block_reduce(positives, Sum(), shared_n);
    }
    // Pass 2: the sum of exponentials (none when a supervised row of one column has no candidate).
    A sum = 0;
    if (max != negative_infinity<A>()) {
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        if (!(supervised && j == self)) sum += exp(s[j] - max);
      }
    }
    sum = block_reduce(sum, Sum(), shared_a);  // (its barriers also order every read before pass 3)
    const A lse = max != negative_infinity<A>() ? max + log(sum) : max;
    if (threadIdx.x == 0) {
      if (supervised) {
        row_loss[i] = positives > 0 ? -double(positive_sum - A(positives) * lse) / double(positives) : 0.0;
        if (row_anchor) row_anchor[i] = positives > 0 ? 1.0 : 0.0;
      } else {
        row_loss[i] = double(lse - diagonal);
        if (diagonal_out) diagonal_out[i] = diagonal;
      }
      if (lse_out) lse_out[i] = lse;
    }
    // Pass 3: d loss_i / d s over the row.
    if (write_grad) {
      const bool anchor = !supervised || positives > 0;
      const A step = supervised && positives > 0 ? A(1) / A(positives) : A(1);
      for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
        A g = 0;
        if (anchor && !(supervised && j == self)) {
          g = exp(s[j] - lse);
          if (supervised ? labels[j] == y : j == self) g -= step;
        }
        s[j] = scale * g;
      }
    }
    __syncthreads();  // shared_a is reused by the next row
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    column_lse(const A* __restrict__ logits, int64_t rows, int64_t cols, A* __restrict__ col_max,
               A* __restrict__ col_sum) {
  for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < cols; j += int64_t(gridDim.x) * kThreads) {
    const A old_max = col_max[j];
    A max = old_max;
    for (int64_t i = 0; i < rows; ++i) {
      const A v = logits[i * cols + j];
      max = v > max ? v : max;
    }
    A sum = old_max == negative_infinity<A>() ? A(0) : col_sum[j] * exp(old_max - max);
    for (int64_t i = 0; i < rows; ++i) sum += exp(logits[i * cols + j] - max);
    col_max[j] = max;
    col_sum[j] = sum;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    symmetric_grad(A* __restrict__ logits, int64_t rows, int64_t cols, int64_t row0, const A* __restrict__ row_lse,
                   const A* __restrict__ col_lse, A scale) {
  const int64_t total = rows * cols;
  for (int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x; k < total; k += int64_t(gridDim.x) * kThreads) {
    const int64_t i = k / cols, j = k - i * cols;
    const A v = logits[k];
    A g = scale * (exp(v - row_lse[i]) + exp(v - col_lse[j]));
    if (j == row0 + i) g -= 2 * scale;
    logits[k] = g;
  }
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    gaussian_rows(A* __restrict__ dots, A* __restrict__ same_weights, int64_t rows, int64_t cols, int64_t row0,
                  const A* __restrict__ sq_norms, const int64_t* __restrict__ labels, A inv_sigma_sq, bool write_grad,
                  A* __restrict__ row_sum, A* __restrict__ row_sum_same, double* __restrict__ frob,
                  double* __restrict__ frob_same, double* __restrict__ same_count) {
  __shared__ A shared_a[kWarps];
  __shared__ long long shared_n[kWarps];
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t self = row0 + i;
    const int64_t y = labels[self];
    const A sq_i = sq_norms[self];
    A* d = dots + i * cols;
    A* w = write_grad ? same_weights + i * cols : nullptr;
    A total = 0, same = 0;
    long long count = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
      const A distance = sq_i + sq_norms[j] - 2 * d[j];
      // K_ij^2 off the diagonal (its K_ii^2 = 1 is added below, and left out of the weights:
      // its term t_i - t_i is zero, and keeping it would cancel t_i against t_i)
      // (clamped with distance < 0, not distance > 0: a NaN distance must stay NaN, not become 0 and K^2 1)
      const A k2 = j == self ? A(0) : exp(-(distance < A(0) ? A(0) : distance) * inv_sigma_sq);
      const bool equal = labels[j] == y;
      total += k2;
      same += equal ? k2 : A(0);
      count += equal;
      if (write_grad) {
        d[j] = k2;
        w[j] = equal ? k2 : A(0);
      }
    }
    total = block_reduce(total, Sum(), shared_a);
    same = block_reduce(same, Sum(), shared_a);
    count = block_reduce(count, Sum(), shared_n);
    if (threadIdx.x == 0) {
      if (write_grad) {
        row_sum[i] = total;
        row_sum_same[i] = same;
      }
      frob[i] = 1.0 + double(total);
      frob_same[i] = 1.0 + double(same);
      same_count[i] = double(count);
    }
  }
}

}  // namespace

void contrast_rows_cuda(const ContrastRowsParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(p.rows, 1);
  if (p.is_double) {
    contrast_rows<double><<<blocks, kThreads, 0, s>>>(
        static_cast<double*>(p.logits), p.rows, p.cols, p.row0, p.labels, p.write_grad, p.grad_scale,
        static_cast<double*>(p.lse), static_cast<double*>(p.diagonal), p.row_loss, p.row_anchor);
  } else {
    contrast_rows<float><<<blocks, kThreads, 0, s>>>(
        static_cast<float*>(p.logits), p.rows, p.cols, p.row0, p.labels, p.write_grad, float(p.grad_scale),
        static_cast<float*>(p.lse), static_cast<float*>(p.diagonal), p.row_loss, p.row_anchor);
  }
}

void column_lse_update_cuda(const ColumnLseParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(p.cols, kThreads);
  if (p.is_double) {
    column_lse<double><<<blocks, kThreads, 0, s>>>(static_cast<const double*>(p.logits), p.rows, p.cols,
                                                   static_cast<double*>(p.col_max), static_cast<double*>(p.col_sum));
  } else {
    column_lse<float><<<blocks, kThreads, 0, s>>>(static_cast<const float*>(p.logits), p.rows, p.cols,
                                                  static_cast<float*>(p.col_max), static_cast<float*>(p.col_sum));
  }
}

void symmetric_grad_cuda(const SymmetricGradParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(p.rows * p.cols, kThreads);
  if (p.is_double) {
    symmetric_grad<double><<<blocks, kThreads, 0, s>>>(static_cast<double*>(p.logits), p.rows, p.cols, p.row0,
                                                       static_cast<const double*>(p.row_lse),
                                                       static_cast<const double*>(p.col_lse), p.grad_scale);
  } else {
    symmetric_grad<float><<<blocks, kThreads, 0, s>>>(static_cast<float*>(p.logits), p.rows, p.cols, p.row0,
                                                      static_cast<const float*>(p.row_lse),
                                                      static_cast<const float*>(p.col_lse), float(p.grad_scale));
  }
}

void gaussian_rows_cuda(const GaussianRowsParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned blocks = blocks_for(p.rows, 1);
  if (p.is_double) {
    gaussian_rows<double><<<blocks, kThreads, 0, s>>>(
        static_cast<double*>(p.dots), static_cast<double*>(p.same_weights), p.rows, p.cols, p.row0,
        static_cast<const double*>(p.sq_norms), p.labels, p.inv_sigma_sq, p.write_grad,
        static_cast<double*>(p.row_sum), static_cast<double*>(p.row_sum_same), p.frob, p.frob_same, p.same_count);
  } else {
    gaussian_rows<float><<<blocks, kThreads, 0, s>>>(
        static_cast<float*>(p.dots), static_cast<float*>(p.same_weights), p.rows, p.cols, p.row0,
        static_cast<const float*>(p.sq_norms), p.labels, float(p.inv_sigma_sq), p.write_grad,
        static_cast<float*>(p.row_sum), static_cast<float*>(p.row_sum_same), p.frob, p.frob_same, p.same_count);
  }
}

}  // namespace llkern
