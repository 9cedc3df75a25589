// CPU binding of the similarity-matrix losses: the block driver of similarity_common.h over the
// OpenMP kernels of cpu/similarity.cpp, with blocks sized for the L3 cache.
#include <torch/library.h>

#include <numeric>

#include "similarity_common.h"

namespace llkern {
namespace {

struct Cpu {
  static constexpr bool kLowPrecisionProducts = false;  // 16-bit inputs: float32 products (no fast 16-bit BLAS)
  static constexpr int64_t kBlockElements = int64_t(1) << 21;  // 8 MiB of fp32 per block (2^20 measured 6 % slower: MKL packs more)
  static void contrast_rows(const ContrastRowsParams& p) { contrast_rows_cpu(p); }
  static void column_lse_update(const ColumnLseParams& p) { column_lse_update_cpu(p); }
  static void symmetric_grad(const SymmetricGradParams& p) { symmetric_grad_cpu(p); }
  static void gaussian_rows(const GaussianRowsParams& p) { gaussian_rows_cpu(p); }
  // Per-row doubles added in row order: the result does not depend on the thread count.
  static at::Tensor sum(const at::Tensor& v) {
    const double* x = v.data_ptr<double>();
    return at::full({}, std::accumulate(x, x + v.numel(), 0.0), v.options());
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) {
  m.impl("info_nce", &similarity::info_nce<Cpu>);
  m.impl("supcon_loss", &similarity::supcon_loss<Cpu>);
  m.impl("renyi_mutual_information", &similarity::renyi_mutual_information<Cpu>);
}

}  // namespace llkern
