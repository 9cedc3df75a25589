// CUDA binding of the transport penalty: tensors -> TransportParams -> kernels/cuda.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/transport.h"
#include "transport_common.h"

namespace llkern {
namespace {

std::tuple<at::Tensor, at::Tensor> transport_penalty_cuda(const at::Tensor& y, const std::optional<at::Tensor>& x,
                                                         double tau, c10::string_view reduction, bool with_grad) {
  check_transport_inputs(y, x, tau, reduction);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor xc = x.has_value() ? x->contiguous() : at::Tensor();
  const ScalarKind kind = scalar_kind(y, "y");
  at::Tensor loss = at::empty({}, y.options().dtype(loss_dtype(y.scalar_type())));
  at::Tensor workspace =
      at::empty({transport_forward_cuda_workspace_bytes(y.numel(), kind)}, y.options().dtype(at::kByte));
  TransportForwardParams p;
  p.y = yc.data_ptr();
  p.x = xc.defined() ? xc.data_ptr() : nullptr;
  p.numel = y.numel();
  p.dtype = kind;
  p.scale = transport_scale(y, tau, reduction);
  p.loss = loss.data_ptr();
  at::Tensor grad_y = with_grad ? at::empty(y.sizes(), y.options()) : at::empty({0}, y.options());
  p.grad_y = with_grad ? grad_y.data_ptr() : nullptr;
  p.grad_scale = 2.0 * p.scale;
  p.workspace = workspace.data_ptr();
  transport_forward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad_y};
}

at::Tensor transport_penalty_backward_cuda(const at::Tensor& grad, const at::Tensor& y,
                                           const std::optional<at::Tensor>& x, double tau,
                                           c10::string_view reduction) {
  check_transport_inputs(y, x, tau, reduction);
  TORCH_CHECK_VALUE(grad.numel() == 1, "llkern.transport_penalty_backward: expected a scalar grad");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor xc = x.has_value() ? x->contiguous() : at::Tensor();
  const at::Tensor gc = grad.to(y.device(), loss_dtype(y.scalar_type())).contiguous();
  at::Tensor dy = at::empty(y.sizes(), y.options());
  TransportBackwardParams p;
  p.grad_loss = gc.data_ptr();
  p.y = yc.data_ptr();
  p.x = xc.defined() ? xc.data_ptr() : nullptr;
  p.grad_y = dy.data_ptr();
  p.numel = y.numel();
  p.dtype = scalar_kind(y, "y");
  p.grad_scale = 2.0 * transport_scale(y, tau, reduction);
  transport_backward_cuda(p, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dy;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("transport_penalty", &transport_penalty_cuda);
  m.impl("transport_penalty_backward", &transport_penalty_backward_cuda);
}

}  // namespace llkern
