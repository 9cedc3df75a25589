// Similarity-matrix losses (InfoNCE, supervised contrastive, Rényi-2 mutual information): the
// torch-free parts.
//
// The binding walks the N x N matrix one block of rows at a time: it forms the block's
// products with a matrix multiply (ATen/BLAS), calls these kernels for everything elementwise
// (log-sum-exp statistics, losses, and the block's d loss / d s written over it), and multiplies
// again for the gradients. No kernel here holds more than the block it is given.
// "Acc" is float, or double when is_double.
#pragma once

#include <cstdint>

namespace llkern {

// One block of contrastive logits s (rows x cols, Acc, row-major), global rows row0.. .
//   InfoNCE (labels == nullptr): the positive of row i is column row0 + i;
//     loss_i = LSE_j s_ij - s_i,row0+i; d loss_i / d s_ij = softmax_j - [j == row0 + i].
//   Supervised contrastive (labels given): column row0 + i (self) is no candidate; the positives
//     of row i are the other columns with its label (counted in the pass);
//     loss_i = -(1/|P|) sum_p (s_ip - LSE_{a != i} s_ia), and 0 with a zero gradient when |P| = 0;
//     d loss_i / d s_ia = softmax_{a != i} - [a in P] / |P|.
// With write_grad the block becomes grad_scale * d loss_i / d s (zero at self for supcon).
struct ContrastRowsParams {
  void* logits = nullptr;
  int64_t rows = 0, cols = 0, row0 = 0;
  bool is_double = false;
  const int64_t* labels = nullptr;  // labels of all columns (supervised only)
  bool write_grad = false;
  double grad_scale = 1.0;
  void* lse = nullptr;         // out, nullable: per-row LSE (Acc, rows)
  void* diagonal = nullptr;    // out, nullable (InfoNCE): s_i,row0+i (Acc, rows)
  double* row_loss = nullptr;  // out: per-row loss (rows)
  double* row_anchor = nullptr;  // out, nullable (supervised): 1 where the row has a positive, else 0
};
void contrast_rows_cpu(const ContrastRowsParams& p);

// Running column log-sum-exp: merges the block's columns into (col_max, col_sum), where
// col_sum = sum_i exp(s_ij - col_max_j) over the rows seen so far. Start from (-inf, 0).
struct ColumnLseParams {
  const void* logits = nullptr;
  int64_t rows = 0, cols = 0;
  bool is_double = false;
  void* col_max = nullptr;  // in/out, Acc, cols
  void* col_sum = nullptr;  // in/out, Acc, cols
};
void column_lse_update_cpu(const ColumnLseParams& p);

// Symmetric InfoNCE's gradient block: s becomes
//   grad_scale * (exp(s_ij - row_lse_i) + exp(s_ij - col_lse_j) - 2 [j == row0 + i]).
struct SymmetricGradParams {
  void* logits = nullptr;
  int64_t rows = 0, cols = 0, row0 = 0;
  bool is_double = false;
  const void* row_lse = nullptr;  // Acc, rows (this block's)
  const void* col_lse = nullptr;  // Acc, cols (all)
  double grad_scale = 1.0;
};
void symmetric_grad_cpu(const SymmetricGradParams& p);

// One block of the Gaussian Gram matrix's squares for the Rényi-2 estimator. In: dots
// t_i . t_j; then K_ij^2 = exp(-|t_i - t_j|^2 / sigma^2), the distance from the squared norms
// (clamped at 0). Per row: the sum of K_ij^2 and of K_ij^2 over the columns with row i's label
// (both including the diagonal's K_ii^2 = 1). With write_grad the block becomes the weights
// K_ij^2 and same_weights K_ij^2 [y_j == y_i], both 0 on the diagonal, with their row sums.
struct GaussianRowsParams {
  void* dots = nullptr;          // in: rows x cols dots; out (write_grad): K^2
  void* same_weights = nullptr;  // out (write_grad): rows x cols
  int64_t rows = 0, cols = 0, row0 = 0;
  bool is_double = false;
  const void* sq_norms = nullptr;  // |t_j|^2 of all rows (Acc)
  const int64_t* labels = nullptr;
  double inv_sigma_sq = 1.0;
  bool write_grad = false;
  void* row_sum = nullptr;       // out (write_grad): Acc, rows
  void* row_sum_same = nullptr;  // out (write_grad): Acc, rows
  double* frob = nullptr;        // out: per-row sum_j K_ij^2
  double* frob_same = nullptr;   // out: per-row sum over equal labels
  double* same_count = nullptr;  // out: per-row number of columns with row i's label (self included)
};
void gaussian_rows_cpu(const GaussianRowsParams& p);

// CUDA (`stream` is a cudaStream_t); the parameters point to device memory.
void contrast_rows_cuda(const ContrastRowsParams& p, void* stream);
void column_lse_update_cuda(const ColumnLseParams& p, void* stream);
void symmetric_grad_cuda(const SymmetricGradParams& p, void* stream);
void gaussian_rows_cuda(const GaussianRowsParams& p, void* stream);

}  // namespace llkern
