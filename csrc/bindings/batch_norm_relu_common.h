// Input checks, layouts and per-channel coefficients of batch_norm_relu / batch_norm_relu_backward,
// shared by the CPU and CUDA bindings.
#pragma once

#include <optional>

#include "../kernels/batch_norm_relu.h"
#include "common.h"

namespace llkern {

inline at::ScalarType bn_compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_batch_norm_relu_inputs(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                         const at::Tensor& invstd) {
  scalar_kind(input, "input");
  TORCH_CHECK_VALUE(input.dim() >= 2, "llkern.", op, ": expected input of shape (N, C, *), got ", input.sizes());
  TORCH_CHECK_VALUE(input.numel() > 0, "llkern.", op, ": expected input to be non-empty, got shape ", input.sizes());
  const int64_t channels = input.size(1);
  const at::ScalarType compute = bn_compute_dtype(input.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"mean", &mean}, {"invstd", &invstd}}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, "llkern.", op, ": expected ", name, " of shape [",
                      channels, "] (the channels of input), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == compute, "llkern.", op, ": expected ", name, " to be ", compute,
                     " for ", input.scalar_type(), " input, got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), "llkern.", op, ": expected ", name, " on the device of input (",
                input.device(), "), got ", t->device());
  }
  for (const auto& [name, t] : {std::pair<const char*, const std::optional<at::Tensor>*>{"weight", &weight},
                                {"bias", &bias}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == channels, "llkern.", op, ": expected ", name, " of shape [",
                      channels, "] (the channels of input), got ", v.sizes());
    TORCH_CHECK_TYPE(v.scalar_type() == input.scalar_type() || v.scalar_type() == compute, "llkern.", op,
                     ": expected ", name, " to be ", input.scalar_type(), " or ", compute, ", got ", v.scalar_type());
    TORCH_CHECK(v.device() == input.device(), "llkern.", op, ": expected ", name, " on the device of input (",
                input.device(), "), got ", v.device());
  }
}

// scale = weight * invstd and shift = bias - mean * scale, per channel in the compute type, computed as
// llkern.nn.activation_memory's pure-PyTorch path does (same ops, same order), so that either path's
// recomputation reproduces the other's forward.
inline std::pair<at::Tensor, at::Tensor> batch_norm_relu_coefficients(const std::optional<at::Tensor>& weight,
                                                                      const std::optional<at::Tensor>& bias,
                                                                      const at::Tensor& mean,
                                                                      const at::Tensor& invstd) {
  at::Tensor scale = weight.has_value() ? weight->to(invstd.scalar_type()) * invstd : invstd;
  at::Tensor shift = mean.neg() * scale;
  if (bias.has_value()) shift = shift + bias->to(invstd.scalar_type());
  return {scale.contiguous(), shift.contiguous()};
}

// The layout the kernels read: contiguous (N, C, *) or channels_last (N, *, C); anything else is made
// contiguous. Returns the dense input and fills `shape`.
inline at::Tensor batch_norm_relu_layout(const at::Tensor& input, BatchNormReluShape& shape) {
  shape.batch = input.size(0);
  shape.channels = input.size(1);
  shape.inner = input.numel() / (shape.batch * shape.channels);
  shape.dtype = scalar_kind(input, "input");
  if (input.dim() == 2) {  // (N, C) row-major is (N, 1, C)
    shape.channels_last = true;
    return input.contiguous();
  }
  const auto format = input.dim() == 4   ? at::MemoryFormat::ChannelsLast
                      : input.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                         : at::MemoryFormat::Contiguous;
  shape.channels_last = format != at::MemoryFormat::Contiguous && !input.is_contiguous() &&
                        input.is_contiguous(format);
  return shape.channels_last ? input : input.contiguous();
}

inline at::MemoryFormat batch_norm_relu_format(const at::Tensor& dense, const BatchNormReluShape& shape) {
  if (!shape.channels_last || dense.dim() == 2) return at::MemoryFormat::Contiguous;
  return dense.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

struct BatchNormReluForwardCall {
  at::Tensor x, y, scale, shift;
  BatchNormReluForwardParams params;
};

template <typename Alloc>
BatchNormReluForwardCall prepare_batch_norm_relu_forward(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                                         const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                                                         const at::Tensor& invstd, Alloc alloc) {
  check_batch_norm_relu_inputs("batch_norm_relu", input, weight, bias, mean, invstd);
  BatchNormReluForwardCall call;
  BatchNormReluForwardParams& p = call.params;
  call.x = batch_norm_relu_layout(input, p.shape);
  call.y = alloc(call.x, batch_norm_relu_format(call.x, p.shape));
  std::tie(call.scale, call.shift) = batch_norm_relu_coefficients(weight, bias, mean, invstd);
  p.x = call.x.data_ptr();
  p.y = call.y.data_ptr();
  p.scale = call.scale.data_ptr();
  p.shift = call.shift.data_ptr();
  return call;
}

struct BatchNormReluBackwardCall {
  at::Tensor grad, x, scale, shift, mean, invstd, sum_grad, sum_grad_xhat, grad_x;
  BatchNormReluBackwardParams params;
};

// grad_x is allocated when input_grad; the sums when training or when weight or bias is given.
template <typename Alloc>
BatchNormReluBackwardCall prepare_batch_norm_relu_backward(const at::Tensor& grad, const at::Tensor& input,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& mean, const at::Tensor& invstd,
                                                           bool training, bool input_grad, Alloc alloc) {
  const char* op = "batch_norm_relu_backward";
  check_batch_norm_relu_inputs(op, input, weight, bias, mean, invstd);
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes(), "llkern.", op, ": expected grad of the shape of input ",
                    input.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == input.scalar_type(), "llkern.", op, ": expected grad to have the dtype of input (",
                   input.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == input.device(), "llkern.", op, ": expected grad on the device of input (",
              input.device(), "), got ", grad.device());
  BatchNormReluBackwardCall call;
  BatchNormReluBackwardParams& p = call.params;
  call.x = batch_norm_relu_layout(input, p.shape);
  const at::MemoryFormat format = batch_norm_relu_format(call.x, p.shape);
  call.grad = grad.contiguous(format);
  std::tie(call.scale, call.shift) = batch_norm_relu_coefficients(weight, bias, mean, invstd);
  call.mean = mean.contiguous();
  call.invstd = invstd.contiguous();
  if (training || weight.has_value() || bias.has_value()) {
    call.sum_grad = at::empty({p.shape.channels}, mean.options());
    call.sum_grad_xhat = at::empty({p.shape.channels}, mean.options());
    p.sum_grad = call.sum_grad.data_ptr();
    p.sum_grad_xhat = call.sum_grad_xhat.data_ptr();
  }
  if (input_grad) {
    call.grad_x = alloc(call.x, format);
    p.grad_x = call.grad_x.data_ptr();
  }
  p.grad = call.grad.data_ptr();
  p.x = call.x.data_ptr();
  p.scale = call.scale.data_ptr();
  p.shift = call.shift.data_ptr();
  p.mean = call.mean.data_ptr();
  p.invstd = call.invstd.data_ptr();
  p.training = training;
  return call;
}

// (grad_input, grad_weight, grad_bias): an empty [0] tensor for each that was not asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_outputs(
    const BatchNormReluBackwardCall& call, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias) {
  // Distinct empty tensors: outputs must not alias one another.
  auto none = [&]() { return at::empty({0}, input.options()); };
  at::Tensor grad_x = call.grad_x.defined() ? call.grad_x : none();
  at::Tensor grad_weight = weight.has_value() ? call.sum_grad_xhat.to(weight->scalar_type()) : none();
  at::Tensor grad_bias = bias.has_value() ? call.sum_grad.to(bias->scalar_type()) : none();
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace llkern
