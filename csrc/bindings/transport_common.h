// Input checks and scale of the transport penalty, shared by the CPU and CUDA bindings.
#pragma once

#include <optional>

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
