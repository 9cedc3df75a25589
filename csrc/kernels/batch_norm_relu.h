// BatchNorm followed by ReLU, recomputed: the forward writes y = relu(x * scale + shift) from the
// per-channel scale = weight * invstd and shift = bias - mean * scale; the backward recomputes
// z = x * scale + shift (the same two roundings, never a fused multiply-add, so the recomputed mask
// equals the forward's bit for bit), masks the gradient with z > 0 and applies BatchNorm's backward
// in the same passes, with no saved BN output and no saved mask:
//
//   g       = z > 0 ? grad : 0                 (NaN z passes the gradient: "not (z <= 0)", as ReLU)
//   sum_g   = sum over N and the spatial dims of g            (= d bias)
//   sum_gxh = sum of g * (x - mean) * invstd                  (= d weight)
//   training: grad_x = scale * (g - sum_g / M - (x - mean) * invstd * sum_gxh / M),  M = numel / C
//   eval:     grad_x = scale * g
//
// Torch-free interface. x, y, grad and grad_x are dense tensors of `dtype` with `channels` channels,
// laid out as (batch, channels, inner) (contiguous NC*) or (batch, inner, channels) (channels_last).
// The per-channel arrays are of the compute type: double for kFloat64, else float.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace llkern {

struct BatchNormReluShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t inner = 1;            // product of the spatial sizes
  bool channels_last = false;   // (batch, inner, channels) in memory
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t numel() const { return batch * channels * inner; }
};

struct BatchNormReluForwardParams {
  BatchNormReluShape shape;
  const void* x = nullptr;
  void* y = nullptr;
  const void* scale = nullptr;  // C, compute type
  const void* shift = nullptr;  // C, compute type
};

struct BatchNormReluBackwardParams {
  BatchNormReluShape shape;
  const void* grad = nullptr;
  const void* x = nullptr;
  const void* scale = nullptr;   // C, compute type
  const void* shift = nullptr;   // C, compute type
  const void* mean = nullptr;    // C, compute type
  const void* invstd = nullptr;  // C, compute type
  // out, C each, compute type: d bias and d weight. Both null: no reduction (eval mode, no weight and
  // bias gradients wanted); training needs them.
  void* sum_grad = nullptr;
  void* sum_grad_xhat = nullptr;
  void* grad_x = nullptr;        // out (null: only the sums)
  bool training = true;          // subtract the batch-statistics terms from grad_x
  void* workspace = nullptr;     // CUDA: batch_norm_relu_backward_cuda_workspace_bytes()
};

// CPU (OpenMP). Deterministic: the summation order depends only on the shape.
void batch_norm_relu_forward_cpu(const BatchNormReluForwardParams& p);
void batch_norm_relu_backward_cpu(const BatchNormReluBackwardParams& p);

// CUDA. `stream` is a cudaStream_t; deterministic for a given shape and device (no atomics).
void batch_norm_relu_forward_cuda(const BatchNormReluForwardParams& p, void* stream);
int64_t batch_norm_relu_backward_cuda_workspace_bytes(const BatchNormReluShape& shape);
void batch_norm_relu_backward_cuda(const BatchNormReluBackwardParams& p, void* stream);

}  // namespace llkern
