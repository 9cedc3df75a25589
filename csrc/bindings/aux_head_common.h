// Input checks and shape facts of the fused auxiliary head, shared by the CPU and CUDA bindings.
#pragma once

#include <algorithm>
#include <optional>

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "../kernels/aux_head.h"
#include "common.h"

namespace llkern {

struct AuxHeadShape {
  int64_t rows = 0;      // B (pooled features) or B*T (tokens)
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // H*W for 4-D features, else 1
  int64_t classes = 0;   // K
  bool pooled = false;   // 4-D features
  bool channels_last = false;
};

inline AuxHeadShape check_aux_head_inputs(const at::Tensor& features, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                          double label_smoothing, c10::string_view reduction) {
  const char* op = "llkern.aux_head_loss";
  scalar_kind(features, "features");
  const int64_t dim = features.dim();
  TORCH_CHECK_VALUE(dim >= 2 && dim <= 4, op, ": expected features of shape (B,C), (B,T,C) or (B,C,H,W), got ",
                    features.sizes());
  AuxHeadShape s;
  s.pooled = dim == 4;
  s.channels = dim == 4 ? features.size(1) : features.size(-1);
  s.rows = dim == 3 ? features.size(0) * features.size(1) : features.size(0);
  s.spatial = dim == 4 ? features.size(2) * features.size(3) : 1;
  s.channels_last = dim == 4 && !features.is_contiguous() && features.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK_VALUE(features.numel() > 0, op, ": expected a non-empty batch, got features of shape ",
                    features.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == s.channels && weight.size(0) >= 1, op,
                    ": expected weight of shape (classes, ", s.channels, "), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == features.scalar_type(), op,
                   ": expected weight to have the dtype of features, got ", weight.scalar_type(), " and ",
                   features.scalar_type());
  TORCH_CHECK(weight.device() == features.device(), op, ": expected weight on the device of features, got ",
              weight.device(), " and ", features.device());
  s.classes = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.classes, op, ": expected bias of shape (",
                      s.classes, "), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == features.scalar_type(), op,
                     ": expected bias to have the dtype of features, got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == features.device(), op, ": expected bias on the device of features");
  }
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
                   ": expected target of dtype int64 or int32, got ", target.scalar_type());
  TORCH_CHECK(target.device() == features.device(), op, ": expected target on the device of features, got ",
              target.device(), " and ", features.device());
  const bool shape_ok = dim == 3 ? (target.dim() == 2 && target.size(0) == features.size(0) &&
                                    target.size(1) == features.size(1))
                                 : (target.dim() == 1 && target.size(0) == features.size(0));
  TORCH_CHECK_VALUE(shape_ok, op, ": expected target of shape ",
                    dim == 3 ? "(B, T) = " : "(B,) = ", dim == 3 ? features.sizes().slice(0, 2) : features.sizes().slice(0, 1),
                    ", got ", target.sizes());
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
                    ": expected label_smoothing in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum", op,
                    ": expected reduction to be 'mean' or 'sum', got '", reduction, "'");
  return s;
}

// d rows and d weight are returned in the features' dtype for bfloat16 features (d rows of 4-D features, the
// pooled gradient that aux_head_backward broadcasts, stays in float32), else in the accumulation dtype:
// float32 for float32 and float16, float64 for float64. On every device, so the fake kernel needs no device.
inline at::ScalarType grad_rows_dtype(at::ScalarType features, bool pooled) {
  return features == at::kBFloat16 && !pooled ? at::kBFloat16 : loss_dtype(features);
}
inline at::ScalarType grad_weight_dtype(at::ScalarType features) {
  return features == at::kBFloat16 ? at::kBFloat16 : loss_dtype(features);
}

// Rows per chunk of logits: `chunk_elements` logits, in whole multiples of 64 rows once there are 128 or
// more (cuBLAS tiles).
inline int64_t chunk_rows(int64_t chunk_elements, int64_t classes) {
  const int64_t rows = std::max<int64_t>(1, chunk_elements / classes);
  return rows >= 128 ? rows / 64 * 64 : rows;
}

// Large heads: the logits one chunk of rows at a time (rows @ W^T + b through ATen: BLAS or
// cuBLAS), turned into d loss / d logits in place by `rows_pass(params, start)` (the device's
// cross-entropy rows kernel), then the gradient products. `base` holds every field of the
// cross-entropy parameters but the chunk's logits, targets and row count.
//
// `rows` and `w` are the products' operands: in the accumulation dtype (fp32 or fp64), or, for bfloat16
// features on a GPU, in bfloat16, as F.linear takes them: the products then run on the tensor cores with
// float32 accumulation. There, d loss / d logits is rounded to bfloat16 for the two gradient products, as
// autocast's backward of F.linear rounds it, and each chunk's d rows is one product over all classes,
// written in bfloat16 (`grad_rows` is bfloat16). d weight sums over the chunks: in float32 by default (4 bytes
// a weight); with `low_memory`, in bfloat16 (`grad_weight` is bfloat16), rounded once a chunk. The low-memory
// head also holds its logits in bfloat16 (as F.linear returns them; the
// rows pass reads them in float and writes d loss / d logits over them), so a chunk of logits costs
// 2 bytes each instead of 4 + 2.
template <typename RowsPass>
void chunked_head(const at::Tensor& rows, const at::Tensor& w, const at::Tensor& b, const at::Tensor& labels,
                  int64_t chunk_elements, bool low_memory, const CrossEntropyRowsParams& base,
                  at::Tensor& grad_rows, at::Tensor& grad_weight, at::Tensor& grad_bias, RowsPass rows_pass) {
  const bool low = low_precision_operands(rows.scalar_type());
  low_memory = low_memory && low;
  TORCH_CHECK(!low_memory || !base.write_grad || grad_weight.scalar_type() == rows.scalar_type(),
              "llkern.aux_head_loss: internal error: the low-memory head sums d weight in ", rows.scalar_type(),
              ", got ", grad_weight.scalar_type());
  TORCH_CHECK(low || grad_rows.numel() == 0 || grad_rows.scalar_type() == rows.scalar_type(),
              "llkern.aux_head_loss: internal error: d rows in ", grad_rows.scalar_type(), " for rows in ",
              rows.scalar_type());
  // The op is already below autocast (its inputs were cast by the caller); with the autocast key still
  // live, addmm/mm would return 16-bit logits that the rows kernel reads as Acc (issue 15, A1).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t chunk = chunk_rows(chunk_elements, base.classes);
  const at::Tensor b16 = low_memory && b.defined() ? b.to(rows.scalar_type()) : at::Tensor();
  for (int64_t start = 0; start < rows.size(0); start += chunk) {
    const int64_t len = std::min(chunk, rows.size(0) - start);
    const at::Tensor x = rows.narrow(0, start, len);
    at::Tensor logits;
    if (low_memory) {  // bfloat16 logits, the bias added before the one rounding (as F.linear does)
      logits = b16.defined() ? at::addmm(b16, x, w.t()) : at::mm(x, w.t());
    } else if (low) {
      logits = mm_float32(x, w.t());
      if (b.defined()) logits.add_(b);
    } else {
      logits = b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
    }
    CrossEntropyRowsParams p = base;
    p.logits = logits.data_ptr();
    p.target = labels.data_ptr<int64_t>() + start;
    p.rows = len;
    p.bfloat16_logits = low_memory;
    rows_pass(p, start);
    if (base.write_grad) {  // logits now hold d loss / d logits
      at::Tensor grad_x = grad_rows.narrow(0, start, len);
      // Ignored rows have zero d loss / d logits, but 0 * inf = NaN: leave their features out of dW
      // (as the fused CPU path does), so non-finite features there cannot poison the weights.
      const at::Tensor ignored = labels.narrow(0, start, len).eq(base.ignore_index).unsqueeze(1);
      const at::Tensor x_kept = x.masked_fill(ignored, 0);
      const at::Tensor g = low && !low_memory ? logits.to(rows.scalar_type()) : logits;
      product_into(grad_x, g, w);  // (bfloat16 d rows from a bfloat16 product; pooled rows: float32)
      if (low_memory && start == 0) {
        at::mm_out(grad_weight, g.t(), x_kept);
      } else {
        product_add(grad_weight, g.t(), x_kept);
      }
      if (grad_bias.numel() > 0) grad_bias.add_(at::sum(logits, at::IntArrayRef{0}, false, grad_bias.scalar_type()));
    }
  }
}

// The broadcast reads grad_pooled as the accumulation type of `dtype` and writes `sizes` elements of
// `dtype`: every one of these is checked, since a mismatch would read or write out of bounds.
inline void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& grad_pooled, at::IntArrayRef sizes,
                                  at::ScalarType dtype) {
  const char* op = "llkern.aux_head_backward";
  TORCH_CHECK_VALUE(sizes.size() == 4, op, ": expected 4-D sizes, got ", sizes);
  TORCH_CHECK_VALUE(sizes[0] >= 1 && sizes[1] >= 1 && sizes[2] >= 1 && sizes[3] >= 1, op,
                    ": expected positive sizes, got ", sizes);
  TORCH_CHECK_VALUE(grad_pooled.dim() == 2 && grad_pooled.size(0) == sizes[0] && grad_pooled.size(1) == sizes[1],
                    op, ": grad_pooled of shape ", grad_pooled.sizes(), " does not match ", sizes);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                   ": expected dtype to be float32, float64, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_TYPE(grad_pooled.scalar_type() == loss_dtype(dtype), op, ": expected grad_pooled of dtype ",
                   loss_dtype(dtype), " for features of dtype ", dtype, ", got ", grad_pooled.scalar_type());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": expected a scalar grad_loss, got shape ", grad_loss.sizes());
}

// Contiguous inputs of the broadcast into `out` (allocated by the device binding), and its parameters.
struct BroadcastCall {
  at::Tensor grad_pooled, grad_loss;
  BroadcastParams params;
};

inline BroadcastCall prepare_broadcast(const at::Tensor& grad_loss, const at::Tensor& grad_pooled,
                                       at::IntArrayRef sizes, bool channels_last, at::Tensor& out) {
  BroadcastCall call;
  call.grad_pooled = grad_pooled.contiguous();
  call.grad_loss = grad_loss.to(grad_pooled.device(), grad_pooled.scalar_type()).contiguous();
  BroadcastParams& p = call.params;
  p.grad_pooled = call.grad_pooled.data_ptr();
  p.grad_loss = call.grad_loss.data_ptr();
  p.scale = 1.0 / double(sizes[2] * sizes[3]);
  p.grad_features = out.data_ptr();
  p.dtype = scalar_kind(out, "grad_features");
  p.batch = sizes[0];
  p.channels = sizes[1];
  p.spatial = sizes[2] * sizes[3];
  p.channels_last = channels_last;
  return call;
}

// Pooling of `features` (contiguous, or channels_last as `s` says) into `rows` (B x C, Acc).
inline PoolParams pool_params(const at::Tensor& features, const AuxHeadShape& s, at::Tensor& rows) {
  PoolParams p;
  p.features = features.data_ptr();
  p.dtype = scalar_kind(features, "features");
  p.batch = s.rows;
  p.channels = s.channels;
  p.spatial = s.spatial;
  p.channels_last = s.channels_last;
  p.pooled = rows.data_ptr();
  return p;
}

}  // namespace llkern
