// The similarity-matrix losses' block driver, shared by the CPU and CUDA bindings. The N x N
// matrix is visited one block of rows at a time (at most Device::kBlockElements values): the
// block's products through ATen (BLAS / cuBLAS), its elementwise passes through the device's
// torch-free kernels (Device::contrast_rows etc.). Memory beyond the inputs and gradients: one
// or two blocks and a few values per row.
//
// With with_grad the forward also forms d loss / d inputs (the loss is a leaf of the local
// graph): for each block G = d loss / d s, then d rows += G @ other and d others += G^T @ rows.
// Scalars that depend on the data (the number of anchors, the kernel width, the Frobenius
// norms) stay 0-d tensors on the device: no host synchronisation on a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

#include "../kernels/similarity.h"
#include "common.h"

namespace llkern {
namespace similarity {

constexpr double kNormEps = 1e-12;  // as F.normalize

inline void check_embeddings(const char* name, const char* arg, const at::Tensor& z) {
  scalar_kind(z, arg);
  TORCH_CHECK_VALUE(z.dim() == 2, name, ": expected ", arg, " of shape (N, d), got ", z.sizes());
  TORCH_CHECK_VALUE(z.size(0) > 0, name, ": expected a non-empty batch, got ", arg, " of shape ", z.sizes());
  TORCH_CHECK_VALUE(z.size(1) > 0, name, ": expected ", arg, " to have d >= 1 features, got shape ", z.sizes());
  // (on a GPU this would be a synchronisation: the Python wrapper checks there)
  if (z.device().is_cpu()) {
    TORCH_CHECK_VALUE(at::isfinite(z).all().item<bool>(), name, ": ", arg, " contains NaN or infinite values");
  }
}

inline at::Tensor check_labels(const char* name, const at::Tensor& labels, const at::Tensor& rows) {
  TORCH_CHECK_VALUE(labels.device() == rows.device(), name, ": expected labels on the device of the embeddings (",
                    rows.device(), "), got ", labels.device());
  TORCH_CHECK_TYPE(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()) &&
                       labels.scalar_type() != at::kBool,
                   name, ": expected integer labels, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == rows.size(0), name, ": expected labels of shape (",
                    rows.size(0), "), got ", labels.sizes());
  return labels.to(at::kLong).contiguous();
}

inline void check_temperature(const char* name, double temperature) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), name,
                    ": expected temperature to be a finite number > 0, got ", temperature);
}

struct Normalized {
  at::Tensor rows;  // Acc, contiguous: unit rows (or the inputs when not normalising)
  at::Tensor norm;  // (N, 1) clamped norms; undefined when not normalising
};

inline Normalized prepare(const at::Tensor& z, bool normalize) {
  const at::Tensor a = z.to(loss_dtype(z.scalar_type())).contiguous();
  if (!normalize) return {a, at::Tensor()};
  const at::Tensor norm = at::linalg_vector_norm(a, 2, {1}, /*keepdim=*/true).clamp_min(kNormEps);
  return {(a / norm).contiguous(), norm};
}

// d loss / d z from d loss / d u, u = z / max(|z|, eps): project out the radial part and divide
// by the norm (rows at the clamp only divide, as F.normalize's gradient does).
inline at::Tensor through_normalize(const at::Tensor& grad_u, const Normalized& n) {
  if (!n.norm.defined()) return grad_u;
  const at::Tensor radial = (grad_u * n.rows).sum(1, /*keepdim=*/true);
  const at::Tensor projected = grad_u - n.rows * radial;
  return at::where(n.norm > kNormEps, projected, grad_u) / n.norm;
}

// The operand of the block products for rows `t` (Acc) of the input `z`: t itself, or on a GPU
// (Device::kLowPrecisionProducts) for bfloat16 inputs its bfloat16 copy (see low_precision_operands), so that the N x N x d
// products run on the tensor cores (float32 accumulation and results, as F.linear's); the gradient
// blocks are rounded to that dtype for their products too. InfoNCE and supervised contrastive only:
// Rényi's Gaussian kernel forms distances from these products, which 16-bit operands would spoil.
template <typename Device>
at::Tensor product_operand(const at::Tensor& t, const at::Tensor& z) {
  return Device::kLowPrecisionProducts && low_precision_operands(z.scalar_type()) ? t.to(z.scalar_type()).contiguous()
                                                                                     : t;
}

template <typename Device>
int64_t block_rows(int64_t n) {
  return std::clamp<int64_t>(Device::kBlockElements / n, 1, n);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce(const at::Tensor& z1, const at::Tensor& z2,
                                                         double temperature, bool symmetric, bool normalize,
                                                         bool with_grad) {
  const char* name = "llkern.info_nce";
  check_embeddings(name, "z1", z1);
  check_embeddings(name, "z2", z2);
  TORCH_CHECK_VALUE(z1.sizes() == z2.sizes() && z1.scalar_type() == z2.scalar_type() && z1.device() == z2.device(),
                    name, ": expected z1 and z2 of one shape and dtype on one device, got ", z1.sizes(), " ",
                    z1.scalar_type(), " and ", z2.sizes(), " ", z2.scalar_type());
  check_temperature(name, temperature);
  const Normalized n1 = prepare(z1, normalize), n2 = prepare(z2, normalize);
  const at::Tensor u1 = n1.rows, u2 = n2.rows;
  const at::Tensor u1s = u1 / temperature;  // s = u1s u2^T
  // the products' operands: 16-bit copies on a GPU for 16-bit inputs (see product_operand)
  const at::Tensor u1s_mm = product_operand<Device>(u1s, z1), u2_mm = product_operand<Device>(u2, z1);
  const int64_t N = u1.size(0), rows_per_block = block_rows<Device>(N);
  const bool is_double = u1.scalar_type() == at::kDouble;
  const at::TensorOptions acc = u1.options();
  at::Tensor block = at::empty({rows_per_block, N}, acc);
  at::Tensor row_loss = at::empty({N}, acc.dtype(at::kDouble));
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
    const at::Tensor g_mm = g.to(u2_mm.scalar_type());
    product_into(rows_grad, g_mm, u2_mm);
    product_add(grad_u2, g_mm.t(), u1s_mm.narrow(0, r0, rows));
  };
  const bool grad_in_first_pass = with_grad && !symmetric;
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    at::Tensor s = block.narrow(0, 0, rows);
    product_into(s, u1s_mm.narrow(0, r0, rows), u2_mm.t());
    if (symmetric) {
      ColumnLseParams c;
      c.logits = s.data_ptr();
      c.rows = rows;
      c.cols = N;
      c.is_double = is_double;
      c.col_max = col_max.data_ptr();
      c.col_sum = col_sum.data_ptr();
      Device::column_lse_update(c);
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
    p.row_loss = row_loss.data_ptr<double>() + r0;
    Device::contrast_rows(p);
    if (grad_in_first_pass) accumulate(s, r0, rows);
  }
  at::Tensor loss = Device::sum(row_loss) / double(N);
  if (symmetric) {
    const at::Tensor col_lse = (col_max + col_sum.log()).contiguous();
    const at::Tensor col_loss = Device::sum((col_lse - diagonal).to(at::kDouble).contiguous()) / double(N);
    loss = 0.5 * (loss + col_loss);
    if (with_grad) {
      for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
        const int64_t rows = std::min(rows_per_block, N - r0);
        at::Tensor s = block.narrow(0, 0, rows);
        product_into(s, u1s_mm.narrow(0, r0, rows), u2_mm.t());
        SymmetricGradParams g;
        g.logits = s.data_ptr();
        g.rows = rows;
        g.cols = N;
        g.row0 = r0;
        g.is_double = is_double;
        g.row_lse = row_lse.narrow(0, r0, rows).data_ptr();
        g.col_lse = col_lse.data_ptr();
        g.grad_scale = 0.5 / double(N);
        Device::symmetric_grad(g);
        accumulate(s, r0, rows);
      }
    }
  }
  loss = loss.to(acc.dtype());
  if (!with_grad) return {loss, grad_u1, grad_u2};
  grad_u1.div_(temperature);  // s = u1 u2^T / tau: d u1 = G u2 / tau (d u2 used u1s already)
  return {loss, through_normalize(grad_u1, n1), through_normalize(grad_u2, n2)};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> supcon_loss(const at::Tensor& z, const at::Tensor& labels_in, double temperature,
                                               bool normalize, bool with_grad) {
  const char* name = "llkern.supcon";
  check_embeddings(name, "z", z);
  const at::Tensor labels = check_labels(name, labels_in, z);
  check_temperature(name, temperature);
  const Normalized nz = prepare(z, normalize);
  const at::Tensor u = nz.rows, us = u / temperature;  // s = us u^T
  const at::Tensor u_mm = product_operand<Device>(u, z), us_mm = product_operand<Device>(us, z);
  const int64_t N = u.size(0), rows_per_block = block_rows<Device>(N);
  const at::TensorOptions acc = u.options();
  at::Tensor block = at::empty({rows_per_block, N}, acc);
  at::Tensor row_loss = at::empty({N}, acc.dtype(at::kDouble));
  at::Tensor row_anchor = at::empty({N}, acc.dtype(at::kDouble));
  at::Tensor grad_u = with_grad ? at::zeros_like(u) : at::empty({0}, acc);
  for (int64_t r0 = 0; r0 < N; r0 += rows_per_block) {
    const int64_t rows = std::min(rows_per_block, N - r0);
    at::Tensor s = block.narrow(0, 0, rows);
    product_into(s, us_mm.narrow(0, r0, rows), u_mm.t());
    ContrastRowsParams p;
    p.logits = s.data_ptr();
    p.rows = rows;
    p.cols = N;
    p.row0 = r0;
    p.is_double = u.scalar_type() == at::kDouble;
    p.labels = labels.data_ptr<int64_t>();
    p.write_grad = with_grad;
    p.grad_scale = 1.0;  // the 1 / (number of anchors) comes after: it is known at the end only
    p.row_loss = row_loss.data_ptr<double>() + r0;
    p.row_anchor = row_anchor.data_ptr<double>() + r0;
    Device::contrast_rows(p);
    if (with_grad) {  // s = u u^T / tau: d u = (G + G^T) u / tau
      const at::Tensor g_mm = s.to(u_mm.scalar_type());
      at::Tensor rows_grad = grad_u.narrow(0, r0, rows);
      product_add(rows_grad, g_mm, u_mm);
      product_add(grad_u, g_mm.t(), u_mm.narrow(0, r0, rows));
    }
  }
  const at::Tensor per_anchor = 1.0 / Device::sum(row_anchor).clamp_min(1.0);  // 0-d, on the device
  const at::Tensor loss = (Device::sum(row_loss) * per_anchor).to(acc.dtype());
  if (!with_grad) return {loss, grad_u};
  grad_u.mul_(per_anchor.to(acc.dtype()) / temperature);
  return {loss, through_normalize(grad_u, nz)};
}

// Silverman's rule (docs/similarity.md) as a 0-d double tensor: s (4 / (d + 2))^(1/(d+4))
// N^(-1/(d+4)), s the root of the mean per-feature variance (1 when the batch has no spread).
inline at::Tensor default_sigma(const at::Tensor& t) {
  const int64_t n = t.size(0), d = t.size(1);
  const double factor = std::pow(4.0 / double(d + 2), 1.0 / double(d + 4)) * std::pow(double(n), -1.0 / double(d + 4));
  if (n < 2) return at::full({}, factor, t.options().dtype(at::kDouble));
  const at::Tensor spread = t.to(at::kDouble).var(0, /*unbiased=*/false).mean().sqrt();
  const at::Tensor usable = at::logical_and(spread > 0, at::isfinite(spread));
  return at::where(usable, spread, at::ones_like(spread)) * factor;
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> renyi_mutual_information(const at::Tensor& t_in, const at::Tensor& labels_in,
                                                            std::optional<double> sigma,
                                                            std::optional<double> label_sigma, bool with_grad) {
  const char* name = "llkern.renyi_mutual_information";
  check_embeddings(name, "t", t_in);
  const at::Tensor labels = check_labels(name, labels_in, t_in);
  TORCH_CHECK_VALUE(!sigma.has_value() || (*sigma > 0 && std::isfinite(*sigma)), name,
                    ": expected sigma to be a finite number > 0 or None, got ", sigma.value_or(0.0));
  TORCH_CHECK_VALUE(!label_sigma.has_value() || (*label_sigma > 0 && std::isfinite(*label_sigma)), name,
                    ": expected label_sigma to be a finite number > 0 or None");
  const at::TensorOptions acc = t_in.options().dtype(loss_dtype(t_in.scalar_type()));
  // In units of sigma (a 0-d tensor: the default is computed on the device), so the kernels use
  // width 1. Centred too: distances do not change, and |t_i|^2 + |t_j|^2 - 2 t_i.t_j no longer
  // cancels a large common offset away. (The gradient of a function of the differences sums to
  // zero over the rows, so it is the same with respect to t as to t - mean.) The widened copy of a
  // 16-bit input is freed once t is formed.
  at::Tensor width, t;
  {
    const at::Tensor t_acc = t_in.to(acc.dtype());
    width = sigma.has_value() ? at::full({}, *sigma, acc.dtype(at::kDouble)) : default_sigma(t_acc);
    t = ((t_acc - t_acc.mean(0, /*keepdim=*/true)) / width.to(acc.dtype())).contiguous();
  }
  // With gradients two blocks are alive (the kernel values and their same-label part): each gets half the
  // elements, so the pair holds what one block holds without (32 MiB on a GPU).
  const int64_t N = t.size(0);
  const int64_t block_elements = with_grad ? Device::kBlockElements / 2 : Device::kBlockElements;
  const int64_t rows_per_block = std::clamp<int64_t>(block_elements / N, 1, N);
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
  const at::TensorOptions f64 = acc.dtype(at::kDouble);
  at::Tensor frob = at::empty({N}, f64), frob_same = at::empty({N}, f64), same_count = at::empty({N}, f64);
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
    p.inv_sigma_sq = 1.0;
    p.write_grad = with_grad;
    if (with_grad) {
      p.same_weights = same_block.data_ptr();
      p.row_sum = row_sum.narrow(0, r0, rows).data_ptr();
      p.row_sum_same = row_sum_same.narrow(0, r0, rows).data_ptr();
    }
    p.frob = frob.data_ptr<double>() + r0;
    p.frob_same = frob_same.data_ptr<double>() + r0;
    p.same_count = same_count.data_ptr<double>() + r0;
    Device::gaussian_rows(p);
    if (with_grad) {
      at::Tensor all = spread_all.narrow(0, r0, rows), same = spread_same.narrow(0, r0, rows);
      at::mm_out(all, dots, t);
      at::mm_out(same, same_block.narrow(0, 0, rows), t);
      all.mul_(-1).addcmul_(row_sum.narrow(0, r0, rows), t_rows);
      same.mul_(-1).addcmul_(row_sum_same.narrow(0, r0, rows), t_rows);
    }
  }
  const double n = double(N);
  const at::Tensor f_all = Device::sum(frob), f_same = Device::sum(frob_same);
  const at::Tensor same_pairs = Device::sum(same_count);  // sum over labels of count^2
  const at::Tensor f_labels = same_pairs + off_sq * (n * n - same_pairs);
  const at::Tensor f_joint = f_same + off_sq * (f_all - f_same);
  // I = S(A) + S(B) - S(A, B), S(M) = -log2(|M|_F^2 / N^2) with tr(M) = N for all three.
  const at::Tensor mi = (at::log2(f_joint) - at::log2(f_all) - at::log2(f_labels) + 2.0 * std::log2(n));
  if (!with_grad) return {mi.to(acc.dtype()), at::empty({0}, acc)};
  block.reset();  // (the blocks are done with: not part of the peak of what follows)
  same_block.reset();
  // In units of sigma: dI/dt'_i = -4 / ln 2 sum_j K_ij^2 (B_ij^2 / F_joint - 1 / F_all) (t'_i - t'_j),
  // and dI/dt = dI/dt' / sigma.
  const double c = -4.0 / std::log(2.0);
  const at::Tensor coef_all = (c * (off_sq / f_joint - 1.0 / f_all) / width).to(acc.dtype());
  const at::Tensor coef_same = (c * (1.0 - off_sq) / f_joint / width).to(acc.dtype());
  const at::Tensor grad = spread_all.mul_(coef_all).add_(spread_same.mul_(coef_same));
  return {mi.to(acc.dtype()), grad};
}

}  // namespace similarity
}  // namespace llkern
