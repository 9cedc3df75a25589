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
  double* loss_sum = nullptr;  // out: sum of the chunk's row losses (host memory on the CPU)
  int64_t* correct = nullptr;  // out: number of correct predictions in the chunk
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

void pool_cpu(const PoolParams& p);
void cross_entropy_rows_cpu(const CrossEntropyRowsParams& p);
void broadcast_pooled_grad_cpu(const BroadcastParams& p);

}  // namespace llkern
