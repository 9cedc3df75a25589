// Helpers shared by the binding files: tensor -> ScalarKind, input checks.
// Only the binding layer includes torch headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>
#include <torch/version.h>

#include "../kernels/dtypes.h"

namespace llkern {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kDouble: return ScalarKind::kFloat64;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "llkern: expected ", name,
                       " to be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  }
}

// Loss dtype of an op whose inputs have dtype `t`: float64 stays, the rest accumulate in float32.
inline at::ScalarType loss_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// bfloat16 products with float32 results on the tensor cores (float32 accumulation). torch >= 2.8 has
// mm/addmm with out_dtype on CUDA, and from 2.10 addmm accepts a float32 accumulator beside bfloat16
// operands (2.8 and 2.9 insisted that it match them); before, the operands are widened first.
// Only the CUDA bindings pass bfloat16 operands (see chunked_head, product_operand).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
inline at::Tensor mm_float32(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b, at::kFloat); }
inline void mm_float32_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b, at::kFloat);
}
#if TORCH_VERSION_MAJOR > 2 || TORCH_VERSION_MINOR >= 10
inline void addmm_float32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  at::addmm_out(acc, acc, a, b, at::kFloat);
}
#else
inline void addmm_float32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  acc.add_(at::mm(a, b, at::kFloat));
}
#endif
#else
inline at::Tensor mm_float32(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.to(at::kFloat), b.to(at::kFloat)); }
inline void mm_float32_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}
inline void addmm_float32_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  acc.addmm_(a.to(at::kFloat), b.to(at::kFloat));
}
#endif

// out = a b and acc += a b into a float32 (or float64) out: the plain product when the operands share out's
// dtype, else the float32-result product of 16-bit operands.
inline void product_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    mm_float32_out(out, a, b);
  }
}
inline void product_add(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    addmm_float32_(acc, a, b);
  }
}

// Inputs whose products may take 16-bit operands: bfloat16 only. Its exponent range is float32's; with
// float16, a gradient block scaled by 1/N (InfoNCE) or 1/valid (the aux head) would underflow when rounded
// to 16 bits (most entries zero at N = 4096), so float16 inputs keep float32 products.
inline bool low_precision_operands(at::ScalarType t) { return t == at::kBFloat16; }

}  // namespace llkern
