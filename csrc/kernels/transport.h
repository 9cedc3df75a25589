// Transport penalty (TRGL): loss = scale * sum_i r_i^2, r = y - x (or r = y).
//
// Torch-free interface: the binding layer fills these structs from tensors.
// Pointers are to contiguous buffers of `numel` elements of type `dtype`.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace llkern {

struct TransportForwardParams {
  const void* y = nullptr;
  const void* x = nullptr;   // optional: null means r = y
  int64_t numel = 0;
  ScalarKind dtype = ScalarKind::kFloat32;
  double scale = 1.0;        // 1 / (2 tau denom)
  void* loss = nullptr;      // one double for kFloat64 inputs, else one float
  void* grad_y = nullptr;    // optional out: d loss / d y = grad_scale * r, written in the same pass
  double grad_scale = 2.0;   // 2 * scale
  void* workspace = nullptr; // CUDA: transport_forward_cuda_workspace_bytes()
};

struct TransportBackwardParams {
  const void* grad_loss = nullptr;  // scalar on the device: double for kFloat64, else float
  const void* y = nullptr;
  const void* x = nullptr;          // optional
  void* grad_y = nullptr;           // out: dy = grad_loss * grad_scale * r
  int64_t numel = 0;
  ScalarKind dtype = ScalarKind::kFloat32;
  double grad_scale = 1.0;          // 2 * scale
};

// CPU (OpenMP). Deterministic: the summation order depends only on numel.
void transport_forward_cpu(const TransportForwardParams& p);
void transport_backward_cpu(const TransportBackwardParams& p);

// CUDA. `stream` is a cudaStream_t; deterministic for a given numel and device.
int64_t transport_forward_cuda_workspace_bytes(int64_t numel, ScalarKind dtype);
void transport_forward_cuda(const TransportForwardParams& p, void* stream);
void transport_backward_cuda(const TransportBackwardParams& p, void* stream);

}  // namespace llkern
