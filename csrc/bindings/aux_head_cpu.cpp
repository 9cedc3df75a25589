// CPU binding of the fused auxiliary head. Matrix products through ATen (BLAS) in row chunks,
// the rest through the torch-free kernels of cpu/aux_head.cpp. Logits exist one chunk at a time.
#include <torch/library.h>

#include <algorithm>

#include "aux_head_common.h"
#include "cpu_alloc.h"

namespace llkern {
namespace {

constexpr int64_t kChunkElements = int64_t(1) << 22;  // logits per chunk: 16 MiB in fp32

// Checks every target and returns how many are not ignore_index.
int64_t check_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < target.numel(); ++i) {
    if (t[i] == ignore_index) continue;
    TORCH_CHECK_VALUE(t[i] >= 0 && t[i] < classes, "llkern.aux_head_loss: target ", t[i], " at position ", i,
                      " is out of range for ", classes, " classes (ignore_index=", ignore_index, ")");
    ++valid;
  }
  return valid;
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The outputs, d rows and d weight in the dtypes the op returns (computed in float32 for bfloat16 features).
Outputs finish(double loss_sum, int64_t correct, int64_t valid, c10::string_view reduction,
               const at::TensorOptions& acc_options, const at::Tensor& features, const AuxHeadShape& s,
               const at::Tensor& grad_rows, const at::Tensor& grad_weight, at::Tensor grad_bias) {
  const double loss_value = valid == 0 ? 0.0 : (reduction == "mean" ? loss_sum / double(valid) : loss_sum);
  return {at::full({}, loss_value, acc_options), at::full({}, correct, features.options().dtype(at::kLong)),
          grad_rows.to(grad_rows_dtype(features.scalar_type(), s.pooled)),
          grad_weight.to(grad_weight_dtype(features.scalar_type())), std::move(grad_bias)};
}

Outputs aux_head_loss_cpu(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::string_view reduction,
    bool with_grad, bool /*low_memory: bfloat16 heads compute in float32 here*/) {
  const AuxHeadShape s = check_aux_head_inputs(features, weight, bias, target, label_smoothing, reduction);
  const at::ScalarType acc = loss_dtype(features.scalar_type());
  const at::TensorOptions acc_options = features.options().dtype(acc);
  const at::Tensor labels = target.reshape({-1}).to(at::kLong).contiguous();
  const int64_t valid = check_targets(labels, s.classes, ignore_index);
  const double grad_scale = reduction == "mean" ? 1.0 / double(std::max<int64_t>(valid, 1)) : 1.0;
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor grad_rows = with_grad ? empty_cpu_large({s.rows, s.channels}, acc_options) : at::empty({0}, acc_options);
  double loss_sum = 0.0;
  int64_t correct = 0;

  at::Tensor rows;
  const at::Tensor f = s.pooled && !s.channels_last ? features.contiguous() : features;
  PoolParams pool;
  if (s.pooled) {
    rows = at::empty({s.rows, s.channels}, acc_options);
    pool = pool_params(f, s, rows);
  } else {
    rows = features.reshape({s.rows, s.channels}).contiguous();
  }

  if (fused_head_fits(s.rows, s.classes, s.channels)) {  // small head: one pass, no logits matrix
    // the pass pools image features itself, block by block or first (kernels/aux_head.h)
    at::Tensor grad_weight = with_grad ? at::empty({s.classes, s.channels}, acc_options) : at::empty({0}, acc_options);
    at::Tensor grad_bias = with_grad && b.defined() ? at::empty({s.classes}, acc_options) : at::empty({0}, acc_options);
    FusedHeadParams p;
    p.rows_data = rows.data_ptr();
    p.pool = s.pooled ? &pool : nullptr;
    p.dtype = scalar_kind(rows, "rows");
    p.rows = s.rows;
    p.channels = s.channels;
    p.weight = w.data_ptr();
    p.bias = b.defined() ? b.data_ptr() : nullptr;
    p.target = labels.data_ptr<int64_t>();
    p.classes = s.classes;
    p.ignore_index = ignore_index;
    p.label_smoothing = label_smoothing;
    p.grad_scale = grad_scale;
    p.write_grad = with_grad;
    p.grad_rows = with_grad ? grad_rows.data_ptr() : nullptr;
    p.grad_weight = with_grad ? grad_weight.data_ptr() : nullptr;
    p.grad_bias = grad_bias.numel() > 0 ? grad_bias.data_ptr() : nullptr;
    p.loss_sum = &loss_sum;
    p.correct = &correct;
    fused_head_cpu(p);
    return finish(loss_sum, correct, valid, reduction, acc_options, features, s, grad_rows, grad_weight, grad_bias);
  }

  // Large head: logits one chunk of rows at a time, matrix products through ATen (BLAS).
  if (s.pooled) pool_cpu(pool);
  rows = rows.to(acc);
  at::Tensor grad_weight = with_grad ? at::zeros({s.classes, s.channels}, acc_options) : at::empty({0}, acc_options);
  at::Tensor grad_bias = with_grad && bias.has_value() ? at::zeros({s.classes}, acc_options) : at::empty({0}, acc_options);

  CrossEntropyRowsParams base;
  base.classes = s.classes;
  base.ignore_index = ignore_index;
  base.label_smoothing = label_smoothing;
  base.grad_scale = grad_scale;
  base.write_grad = with_grad;
  base.is_double = acc == at::kDouble;
  base.loss_sum = &loss_sum;
  base.correct = &correct;
  chunked_head(rows, w, b, labels, kChunkElements, /*low_memory=*/false, base, grad_rows, grad_weight, grad_bias,
               [](CrossEntropyRowsParams& p, int64_t) { cross_entropy_rows_cpu(p); });
  return finish(loss_sum, correct, valid, reduction, acc_options, features, s, grad_rows, grad_weight, grad_bias);
}

// d features = grad_loss / (H W) * grad_pooled broadcast over H, W, in the features' dtype and layout.
at::Tensor aux_head_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_pooled, at::IntArrayRef sizes,
                                 bool channels_last, at::ScalarType dtype) {
  check_backward_inputs(grad_loss, grad_pooled, sizes, dtype);
  const at::TensorOptions options = grad_pooled.options().dtype(dtype);
  at::Tensor out = channels_last
                       ? empty_cpu_large({sizes[0], sizes[2], sizes[3], sizes[1]}, options).permute({0, 3, 1, 2})
                       : empty_cpu_large(sizes, options);
  const BroadcastCall call = prepare_broadcast(grad_loss, grad_pooled, sizes, channels_last, out);
  broadcast_pooled_grad_cpu(call.params);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("aux_head_loss", &aux_head_loss_cpu);
  m.impl("aux_head_backward", &aux_head_backward_cpu);
}

}  // namespace llkern
