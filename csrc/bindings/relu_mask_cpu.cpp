// CPU binding of relu_with_mask / relu_mask_backward: tensors -> ReluMask*Params -> kernels/cpu.
#include <torch/library.h>

#include "cpu_alloc.h"
#include "relu_mask_common.h"

namespace llkern {
namespace {

// Contiguous outputs from llkern's pool of large buffers (reused across steps: no page faults on fresh
// memory at every call, which cost this one-pass op more than its own work), other layouts from ATen.
at::Tensor alloc_dense(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  const at::Tensor probe = at::empty_strided(sizes, strides, options.device(at::kMeta));
  if (probe.is_contiguous()) return empty_cpu_large(sizes, options);
  return at::empty_strided(sizes, strides, options);
}

std::tuple<at::Tensor, at::Tensor> relu_with_mask_op(const at::Tensor& x) {
  ReluMaskForwardCall call = prepare_relu_mask_forward(x, alloc_dense);
  if (x.numel() > 0) relu_mask_forward_cpu(call.params);
  return {call.y, call.mask};
}

at::Tensor relu_mask_backward_op(const at::Tensor& grad, const at::Tensor& mask, at::IntArrayRef stride) {
  ReluMaskBackwardCall call = prepare_relu_mask_backward(grad, mask, stride, alloc_dense);
  if (grad.numel() > 0) relu_mask_backward_cpu(call.params);
  return call.grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("relu_with_mask", &relu_with_mask_op);
  m.impl("relu_mask_backward", &relu_mask_backward_op);
}

}  // namespace llkern
