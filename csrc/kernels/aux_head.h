// Fused auxiliary head (pool -> linear -> cross-entropy): the torch-free parts.
//
// The binding runs the matrix products (ATen/BLAS, cuBLAS) in row chunks and calls these
// kernels for what surrounds them: pooling the features, the cross-entropy pass over a chunk
// of logits (loss, correct count, and d loss / d logits written over the logits), and the
// broadcast of the pooled gradient back to the features' shape and layout.
// "Acc" is float, or double for kFloat64 features.
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace llkern {

// Features (batch, channels, spatial) in NCHW order, or (batch, spatial, channels) when
// channels_last; pooled (batch, channels) Acc = mean over spatial.
struct PoolParams {
  const void* features = nullptr;
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t batch = 0, channels = 0, spatial = 0;
  bool channels_last = false;
  void* pooled = nullptr;
};

// One chunk of logits (rows x classes, Acc, contiguous). Per row: LSE, loss
//   (1 - eps) (LSE - z_y) + eps (LSE - mean_k z_k),
// first argmax == target, and with write_grad the logits become
//   grad_scale * (softmax - (1 - eps) onehot(y) - eps / classes)   (zero rows for ignored targets).
struct CrossEntropyRowsParams {
  void* logits = nullptr;
  const int64_t* target = nullptr;
  int64_t rows = 0, classes = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double grad_scale = 1.0;
  bool write_grad = false;
  bool is_double = false;
  // CUDA: logits held in bfloat16 (the low-memory head), read and overwritten as bfloat16, computed in float.
  bool bfloat16_logits = false;
  double* loss_sum = nullptr;  // CPU out: sum of the chunk's row losses, added to
  int64_t* correct = nullptr;  // CPU out: number of correct predictions in the chunk, added to
  void* row_loss = nullptr;        // CUDA out: per-row loss (Acc), 0 for ignored rows
  int32_t* row_correct = nullptr;  // CUDA out: per-row 1 if correct
  // CUDA: the target counts on the device (CountTargetsParams): grad_scale is formed there from them
  // ("mean": 1 / valid targets), so the host never waits for them. A row whose target is out of range
  // gets a NaN loss and NaN gradients (no host check by default; never an out-of-bounds read).
  const int64_t* counts = nullptr;
  bool mean = true;
};

// CUDA: loss = scale * sum(row_loss), correct = sum(row_correct), in a fixed order.
struct FinishParams {
  const void* row_loss = nullptr;
  const int32_t* row_correct = nullptr;
  int64_t rows = 0;
  // scale 1 / valid rows ("mean"), 1 ("sum"), 0 when every target is ignored: from the device counts
  const int64_t* counts = nullptr;
  bool mean = true;
  bool is_double = false;
  void* loss = nullptr;        // Acc scalar
  int64_t* correct = nullptr;  // int64 scalar
};

// CUDA: counts[0] = targets != ignore_index, counts[1] = those out of [0, classes).
struct CountTargetsParams {
  const int64_t* target = nullptr;
  int64_t n = 0, classes = 0, ignore_index = -100;
  int64_t* counts = nullptr;  // two int64, zeroed by the caller
};

// grad_features[b, c, s] = grad_loss * scale * grad_pooled[b, c] in the features' dtype and layout.
struct BroadcastParams {
  const void* grad_pooled = nullptr;  // (batch, channels) Acc
  const void* grad_loss = nullptr;    // scalar Acc, on the device
  double scale = 1.0;                 // 1 / spatial
  void* grad_features = nullptr;
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t batch = 0, channels = 0, spatial = 0;
  bool channels_last = false;
};

// The whole head in one pass over the (pooled) rows, for small heads (classes x channels small
// enough that per-block copies of d weight are cheap): logits = W x + b, cross-entropy and,
// with write_grad, d rows, d weight, d bias, without forming a logits matrix. Rows go in fixed
// blocks whose partial sums are added in order, so results do not depend on the thread count.
// Image features are pooled in the same pass when `pool` is set: each block pools its own rows
// into rows_data just before the head reads them (still in cache), in one parallel region; with
// fewer than two blocks per thread they are pooled first, over all (b, c) planes in parallel.
struct FusedHeadParams {
  const void* rows_data = nullptr;  // (rows, C), contiguous; the pooled rows (Acc) when pool is set
  const PoolParams* pool = nullptr;  // image features pooled into rows_data block by block, or null
  ScalarKind dtype = ScalarKind::kFloat32;
  int64_t rows = 0, channels = 0;
  const void* weight = nullptr;  // (classes, C) Acc, contiguous
  const void* bias = nullptr;    // (classes) Acc or null
  const int64_t* target = nullptr;
  int64_t classes = 0, ignore_index = -100;
  double label_smoothing = 0.0, grad_scale = 1.0;
  bool write_grad = false;
  void* grad_rows = nullptr;    // (rows, C) Acc
  void* grad_weight = nullptr;  // (classes, C) Acc, overwritten
  void* grad_bias = nullptr;    // (classes) Acc or null, overwritten
  double* loss_sum = nullptr;   // out (host)
  int64_t* correct = nullptr;   // out (host)
};

// Rows per block of the fused pass, and whether a head is small enough for it.
constexpr int64_t kFusedBlockRows = 32;
inline bool fused_head_fits(int64_t rows, int64_t classes, int64_t channels) {
  const int64_t blocks = (rows + kFusedBlockRows - 1) / kFusedBlockRows;
  return classes * channels <= 65536 && blocks * (classes * channels + classes) <= (int64_t(16) << 20);
}

void fused_head_cpu(const FusedHeadParams& p);
void pool_cpu(const PoolParams& p);
void cross_entropy_rows_cpu(const CrossEntropyRowsParams& p);
void broadcast_pooled_grad_cpu(const BroadcastParams& p);

// CUDA (`stream` is a cudaStream_t).
void pool_cuda(const PoolParams& p, void* stream);
void count_targets_cuda(const CountTargetsParams& p, void* stream);
void cross_entropy_rows_cuda(const CrossEntropyRowsParams& p, void* stream);
void finish_cross_entropy_cuda(const FinishParams& p, void* stream);
void broadcast_pooled_grad_cuda(const BroadcastParams& p, void* stream);

}  // namespace llkern
