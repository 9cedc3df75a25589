// CUDA binding of relu_with_mask / relu_mask_backward: tensors -> ReluMask*Params -> kernels/cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "relu_mask_common.h"

namespace llkern {
namespace {

at::Tensor alloc_dense(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  return at::empty_strided(sizes, strides, options);
}

std::tuple<at::Tensor, at::Tensor> relu_with_mask_op(const at::Tensor& x) {
  // prepare checks x before it allocates anything; the guard then only has to pick the stream.
  ReluMaskForwardCall call = prepare_relu_mask_forward(x, alloc_dense);
  const c10::cuda::CUDAGuard guard(x.device());
  relu_mask_forward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {call.y, call.mask};
}

at::Tensor relu_mask_backward_op(const at::Tensor& grad, const at::Tensor& mask, at::IntArrayRef stride) {
  // Checks first: a mask on another device than grad gets prepare's clear error, not the guard's.
  ReluMaskBackwardCall call = prepare_relu_mask_backward(grad, mask, stride, alloc_dense);
  const c10::cuda::CUDAGuard guard(grad.device());
  relu_mask_backward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("relu_with_mask", &relu_with_mask_op);
  m.impl("relu_mask_backward", &relu_mask_backward_op);
}

}  // namespace llkern
