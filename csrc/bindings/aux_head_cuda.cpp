// CUDA binding of the fused auxiliary head: cuBLAS (through ATen) for the matrix products in row
// chunks, cuda/aux_head.cu for pooling, the cross-entropy rows, the final sum and the broadcast.
// No host synchronisation: the count of non-ignored targets that scales the loss and the gradient stays
// on the device, and a target out of range makes its row's loss and gradients NaN (the Python wrapper
// raises a clear error instead when llkern.value_checks() is on, at the cost of one sync).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "aux_head_common.h"

namespace llkern {
namespace {

// Logits per chunk: 32 MiB in fp32 (and 16 MiB more for their bfloat16 copy with bfloat16 features); at
// 32000 classes that is 256 rows a product, still enough to keep cuBLAS near its peak. The low-memory
// head holds 48 MiB of bfloat16 logits (768 rows at 32000 classes: 22 chunks for 16384 tokens, so 22
// bfloat16 roundings of d weight) and nothing else of that size. (tests/cuda_emu builds with small chunks,
// so that several run.)
#ifndef LLKERN_CUDA_AUX_HEAD_CHUNK_ELEMENTS
#define LLKERN_CUDA_AUX_HEAD_CHUNK_ELEMENTS (int64_t(1) << 23)
#endif
constexpr int64_t kChunkElements = LLKERN_CUDA_AUX_HEAD_CHUNK_ELEMENTS;
constexpr int64_t kLowMemoryChunkElements = 3 * kChunkElements;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aux_head_loss_cuda(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::string_view reduction,
    bool with_grad, bool low_memory) {
  const AuxHeadShape s = check_aux_head_inputs(features, weight, bias, target, label_smoothing, reduction);
  const c10::cuda::CUDAGuard guard(features.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const at::ScalarType acc = loss_dtype(features.scalar_type());
  const at::TensorOptions acc_options = features.options().dtype(acc);
  const at::Tensor labels = target.reshape({-1}).to(at::kLong).contiguous();

  at::Tensor counts = at::zeros({2}, labels.options());
  CountTargetsParams cp;
  cp.target = labels.data_ptr<int64_t>();
  cp.n = labels.numel();
  cp.classes = s.classes;
  cp.ignore_index = ignore_index;
  cp.counts = counts.data_ptr<int64_t>();
  count_targets_cuda(cp, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // bfloat16 features: the products take bfloat16 operands (pooled rows rounded to it, as eager pooling
  // would leave them; the weight as it is) with float32 accumulation (chunked_head; float16 keeps float32
  // products, see low_precision_operands).
  const bool low = low_precision_operands(features.scalar_type());
  low_memory = low_memory && low;  // (a no-op for other dtypes)
  at::Tensor rows;
  if (s.pooled) {
    const at::Tensor f = s.channels_last ? features : features.contiguous();
    rows = at::empty({s.rows, s.channels}, acc_options);
    pool_cuda(pool_params(f, s, rows), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (low) rows = rows.to(features.scalar_type());
  } else {
    rows = features.reshape({s.rows, s.channels});
    rows = (low ? rows : rows.to(acc)).contiguous();
  }
  const at::Tensor w = (low ? weight : weight.to(acc)).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(acc) : at::Tensor();
  const at::ScalarType rows_dtype = grad_rows_dtype(features.scalar_type(), s.pooled);
  const at::ScalarType weight_dtype = grad_weight_dtype(features.scalar_type());
  at::Tensor grad_rows = with_grad ? at::empty({s.rows, s.channels}, features.options().dtype(rows_dtype))
                                  : at::empty({0}, features.options().dtype(rows_dtype));
  // (accumulated in float32 unless low_memory; the low-memory head's first chunk overwrites it)
  at::Tensor grad_weight = !with_grad ? at::empty({0}, features.options().dtype(weight_dtype))
                           : low_memory ? at::empty({s.classes, s.channels}, features.options().dtype(weight_dtype))
                                        : at::zeros({s.classes, s.channels}, acc_options);
  at::Tensor grad_bias = with_grad && bias.has_value() ? at::zeros({s.classes}, acc_options) : at::empty({0}, acc_options);
  at::Tensor row_loss = at::empty({s.rows}, acc_options);
  at::Tensor row_correct = at::empty({s.rows}, features.options().dtype(at::kInt));

  CrossEntropyRowsParams base;
  base.classes = s.classes;
  base.ignore_index = ignore_index;
  base.label_smoothing = label_smoothing;
  base.counts = counts.data_ptr<int64_t>();
  base.mean = reduction == "mean";
  base.write_grad = with_grad;
  base.is_double = acc == at::kDouble;
  const int64_t chunk_elements = low_memory ? kLowMemoryChunkElements : kChunkElements;
  chunked_head(rows, w, b, labels, chunk_elements, low_memory, base, grad_rows, grad_weight, grad_bias,
               [&](CrossEntropyRowsParams& p, int64_t start) {
                 p.row_loss = static_cast<char*>(row_loss.data_ptr()) + start * row_loss.element_size();
                 p.row_correct = row_correct.data_ptr<int32_t>() + start;
                 cross_entropy_rows_cuda(p, stream);
                 C10_CUDA_KERNEL_LAUNCH_CHECK();
               });
  at::Tensor loss = at::empty({}, acc_options);
  at::Tensor correct = at::empty({}, features.options().dtype(at::kLong));
  FinishParams fp;
  fp.row_loss = row_loss.data_ptr();
  fp.row_correct = row_correct.data_ptr<int32_t>();
  fp.rows = s.rows;
  fp.counts = counts.data_ptr<int64_t>();
  fp.mean = reduction == "mean";
  fp.is_double = acc == at::kDouble;
  fp.loss = loss.data_ptr();
  fp.correct = correct.data_ptr<int64_t>();
  finish_cross_entropy_cuda(fp, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, correct, grad_rows, grad_weight.to(weight_dtype), grad_bias};
}

at::Tensor aux_head_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_pooled, at::IntArrayRef sizes,
                                  bool channels_last, at::ScalarType dtype) {
  check_backward_inputs(grad_loss, grad_pooled, sizes, dtype);
  const c10::cuda::CUDAGuard guard(grad_pooled.device());
  const at::TensorOptions options = grad_pooled.options().dtype(dtype);
  at::Tensor out = at::empty(sizes, options.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                        : at::MemoryFormat::Contiguous));
  const BroadcastCall call = prepare_broadcast(grad_loss, grad_pooled, sizes, channels_last, out);
  broadcast_pooled_grad_cuda(call.params, at::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("aux_head_loss", &aux_head_loss_cuda);
  m.impl("aux_head_backward", &aux_head_backward_cuda);
}

}  // namespace llkern
