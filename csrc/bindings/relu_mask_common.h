// Input checks and output allocation of relu_with_mask / relu_mask_backward, shared by the CPU and
// CUDA bindings.
#pragma once

#include <vector>

#include "../kernels/relu_mask.h"
#include "common.h"

namespace llkern {

inline int64_t relu_mask_bytes(int64_t numel) { return (numel + 7) / 8; }

// Same memory order: equal strides wherever the size is above 1 (a size-1 dim's stride is arbitrary).
inline bool same_layout(const at::Tensor& a, at::IntArrayRef strides) {
  if (!a.is_non_overlapping_and_dense()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != strides[d]) return false;
  }
  return true;
}

struct ReluMaskForwardCall {
  at::Tensor x, y, mask;
  ReluMaskForwardParams params;
};

// y has x's strides when x is dense (contiguous, channels_last, any permutation), else the dense strides
// of x's dim order (at::empty_like): the mask follows y's memory order. `alloc(sizes, strides, options)`
// allocates a dense tensor (each device binding brings its own allocator).
template <typename Alloc>
ReluMaskForwardCall prepare_relu_mask_forward(const at::Tensor& x, Alloc alloc) {
  const ScalarKind kind = scalar_kind(x, "x");
  ReluMaskForwardCall call;
  {
    const at::Tensor layout = same_layout(x, x.strides()) ? x : at::empty_like(x, x.options().device(at::kMeta));
    call.y = alloc(x.sizes(), layout.strides(), x.options());
  }
  call.x = same_layout(x, call.y.strides()) ? x : call.y.copy_(x);
  call.mask = at::empty({relu_mask_bytes(x.numel())}, x.options().dtype(at::kByte));
  ReluMaskForwardParams& p = call.params;
  p.x = call.x.data_ptr();
  p.y = call.y.data_ptr();
  p.mask = call.mask.data_ptr<uint8_t>();
  p.numel = x.numel();
  p.dtype = kind;
  return call;
}

struct ReluMaskBackwardCall {
  at::Tensor grad, mask, grad_x;
  ReluMaskBackwardParams params;
};

// `stride` is the stride of relu_with_mask's output y: the mask's bits follow its memory order, and grad_x
// gets it (grad is copied into that order first when it has another).
template <typename Alloc>
ReluMaskBackwardCall prepare_relu_mask_backward(const at::Tensor& grad, const at::Tensor& mask,
                                                at::IntArrayRef stride, Alloc alloc) {
  const ScalarKind kind = scalar_kind(grad, "grad");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "llkern.relu_mask_backward: expected mask to be uint8, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.numel() == relu_mask_bytes(grad.numel()),
                    "llkern.relu_mask_backward: expected mask of shape [", relu_mask_bytes(grad.numel()),
                    "] (one bit per element of grad), got ", mask.sizes());
  TORCH_CHECK(mask.device() == grad.device(), "llkern.relu_mask_backward: expected grad and mask on the same device, got ",
              grad.device(), " and ", mask.device());
  TORCH_CHECK_VALUE(int64_t(stride.size()) == grad.dim(), "llkern.relu_mask_backward: expected stride to have ",
                    grad.dim(), " entries (one per dim of grad), got ", stride.size());
  ReluMaskBackwardCall call;
  TORCH_CHECK_VALUE(at::empty_strided(grad.sizes(), stride, grad.options().device(at::kMeta)).is_non_overlapping_and_dense(),
                    "llkern.relu_mask_backward: expected stride ", stride, " to be a dense layout of shape ",
                    grad.sizes());
  call.grad_x = alloc(grad.sizes(), stride, grad.options());
  // In the mask's order already: read grad as it is; else copy it into grad_x and work in place.
  call.grad = same_layout(grad, stride) ? grad : call.grad_x.copy_(grad);
  call.mask = mask.contiguous();
  ReluMaskBackwardParams& p = call.params;
  p.grad = call.grad.data_ptr();
  p.mask = call.mask.data_ptr<uint8_t>();
  p.grad_x = call.grad_x.data_ptr();
  p.numel = grad.numel();
  p.dtype = kind;
  return call;
}

}  // namespace llkern
