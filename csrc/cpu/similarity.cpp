// CPU kernels of the similarity-matrix losses: the elementwise passes over one block of rows.
// No torch headers: see kernels/similarity.h. Rows are independent, so each pass splits the
// block's rows over the OpenMP threads (the column statistics split the columns).
#include "../kernels/similarity.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>

#include "x86_simd.h"

#if defined(__GNUC__)
#define LLKERN_ALWAYS_INLINE __attribute__((always_inline))
#else
#define LLKERN_ALWAYS_INLINE
#endif

namespace llkern {
namespace {

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

// Parallel only when the block is worth a fork (a few thousand exps per thread).
constexpr int64_t kParallelElements = 16384;

// Splits [0, n) into one range per thread of a parallel region (forked when `work` values are
// worth it) and runs `avx2(begin, end)` for float on AVX2 + FMA machines, `baseline(begin, end)`
// otherwise. `avx2` calls a target("avx2,fma") function: outlined regions do not inherit targets.
template <typename Acc, typename Avx2, typename Baseline>
void parallel_ranges(int64_t n, int64_t work, Avx2 avx2, Baseline baseline) {
#pragma omp parallel if (work > kParallelElements)
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = n * id / threads, end = n * (id + 1) / threads;
#if defined(LLKERN_X86_CLONES)
    if (std::is_same_v<Acc, float> && cpu::cpu_has_avx2_fma()) {
      avx2(begin, end);
    } else
#endif
    {
      baseline(begin, end);
    }
  }
}

// max_j x_j.
template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline Acc row_max(const Acc* x, int64_t n) {
#if defined(LLKERN_X86_CLONES)
  if constexpr (kAvx2) return cpu::max_avx2(x, n);
#endif
  Acc best = kNegInf<Acc>;
  for (int64_t j = 0; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

// x_j = exp(x_j - shift) in place; returns their sum.
template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline Acc exp_in_place(Acc* x, int64_t n, Acc shift) {
#if defined(LLKERN_X86_CLONES)
  if constexpr (kAvx2) return cpu::exp_shifted_sum_avx2(x, n, shift);
#endif
  Acc total = 0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    total += x[j];
  }
  return total;
}

// x_j = a * x_j.
template <typename Acc>
LLKERN_ALWAYS_INLINE inline void scale_row(Acc* x, int64_t n, Acc a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline void contrast_row(const ContrastRowsParams& p, int64_t i) {
  Acc* s = static_cast<Acc*>(p.logits) + i * p.cols;
  const int64_t n = p.cols, self = p.row0 + i;
  const bool supervised = p.labels != nullptr;
  const Acc scale = Acc(p.grad_scale);
  double loss = 0.0;
  Acc positive_sum = 0;
  int64_t positives = 0;
  if (supervised) {
    const int64_t y = p.labels[self];
    for (int64_t j = 0; j < n; ++j) {
      if (j != self && p.labels[j] == y) {
        positive_sum += s[j];
        ++positives;
      }
    }
    if (p.row_anchor) p.row_anchor[i] = positives > 0 ? 1.0 : 0.0;
    s[self] = kNegInf<Acc>;  // self is no candidate
  }
  const Acc diagonal = supervised ? Acc(0) : s[self];
  const Acc max = row_max<Acc, kAvx2>(s, n);
  Acc lse = max;
  if (max != kNegInf<Acc>) {  // (a supervised row of one column has no candidate at all)
    const Acc sum = exp_in_place<Acc, kAvx2>(s, n, max);
    lse = max + std::log(sum);
    if (p.write_grad) scale_row(s, n, scale / sum);
  } else if (p.write_grad) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0;
  }
  if (supervised) {
    if (positives > 0) {
      loss = -double(positive_sum - Acc(positives) * lse) / double(positives);
      if (p.write_grad) {
        const Acc step = scale / Acc(positives);
        const int64_t y = p.labels[self];
        for (int64_t j = 0; j < n; ++j) {
          if (p.labels[j] == y) s[j] -= step;
        }
      }
    } else if (p.write_grad) {
      for (int64_t j = 0; j < n; ++j) s[j] = 0;  // an anchor without positives adds nothing
    }
    if (p.write_grad) s[self] = 0;  // (the label loop above also stepped it)
  } else {
    loss = double(lse - diagonal);
    if (p.write_grad) s[self] -= scale;
  }
  p.row_loss[i] = loss;
  if (p.lse) static_cast<Acc*>(p.lse)[i] = lse;
  if (p.diagonal) static_cast<Acc*>(p.diagonal)[i] = diagonal;
}

template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline void contrast_rows_range(const ContrastRowsParams& p, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) contrast_row<Acc, kAvx2>(p, i);
}

#if defined(LLKERN_X86_CLONES)
__attribute__((target("avx2,fma"))) void contrast_rows_float_avx2(const ContrastRowsParams& p, int64_t begin,
                                                                  int64_t end) {
  contrast_rows_range<float, true>(p, begin, end);
}
#endif

template <typename Acc>
void contrast_rows_typed(const ContrastRowsParams& p) {
  parallel_ranges<Acc>(
      p.rows, p.rows * p.cols,
      [&](int64_t begin, int64_t end) {
#if defined(LLKERN_X86_CLONES)
        if constexpr (std::is_same_v<Acc, float>) contrast_rows_float_avx2(p, begin, end);
#endif
      },
      [&](int64_t begin, int64_t end) { contrast_rows_range<Acc, false>(p, begin, end); });
}

// Columns [begin, end) of the block merged into the running statistics: the block's column
// maxima first (one pass of max), then one exp per element against the merged maximum.
template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline void column_lse_range(const ColumnLseParams& p, int64_t begin, int64_t end) {
  const Acc* s = static_cast<const Acc*>(p.logits);
  Acc* col_max = static_cast<Acc*>(p.col_max);
  Acc* col_sum = static_cast<Acc*>(p.col_sum);
  const int64_t width = end - begin;
  std::vector<Acc> block_max(static_cast<size_t>(width), kNegInf<Acc>), block_sum(static_cast<size_t>(width), 0);
  for (int64_t i = 0; i < p.rows; ++i) {
    const Acc* row = s + i * p.cols + begin;
    for (int64_t j = 0; j < width; ++j) block_max[j] = std::max(block_max[j], row[j]);
  }
  for (int64_t j = 0; j < width; ++j) block_max[j] = std::max(block_max[j], col_max[begin + j]);
#if defined(LLKERN_X86_CLONES)
  if constexpr (kAvx2) {
    for (int64_t i = 0; i < p.rows; ++i) cpu::add_exp_avx2(s + i * p.cols + begin, block_max.data(), block_sum.data(), width);
  } else
#endif
  {
    for (int64_t i = 0; i < p.rows; ++i) {
      const Acc* row = s + i * p.cols + begin;
      for (int64_t j = 0; j < width; ++j) block_sum[j] += std::exp(row[j] - block_max[j]);
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    const Acc old_max = col_max[begin + j];
    const Acc carried = old_max == kNegInf<Acc> ? Acc(0) : col_sum[begin + j] * std::exp(old_max - block_max[j]);
    col_sum[begin + j] = carried + block_sum[j];
    col_max[begin + j] = block_max[j];
  }
}

#if defined(LLKERN_X86_CLONES)
__attribute__((target("avx2,fma"))) void column_lse_float_avx2(const ColumnLseParams& p, int64_t begin,
                                                               int64_t end) {
  column_lse_range<float, true>(p, begin, end);
}
#endif

template <typename Acc>
void column_lse_typed(const ColumnLseParams& p) {
  parallel_ranges<Acc>(
      p.cols, p.rows * p.cols,
      [&](int64_t begin, int64_t end) {
#if defined(LLKERN_X86_CLONES)
        if constexpr (std::is_same_v<Acc, float>) column_lse_float_avx2(p, begin, end);
#endif
      },
      [&](int64_t begin, int64_t end) { column_lse_range<Acc, false>(p, begin, end); });
}

template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline void symmetric_grad_range(const SymmetricGradParams& p, int64_t begin, int64_t end) {
  const Acc* row_lse = static_cast<const Acc*>(p.row_lse);
  const Acc* col_lse = static_cast<const Acc*>(p.col_lse);
  const Acc scale = Acc(p.grad_scale);
  for (int64_t i = begin; i < end; ++i) {
    Acc* s = static_cast<Acc*>(p.logits) + i * p.cols;
    const Acc lse = row_lse[i];
#if defined(LLKERN_X86_CLONES)
    if constexpr (kAvx2) {
      cpu::two_exp_avx2(s, p.cols, lse, col_lse, scale);
    } else
#endif
    {
      for (int64_t j = 0; j < p.cols; ++j) s[j] = scale * (std::exp(s[j] - lse) + std::exp(s[j] - col_lse[j]));
    }
    s[p.row0 + i] -= 2 * scale;
  }
}

#if defined(LLKERN_X86_CLONES)
__attribute__((target("avx2,fma"))) void symmetric_grad_float_avx2(const SymmetricGradParams& p, int64_t begin,
                                                                   int64_t end) {
  symmetric_grad_range<float, true>(p, begin, end);
}
#endif

template <typename Acc>
void symmetric_grad_typed(const SymmetricGradParams& p) {
  parallel_ranges<Acc>(
      p.rows, p.rows * p.cols,
      [&](int64_t begin, int64_t end) {
#if defined(LLKERN_X86_CLONES)
        if constexpr (std::is_same_v<Acc, float>) symmetric_grad_float_avx2(p, begin, end);
#endif
      },
      [&](int64_t begin, int64_t end) { symmetric_grad_range<Acc, false>(p, begin, end); });
}

template <typename Acc, bool kAvx2>
LLKERN_ALWAYS_INLINE inline void gaussian_rows_range(const GaussianRowsParams& p, int64_t begin, int64_t end,
                                                     Acc* scratch) {
  const Acc* sq = static_cast<const Acc*>(p.sq_norms);
  const Acc inv = Acc(p.inv_sigma_sq);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t self = p.row0 + i;
    Acc* dots = static_cast<Acc*>(p.dots) + i * p.cols;
    Acc* k2 = p.write_grad ? dots : scratch;
    const Acc sq_i = sq[self];
    // -|t_i - t_j|^2 / sigma^2, then K^2 = exp of it
    for (int64_t j = 0; j < p.cols; ++j) k2[j] = -std::max(sq_i + sq[j] - 2 * dots[j], Acc(0)) * inv;
    // The diagonal (K_ii^2 = 1) is left out of the weights: its term t_i - t_i is zero, and
    // keeping it would make L(M)_i = (sum_j M_ij) t_i - (M t)_i cancel 1 t_i against 1 t_i.
    k2[self] = kNegInf<Acc>;
    // (the vector exp clamps its argument at -87, so exp(-inf) came out 1.6e-38: taken back out)
    const Acc total = exp_in_place<Acc, kAvx2>(k2, p.cols, Acc(0)) - k2[self];
    k2[self] = 0;
    const int64_t y = p.labels[self];
    Acc same = 0;
    if (p.write_grad) {
      Acc* w = static_cast<Acc*>(p.same_weights) + i * p.cols;
      for (int64_t j = 0; j < p.cols; ++j) {
        w[j] = p.labels[j] == y ? k2[j] : Acc(0);
        same += w[j];
      }
      static_cast<Acc*>(p.row_sum)[i] = total;
      static_cast<Acc*>(p.row_sum_same)[i] = same;
    } else {
      for (int64_t j = 0; j < p.cols; ++j) same += p.labels[j] == y ? k2[j] : Acc(0);
    }
    int64_t same_count = 0;
    for (int64_t j = 0; j < p.cols; ++j) same_count += p.labels[j] == y;
    p.frob[i] = 1.0 + double(total);
    p.frob_same[i] = 1.0 + double(same);
    p.same_count[i] = double(same_count);
  }
}

#if defined(LLKERN_X86_CLONES)
__attribute__((target("avx2,fma"))) void gaussian_rows_float_avx2(const GaussianRowsParams& p, int64_t begin,
                                                                  int64_t end, float* scratch) {
  gaussian_rows_range<float, true>(p, begin, end, scratch);
}
#endif

template <typename Acc>
void gaussian_rows_typed(const GaussianRowsParams& p) {
  // Without write_grad the squares go to a scratch row per thread instead of over the dots.
  const auto scratch_row = [&]() { return std::vector<Acc>(p.write_grad ? 0 : static_cast<size_t>(p.cols)); };
  parallel_ranges<Acc>(
      p.rows, p.rows * p.cols,
      [&](int64_t begin, int64_t end) {
#if defined(LLKERN_X86_CLONES)
        if constexpr (std::is_same_v<Acc, float>) gaussian_rows_float_avx2(p, begin, end, scratch_row().data());
#endif
      },
      [&](int64_t begin, int64_t end) { gaussian_rows_range<Acc, false>(p, begin, end, scratch_row().data()); });
}

}  // namespace

void contrast_rows_cpu(const ContrastRowsParams& p) {
  p.is_double ? contrast_rows_typed<double>(p) : contrast_rows_typed<float>(p);
}

void column_lse_update_cpu(const ColumnLseParams& p) {
  p.is_double ? column_lse_typed<double>(p) : column_lse_typed<float>(p);
}

void symmetric_grad_cpu(const SymmetricGradParams& p) {
  p.is_double ? symmetric_grad_typed<double>(p) : symmetric_grad_typed<float>(p);
}

void gaussian_rows_cpu(const GaussianRowsParams& p) {
  p.is_double ? gaussian_rows_typed<double>(p) : gaussian_rows_typed<float>(p);
}

}  // namespace llkern
