// CPU binding of the transport penalty: tensors -> TransportParams -> kernels/cpu.
#include <torch/library.h>

#include "cpu_alloc.h"
#include "transport_common.h"

namespace llkern {
namespace {

at::Tensor alloc_like(const at::Tensor& y) { return empty_cpu_large(y.sizes(), y.options()); }

std::tuple<at::Tensor, at::Tensor> transport_penalty_cpu(const at::Tensor& y, const std::optional<at::Tensor>& x,
                                                         double tau, c10::string_view reduction, bool with_grad) {
  TransportForwardCall call = prepare_transport_forward(y, x, tau, reduction, with_grad, alloc_like);
  transport_forward_cpu(call.params);
  return {call.loss, call.grad_y};
}

at::Tensor transport_penalty_backward_cpu(const at::Tensor& grad, const at::Tensor& y,
                                          const std::optional<at::Tensor>& x, double tau,
                                          c10::string_view reduction) {
  TransportBackwardCall call = prepare_transport_backward(grad, y, x, tau, reduction, alloc_like);
  transport_backward_cpu(call.params);
  return call.grad_y;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("transport_penalty", &transport_penalty_cpu);
  m.impl("transport_penalty_backward", &transport_penalty_backward_cpu);
}

}  // namespace llkern
