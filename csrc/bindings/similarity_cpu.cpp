// CPU binding of the similarity-matrix losses. The N x N matrix is visited one block of rows at
// a time (at most kBlockElements values): the block's products through ATen (BLAS), its
// elementwise passes through the torch-free kernels of cpu/similarity.cpp. Memory beyond the
// inputs and gradients: one or two blocks and a few values per row.
//
// With with_grad the forward also forms d loss / d inputs (the loss is a leaf of the local
// graph): for each block G = d loss / d s, then d rows += G @ other and d others += G^T @ rows.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../kernels/similarity.h"
#include "common.h"

namespace llkern {
namespace {

constexpr int64_t kBlockElements = int64_t(1) << 20;  // 4 MiB of fp32 per block: fits the L3 cache
constexpr double kNormEps = 1e-12;                     // as F.normalize

struct Normalized {
  at::Tensor rows;  // Acc, contiguous: unit rows (or the inputs when not normalising)
  at::Tensor norm;  // (N, 1) clamped norms; undefined when not normalising
};

void check_embeddings(const char* name, const char* arg, const at::Tensor& z) {
  TORCH_CHECK_VALUE(z.device().is_cpu(), name, ": expected ", arg, " on the CPU, got ", z.device());
  scalar_kind(z, arg);
  TORCH_CHECK_VALUE(z.dim() == 2, name, ": expected ", arg, " of shape (N, d), got ", z.sizes());
  TORCH_CHECK_VALUE(z.size(0) > 0, name, ": expected a non-empty batch, got ", arg, " of shape ", z.sizes());
  TORCH_CHECK_VALUE(z.size(1) > 0, name, ": expected ", arg, " to have d >= 1 features, got shape ", z.sizes());
  TORCH_CHECK_VALUE(at::isfinite(z).all().item<bool>(), name, ": ", arg, " contains NaN or infinite values");
}

at::Tensor check_labels(const char* name, const at::Tensor& labels, int64_t n) {
  TORCH_CHECK_VALUE(labels.device().is_cpu(), name, ": expected labels on the CPU, got ", labels.device());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()) &&
                       labels.scalar_type() != at::kBool,
                   name, ": expected integer labels, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n, name, ": expected labels of shape (", n, "), got ",
                    labels.sizes());
  return labels.to(at::kLong).contiguous();
}

Normalized prepare(const at::Tensor& z, bool normalize) {
  const at::Tensor a = z.to(loss_dtype(z.scalar_type())).contiguous();
  if (!normalize) return {a, at::Tensor()};
  const at::Tensor norm = at::linalg_vector_norm(a, 2, {1}, /*keepdim=*/true).clamp_min(kNormEps);
  return {(a / norm).contiguous(), norm};
}

// d loss / d z from d loss / d u, u = z / max(|z|, eps): project out the radial part and divide
// by the norm (rows at the clamp only divide, as F.normalize's gradient does).
at::Tensor through_normalize(const at::Tensor& grad_u, const Normalized& n) {
  if (!n.norm.defined()) return grad_u;
  const at::Tensor radial = (grad_u * n.rows).sum(1, /*keepdim=*/true);
  const at::Tensor projected = grad_u - n.rows * radial;
  return at::where(n.norm > kNormEps, projected, grad_u) / n.norm;
}

int64_t block_rows(int64_t n) { return std::clamp<int64_t>(kBlockElements / n, 1, n); }

// Per-row |P(i)| (rows with the same label, self excluded) and the sum of squared label counts.
std::pair<at::Tensor, double> label_counts(const at::Tensor& labels) {
  auto [values, inverse, counts] = at::_unique2(labels, /*sorted=*/false, /*return_inverse=*/true,
                                                /*return_counts=*/true);
  const at::Tensor per_row = (counts.index_select(0, inverse.reshape({-1})) - 1).contiguous();
  const double same_pairs = counts.to(at::kDouble).pow(2).sum().item<double>();
  return {per_row, same_pairs};
}

double ordered_sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_cpu(const at::Tensor& z1, const at::Tensor& z2,
                                                             double temperature, bool symmetric, bool normalize,
                                                             bool with_grad) {
  const char* name = "llkern.info_nce";
  check_embeddings(name, "z1", z1);
  check_embeddings(name, "z2", z2);
  TORCH_CHECK_VALUE(z1.sizes() == z2.sizes() && z1.scalar_type() == z2.scalar_type(), name,
                    ": expected z1 and z2 of one shape and dtype, got ", z1.sizes(), " ", z1.scalar_type(), " and ",
                    z2.sizes(), " ", z2.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), name,
                    ": expected temperature to be a finite number > 0, got ", temperature);
  const Normalized n1 = prepare(z1, normalize), n2 = prepare(z2, normalize);
  const at::Tensor u1 = n1.rows, u2 = n2.rows;
  const at::Tensor u1s = u1 / temperature;  // s = u1s u2^T
  const int64_t N = u1.size(0), rows_per_block = block_rows(N);
  const bool is_double = u1.scalar_type() == at::kDouble;
  const at::TensorOptions acc = u1.options();
  at::Tensor block = at::empty({rows_per_block, N}, acc);
  std::vector<double> row_loss(static_cast<size_t>(N));
  at::Tensor grad_u1 = with_grad ? at::empty_like(u1) : at::empty({0}, acc);
  at::Tensor grad_u2 = with_grad ? at::zeros_like(u2) : at::empty({0}, acc);
  at::Tensor row_lse, diagonal, col_max, col_sum;
  if (symmetric) {
    row_lse = at::empty({N}, acc);
    diagonal = at::empty({N}, acc);  // the positives' logits, as the blocks had them
    col_max = at::full({N}, -std::numeric_limits<double>::infinity(), acc);
    col_sum = at::zeros({N}, acc);
  }
  // Multiplies a gradient block G into d u1 (rows r0..) and d u2.
  auto accumulate = [&](const at::Tensor& g, int64_t r0, int64_t rows) {
    at::Tensor rows_grad = grad_u1.narrow(0, r0, rows);
    at::mm_out(rows_grad, g, u2);
    grad_u2.addmm_(g.t(), u1s.narrow(0, r0, rows));
  };
  const bool grad_in_first_pass = with_grad && !symmetric;
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    at::Tensor s = block.narrow(0, 0, rows);
    at::mm_out(s, u1s.narrow(0, r0, rows), u2.t());
    if (symmetric) {
      ColumnLseParams c;
      c.logits = s.data_ptr();
      c.rows = rows;
      c.cols = N;
      c.is_double = is_double;
      c.col_max = col_max.data_ptr();
      c.col_sum = col_sum.data_ptr();
      column_lse_update_cpu(c);
    }
    ContrastRowsParams p;
    p.logits = s.data_ptr();
    p.rows = rows;
    p.cols = N;
    p.row0 = r0;
    p.is_double = is_double;
    p.write_grad = grad_in_first_pass;
    p.grad_scale = 1.0 / double(N);
    if (symmetric) {
      p.lse = row_lse.narrow(0, r0, rows).data_ptr();
      p.diagonal = diagonal.narrow(0, r0, rows).data_ptr();
    }
    p.row_loss = row_loss.data() + r0;
    contrast_rows_cpu(p);
    if (grad_in_first_pass) accumulate(s, r0, rows);
  }
  double loss = ordered_sum(row_loss) / double(N);
  if (symmetric) {
    const at::Tensor col_lse = (col_max + col_sum.log()).contiguous();
    const double col_loss = (col_lse - diagonal).to(at::kDouble).sum().item<double>() / double(N);
    loss = 0.5 * (loss + col_loss);
    if (with_grad) {
      for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
        const int64_t rows = std::min(rows_per_block, N - r0);
        at::Tensor s = block.narrow(0, 0, rows);
        at::mm_out(s, u1s.narrow(0, r0, rows), u2.t());
        SymmetricGradParams g;
        g.logits = s.data_ptr();
        g.rows = rows;
        g.cols = N;
        g.row0 = r0;
        g.is_double = is_double;
        g.row_lse = row_lse.narrow(0, r0, rows).data_ptr();
        g.col_lse = col_lse.data_ptr();
        g.grad_scale = 0.5 / double(N);
        symmetric_grad_cpu(g);
        accumulate(s, r0, rows);
      }
    }
  }
  const at::Tensor loss_tensor = at::full({}, loss, acc);
  if (!with_grad) return {loss_tensor, grad_u1, grad_u2};
  grad_u1.div_(temperature);  // s = u1 u2^T / tau: d u1 = G u2 / tau (d u2 used u1s already)
  return {loss_tensor, through_normalize(grad_u1, n1), through_normalize(grad_u2, n2)};
}

std::tuple<at::Tensor, at::Tensor> supcon_loss_cpu(const at::Tensor& z, const at::Tensor& labels_in,
                                                   double temperature, bool normalize, bool with_grad) {
  const char* name = "llkern.supcon";
  check_embeddings(name, "z", z);
  const at::Tensor labels = check_labels(name, labels_in, z.size(0));
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), name,
                    ": expected temperature to be a finite number > 0, got ", temperature);
  const Normalized nz = prepare(z, normalize);
  const at::Tensor u = nz.rows, us = u / temperature;  // s = us u^T
  const int64_t N = u.size(0), rows_per_block = block_rows(N);
  const at::TensorOptions acc = u.options();
  const at::Tensor positives = label_counts(labels).first;
  const int64_t anchors = (positives > 0).sum().item<int64_t>();
  const double scale = 1.0 / double(std::max<int64_t>(anchors, 1));
  at::Tensor block = at::empty({rows_per_block, N}, acc);
  std::vector<double> row_loss(static_cast<size_t>(N));
  at::Tensor grad_u = with_grad ? at::zeros_like(u) : at::empty({0}, acc);
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    at::Tensor s = block.narrow(0, 0, rows);
    at::mm_out(s, us.narrow(0, r0, rows), u.t());
    ContrastRowsParams p;
    p.logits = s.data_ptr();
    p.rows = rows;
    p.cols = N;
    p.row0 = r0;
    p.is_double = u.scalar_type() == at::kDouble;
    p.labels = labels.data_ptr<int64_t>();
    p.positives = positives.data_ptr<int64_t>();
    p.write_grad = with_grad;
    p.grad_scale = scale;
    p.row_loss = row_loss.data() + r0;
    contrast_rows_cpu(p);
    if (with_grad) {  // s = u u^T / tau: d u = (G + G^T) u / tau
      grad_u.narrow(0, r0, rows).addmm_(s, u);
      grad_u.addmm_(s.t(), u.narrow(0, r0, rows));
    }
  }
  const at::Tensor loss = at::full({}, ordered_sum(row_loss) * scale, acc);
  if (!with_grad) return {loss, grad_u};
  grad_u.div_(temperature);
  return {loss, through_normalize(grad_u, nz)};
}

// Silverman's rule (docs/similarity.md): s (4 / (d + 2))^(1/(d+4)) N^(-1/(d+4)).
double default_sigma(const at::Tensor& t) {
  const int64_t n = t.size(0), d = t.size(1);
  double spread = n > 1 ? t.to(at::kDouble).var(0, /*unbiased=*/false).mean().sqrt().item<double>() : 0.0;
  if (!(spread > 0.0) || !std::isfinite(spread)) spread = 1.0;
  return spread * std::pow(4.0 / double(d + 2), 1.0 / double(d + 4)) * std::pow(double(n), -1.0 / double(d + 4));
}

std::tuple<at::Tensor, at::Tensor> renyi_mutual_information_cpu(const at::Tensor& t_in, const at::Tensor& labels_in,
                                                                std::optional<double> sigma_in,
                                                                std::optional<double> label_sigma, bool with_grad) {
  const char* name = "llkern.renyi_mutual_information";
  check_embeddings(name, "t", t_in);
  const at::Tensor labels = check_labels(name, labels_in, t_in.size(0));
  const double sigma = sigma_in.has_value() ? *sigma_in : default_sigma(t_in);
  TORCH_CHECK_VALUE(sigma > 0 && std::isfinite(sigma), name, ": expected sigma to be a finite number > 0, got ",
                    sigma);
  TORCH_CHECK_VALUE(!label_sigma.has_value() || (*label_sigma > 0 && std::isfinite(*label_sigma)), name,
                    ": expected label_sigma to be a finite number > 0 or None");
  // Centred first: distances do not change, and |t_i|^2 + |t_j|^2 - 2 t_i.t_j no longer cancels
  // a large common offset away. (The gradient of a function of the differences sums to zero
  // over the rows, so it is the same with respect to t as to t - mean.)
  const at::Tensor t_acc = t_in.to(loss_dtype(t_in.scalar_type()));
  const at::Tensor t = (t_acc - t_acc.mean(0, /*keepdim=*/true)).contiguous();
  const int64_t N = t.size(0), rows_per_block = block_rows(N);
  const at::TensorOptions acc = t.options();
  const at::Tensor sq_norms = (t * t).sum(1).contiguous();
  // Off the label blocks B_ij = exp(-1/label_sigma^2), so B_ij^2 = exp(-2/label_sigma^2).
  const double off_sq = label_sigma.has_value() ? std::exp(-2.0 / (*label_sigma * *label_sigma)) : 0.0;
  at::Tensor block = at::empty({rows_per_block, N}, acc);
  at::Tensor same_block = with_grad ? at::empty({rows_per_block, N}, acc) : at::Tensor();
  at::Tensor row_sum = with_grad ? at::empty({N, 1}, acc) : at::Tensor();
  at::Tensor row_sum_same = with_grad ? at::empty({N, 1}, acc) : at::Tensor();
  // L(M)_i = sum_j M_ij (t_i - t_j) for M = K^2 (all pairs) and K^2 [same label]
  at::Tensor spread_all = with_grad ? at::empty_like(t) : at::Tensor();
  at::Tensor spread_same = with_grad ? at::empty_like(t) : at::Tensor();
  std::vector<double> frob(static_cast<size_t>(N)), frob_same(static_cast<size_t>(N));
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    at::Tensor dots = block.narrow(0, 0, rows);
    const at::Tensor t_rows = t.narrow(0, r0, rows);
    at::mm_out(dots, t_rows, t.t());
    GaussianRowsParams p;
    p.dots = dots.data_ptr();
    p.rows = rows;
    p.cols = N;
    p.row0 = r0;
    p.is_double = t.scalar_type() == at::kDouble;
    p.sq_norms = sq_norms.data_ptr();
    p.labels = labels.data_ptr<int64_t>();
    p.inv_sigma_sq = 1.0 / (sigma * sigma);
    p.write_grad = with_grad;
    if (with_grad) {
      p.same_weights = same_block.data_ptr();
      p.row_sum = row_sum.narrow(0, r0, rows).data_ptr();
      p.row_sum_same = row_sum_same.narrow(0, r0, rows).data_ptr();
    }
    p.frob = frob.data() + r0;
    p.frob_same = frob_same.data() + r0;
    gaussian_rows_cpu(p);
    if (with_grad) {
      at::Tensor all = spread_all.narrow(0, r0, rows), same = spread_same.narrow(0, r0, rows);
      at::mm_out(all, dots, t);
      at::mm_out(same, same_block.narrow(0, 0, rows), t);
      all.mul_(-1).addcmul_(row_sum.narrow(0, r0, rows), t_rows);
      same.mul_(-1).addcmul_(row_sum_same.narrow(0, r0, rows), t_rows);
    }
  }
  const double n = double(N), f_all = ordered_sum(frob), f_same = ordered_sum(frob_same);
  const double same_pairs = label_counts(labels).second;
  const double f_labels = same_pairs + off_sq * (n * n - same_pairs);
  const double f_joint = f_same + off_sq * (f_all - f_same);
  // I = S(A) + S(B) - S(A, B), S(M) = -log2(|M|_F^2 / N^2) with tr(M) = N for all three.
  const double mi = std::log2(f_joint) - std::log2(f_all) - std::log2(f_labels) + 2.0 * std::log2(n);
  const at::Tensor value = at::full({}, mi, acc);
  if (!with_grad) return {value, at::empty({0}, acc)};
  // dI/dt_i = -4 / (sigma^2 ln 2) sum_j K_ij^2 (B_ij^2 / F_joint - 1 / F_all) (t_i - t_j)
  const double c = -4.0 / (sigma * sigma * std::log(2.0));
  const at::Tensor grad = spread_all.mul_(c * (off_sq / f_joint - 1.0 / f_all))
                              .add_(spread_same, c * (1.0 - off_sq) / f_joint);
  return {value, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("info_nce", &info_nce_cpu);
  m.impl("supcon_loss", &supcon_loss_cpu);
  m.impl("renyi_mutual_information", &renyi_mutual_information_cpu);
}

}  // namespace llkern
