// CUDA binding of batch_norm_relu / batch_norm_relu_backward: tensors -> BatchNormRelu*Params -> kernels/cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "batch_norm_relu_common.h"

namespace llkern {
namespace {

at::Tensor alloc_like(const at::Tensor& like, at::MemoryFormat format) {
  return at::empty_like(like, like.options(), format);
}

at::Tensor batch_norm_relu_op(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
                              bool /*training: the backward's concern*/) {
  // prepare checks every input before anything else: mixed devices get its clear error, not the guard's.
  BatchNormReluForwardCall call = prepare_batch_norm_relu_forward(input, weight, bias, mean, invstd, alloc_like);
  const c10::cuda::CUDAGuard guard(input.device());
  batch_norm_relu_forward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_op(
    const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool input_grad) {
  BatchNormReluBackwardCall call = prepare_batch_norm_relu_backward(grad, input, weight, bias, mean, invstd, training,
                                                                    input_grad, alloc_like);
  const c10::cuda::CUDAGuard guard(input.device());
  // The per-(channel, slice) partial sums: deterministic, no atomics.
  at::Tensor workspace = at::empty({batch_norm_relu_backward_cuda_workspace_bytes(call.params.shape)},
                                   input.options().dtype(at::kByte));
  call.params.workspace = workspace.data_ptr();
  batch_norm_relu_backward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return batch_norm_relu_backward_outputs(call, input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_op);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_op);
}

}  // namespace llkern
