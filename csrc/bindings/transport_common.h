// Input checks and scale of the transport penalty, shared by the CPU and CUDA bindings.
#pragma once

#include <optional>

#include "../kernels/transport.h"
#include "common.h"

namespace llkern {

inline void check_transport_inputs(const at::Tensor& y, const std::optional<at::Tensor>& x, double tau,
                                   c10::string_view reduction) {
  scalar_kind(y, "y");
  TORCH_CHECK_VALUE(y.numel() > 0, "llkern.transport_penalty: expected y to be non-empty, got shape ", y.sizes());
  TORCH_CHECK_VALUE(tau > 0.0 && std::isfinite(tau), "llkern.transport_penalty: expected tau > 0, got ", tau);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum_per_sample",
                    "llkern.transport_penalty: expected reduction to be 'mean' or 'sum_per_sample', got '",
                    reduction, "'");
  TORCH_CHECK_VALUE(reduction == "mean" || y.dim() >= 1,
                    "llkern.transport_penalty: reduction='sum_per_sample' needs y with a batch dimension");
  if (x.has_value()) {
    TORCH_CHECK_VALUE(x->sizes() == y.sizes(), "llkern.transport_penalty: expected y and x to have the same shape, got ",
                      y.sizes(), " and ", x->sizes());
    TORCH_CHECK_TYPE(x->scalar_type() == y.scalar_type(),
                     "llkern.transport_penalty: expected x to have the dtype of y, got ", x->scalar_type(), " and ",
                     y.scalar_type());
    TORCH_CHECK(x->device() == y.device(), "llkern.transport_penalty: expected y and x on the same device, got ",
                y.device(), " and ", x->device());
  }
}

// loss = scale * sum(r^2): "mean" divides by numel, "sum_per_sample" by the batch size.
inline double transport_scale(const at::Tensor& y, double tau, c10::string_view reduction) {
  const double denom = reduction == "mean" ? double(y.numel()) : double(y.size(0));
  return 1.0 / (2.0 * tau * denom);
}

}  // namespace llkern

namespace llkern {

// Contiguous inputs and allocated outputs of one call, and the kernel parameters pointing at them.
// `alloc` allocates a tensor shaped like y (each device binding brings its own allocator).
struct TransportForwardCall {
  at::Tensor y, x, loss, grad_y;
  TransportForwardParams params;
};

struct TransportBackwardCall {
  at::Tensor grad, y, x, grad_y;
  TransportBackwardParams params;
};

template <typename Alloc>
TransportForwardCall prepare_transport_forward(const at::Tensor& y, const std::optional<at::Tensor>& x, double tau,
                                               c10::string_view reduction, bool with_grad, Alloc alloc) {
  check_transport_inputs(y, x, tau, reduction);
  TransportForwardCall call;
  call.y = y.contiguous();
  call.x = x.has_value() ? x->contiguous() : at::Tensor();
  call.loss = at::empty({}, y.options().dtype(loss_dtype(y.scalar_type())));
  call.grad_y = with_grad ? alloc(y) : at::empty({0}, y.options());
  TransportForwardParams& p = call.params;
  p.y = call.y.data_ptr();
  p.x = call.x.defined() ? call.x.data_ptr() : nullptr;
  p.numel = y.numel();
  p.dtype = scalar_kind(y, "y");
  p.scale = transport_scale(y, tau, reduction);
  p.loss = call.loss.data_ptr();
  p.grad_y = with_grad ? call.grad_y.data_ptr() : nullptr;
  p.grad_scale = 2.0 * p.scale;
  return call;
}

template <typename Alloc>
TransportBackwardCall prepare_transport_backward(const at::Tensor& grad, const at::Tensor& y,
                                                 const std::optional<at::Tensor>& x, double tau,
                                                 c10::string_view reduction, Alloc alloc) {
  check_transport_inputs(y, x, tau, reduction);
  TORCH_CHECK_VALUE(grad.numel() == 1, "llkern.transport_penalty_backward: expected a scalar grad, got shape ",
                    grad.sizes());
  TransportBackwardCall call;
  call.grad = grad.to(y.device(), loss_dtype(y.scalar_type())).contiguous();
  call.y = y.contiguous();
  call.x = x.has_value() ? x->contiguous() : at::Tensor();
  call.grad_y = alloc(y);
  TransportBackwardParams& p = call.params;
  p.grad_loss = call.grad.data_ptr();
  p.y = call.y.data_ptr();
  p.x = call.x.defined() ? call.x.data_ptr() : nullptr;
  p.grad_y = call.grad_y.data_ptr();
  p.numel = y.numel();
  p.dtype = scalar_kind(y, "y");
  p.grad_scale = 2.0 * transport_scale(y, tau, reduction);
  return call;
}

}  // namespace llkern
