// Helpers shared by the binding files: tensor -> ScalarKind, input checks.
// Only the binding layer includes torch headers.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

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

}  // namespace llkern
