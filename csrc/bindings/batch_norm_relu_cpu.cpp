// CPU binding of batch_norm_relu / batch_norm_relu_backward: tensors -> BatchNormRelu*Params -> kernels/cpu.
#include <torch/library.h>

#include "batch_norm_relu_common.h"
#include "cpu_alloc.h"

namespace llkern {
namespace {

at::Tensor alloc_like(const at::Tensor& like, at::MemoryFormat format) {
  if (format == at::MemoryFormat::Contiguous) return empty_cpu_large(like.sizes(), like.options());
  return at::empty(like.sizes(), like.options().memory_format(format));
}

at::Tensor batch_norm_relu_op(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                               const at::Tensor& invstd, bool /*training: the backward's concern*/) {
  BatchNormReluForwardCall call = prepare_batch_norm_relu_forward(input, weight, bias, mean, invstd, alloc_like);
  batch_norm_relu_forward_cpu(call.params);
  return call.y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_op(
    const at::Tensor& grad, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd, bool training,
    bool input_grad) {
  BatchNormReluBackwardCall call = prepare_batch_norm_relu_backward(grad, input, weight, bias, mean, invstd, training,
                                                                    input_grad, alloc_like);
  batch_norm_relu_backward_cpu(call.params);
  return batch_norm_relu_backward_outputs(call, input, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_op);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_op);
}

}  // namespace llkern
