// CUDA binding of the similarity-matrix losses: the block driver of similarity_common.h over the
// kernels of cuda/similarity.cu, with cuBLAS (through ATen) for the block products. fp32 products
// follow torch.backends.cuda.matmul.allow_tf32, as PyTorch's own; with bfloat16 inputs InfoNCE's and
// supervised contrastive's products take bfloat16 operands with float32 results (similarity_common.h). No host synchronisation: the data-dependent scalars stay on the device (the Python
// wrapper's finiteness check is the one synchronisation; call torch.ops.llkern.* to skip it).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "similarity_common.h"

namespace llkern {
namespace {

void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// Values per block of the N x N matrix: 32 MiB of fp32, at N = 32768 256 rows, wide enough for cuBLAS.
// (tests/cuda_emu builds with a small block, so that several blocks run at small N.)
#ifndef LLKERN_CUDA_SIMILARITY_BLOCK_ELEMENTS
#define LLKERN_CUDA_SIMILARITY_BLOCK_ELEMENTS (int64_t(1) << 23)
#endif

struct Cuda {
  static constexpr bool kLowPrecisionProducts = true;  // bfloat16 inputs: bfloat16 products on the tensor cores
  static constexpr int64_t kBlockElements = LLKERN_CUDA_SIMILARITY_BLOCK_ELEMENTS;
  static void contrast_rows(const ContrastRowsParams& p) {
    contrast_rows_cuda(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void column_lse_update(const ColumnLseParams& p) {
    column_lse_update_cuda(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void symmetric_grad(const SymmetricGradParams& p) {
    symmetric_grad_cuda(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static void gaussian_rows(const GaussianRowsParams& p) {
    gaussian_rows_cuda(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  static at::Tensor sum(const at::Tensor& v) { return v.sum(); }  // a reduction kernel: no atomics
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& z1, const at::Tensor& z2,
                                                              double temperature, bool symmetric, bool normalize,
                                                              bool with_grad) {
  const c10::cuda::CUDAGuard guard(z1.device());
  return similarity::info_nce<Cuda>(z1, z2, temperature, symmetric, normalize, with_grad);
}

std::tuple<at::Tensor, at::Tensor> supcon_loss_cuda(const at::Tensor& z, const at::Tensor& labels,
                                                    double temperature, bool normalize, bool with_grad) {
  const c10::cuda::CUDAGuard guard(z.device());
  return similarity::supcon_loss<Cuda>(z, labels, temperature, normalize, with_grad);
}

std::tuple<at::Tensor, at::Tensor> renyi_mutual_information_cuda(const at::Tensor& t, const at::Tensor& labels,
                                                                 std::optional<double> sigma,
                                                                 std::optional<double> label_sigma, bool with_grad) {
  const c10::cuda::CUDAGuard guard(t.device());
  return similarity::renyi_mutual_information<Cuda>(t, labels, sigma, label_sigma, with_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CUDA, m) {
  m.impl("info_nce", &info_nce_cuda);
  m.impl("supcon_loss", &supcon_loss_cuda);
  m.impl("renyi_mutual_information", &renyi_mutual_information_cuda);
}

}  // namespace llkern
