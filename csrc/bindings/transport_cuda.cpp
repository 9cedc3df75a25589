// CUDA binding of the transport penalty: tensors -> TransportParams -> kernels/cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "transport_common.h"

namespace llkern {
namespace {

at::Tensor alloc_like(const at::Tensor& y) { return at::empty(y.sizes(), y.options()); }

std::tuple<at::Tensor, at::Tensor> transport_penalty_cuda(const at::Tensor& y, const std::optional<at::Tensor>& x,
                                                          double tau, c10::string_view reduction, bool with_grad) {
  check_transport_inputs(y, x, tau, reduction);  // before the guard: a clear error for mixed devices
  const c10::cuda::CUDAGuard guard(y.device());
  TransportForwardCall call = prepare_transport_forward(y, x, tau, reduction, with_grad, alloc_like);
  at::Tensor workspace = at::empty({transport_forward_cuda_workspace_bytes(y.numel(), call.params.dtype)},
                                   y.options().dtype(at::kByte));
  call.params.workspace = workspace.data_ptr();
  transport_forward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {call.loss, call.grad_y};
}

at::Tensor transport_penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                           const std::optional<at::Tensor>& x, double tau,
                                           c10::string_view reduction) {
  check_transport_inputs(y, x, tau, reduction);
  const c10::cuda::CUDAGuard guard(y.device());
  TransportBackwardCall call = prepare_transport_backward(grad, y, x, tau, reduction, alloc_like);
  transport_backward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return call.grad_y;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("transport_penalty", &transport_penalty_cuda);
  m.impl("transport_penalty_backward", &transport_penalty_backward_cuda);
}

}  // namespace llkern
