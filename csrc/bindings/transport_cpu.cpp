// CPU binding of the transport penalty: tensors -> TransportParams -> kernels/cpu.
#include <torch/library.h>

#include "../kernels/transport.h"
#include "cpu_alloc.h"
#include "transport_common.h"

namespace llkern {
namespace {

std::tuple<at::Tensor, at::Tensor> transport_penalty_cpu(const at::Tensor& y, const std::optional<at::Tensor>& x,
                                                         double tau, c10::string_view reduction, bool with_grad) {
  check_transport_inputs(y, x, tau, reduction);
  const at::Tensor yc = y.contiguous();
  const at::Tensor xc = x.has_value() ? x->contiguous() : at::Tensor();
  at::Tensor loss = at::empty({}, y.options().dtype(loss_dtype(y.scalar_type())));
  TransportForwardParams p;
  p.y = yc.data_ptr();
  p.x = xc.defined() ? xc.data_ptr() : nullptr;
  p.numel = y.numel();
  p.dtype = scalar_kind(y, "y");
  p.scale = transport_scale(y, tau, reduction);
  p.loss = loss.data_ptr();
  at::Tensor grad_y = with_grad ? empty_cpu_large(y.sizes(), y.options()) : at::empty({0}, y.options());
  p.grad_y = with_grad ? grad_y.data_ptr() : nullptr;
  p.grad_scale = 2.0 * p.scale;
  transport_forward_cpu(p);
  return {loss, grad_y};
}

at::Tensor transport_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                          const std::optional<at::Tensor>& x, double tau,
                                          c10::string_view reduction) {
  check_transport_inputs(y, x, tau, reduction);
  TORCH_CHECK_VALUE(grad.numel() == 1, "llkern.transport_penalty_backward: expected a scalar grad");
  const at::Tensor yc = y.contiguous();
  const at::Tensor xc = x.has_value() ? x->contiguous() : at::Tensor();
  const at::Tensor gc = grad.to(loss_dtype(y.scalar_type())).contiguous();
  at::Tensor dy = empty_cpu_large(y.sizes(), y.options());
  TransportBackwardParams p;
  p.grad_loss = gc.data_ptr();
  p.y = yc.data_ptr();
  p.x = xc.defined() ? xc.data_ptr() : nullptr;
  p.grad_y = dy.data_ptr();
  p.numel = y.numel();
  p.dtype = scalar_kind(y, "y");
  p.grad_scale = 2.0 * transport_scale(y, tau, reduction);
  transport_backward_cpu(p);
  return dy;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("transport_penalty", &transport_penalty_cpu);
  m.impl("transport_penalty_backward", &transport_penalty_backward_cpu);
}

}  // namespace llkern
