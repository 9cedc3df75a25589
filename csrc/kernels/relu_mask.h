// ReLU with a 1-bit mask: y = relu(x) and the mask "not (x <= 0)" packed 8 elements per byte in one
// pass; the backward grad_x = mask ? grad : 0 in one pass (an infinite or NaN gradient where the mask
// is 0 gives 0, as PyTorch's threshold_backward does).
//
// Torch-free interface: the binding layer fills these structs from tensors. The tensors are dense;
// element i is the i-th element in memory order, and it is bit (i % 8) of mask byte i / 8 (the
// least significant bit first). Bits past numel in the last byte are written as 0.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace llkern {

struct ReluMaskForwardParams {
  const void* x = nullptr;
  void* y = nullptr;           // may equal x (in place)
  uint8_t* mask = nullptr;     // ceil(numel / 8) bytes
  int64_t numel = 0;
  ScalarKind dtype = ScalarKind::kFloat32;
};

struct ReluMaskBackwardParams {
  const void* grad = nullptr;
  const uint8_t* mask = nullptr;
  void* grad_x = nullptr;      // may equal grad
  int64_t numel = 0;
  ScalarKind dtype = ScalarKind::kFloat32;
};

// CPU (OpenMP).
void relu_mask_forward_cpu(const ReluMaskForwardParams& p);
void relu_mask_backward_cpu(const ReluMaskBackwardParams& p);

// CUDA. `stream` is a cudaStream_t.
void relu_mask_forward_cuda(const ReluMaskForwardParams& p, void* stream);
void relu_mask_backward_cuda(const ReluMaskBackwardParams& p, void* stream);

}  // namespace llkern
