// CPU binding of cast_pooled: a dtype conversion (ATen's own conversion loop) into a buffer from llkern's
// pool of large buffers. The conversion itself runs at copy bandwidth; what made `tensor.to(dtype)` 3 to 5
// times slower than that for activation-sized tensors is the fresh allocation, whose pages the kernel
// faults in on first touch. saved_tensors_in converts every saved activation twice per step (to 16 bits
// when saved, back when the backward reads it), so the pool serves it.
#include <torch/library.h>

#include "cpu_alloc.h"

namespace llkern {
namespace {

at::Tensor cast_pooled_op(const at::Tensor& x, at::ScalarType dtype) {
  // Contiguous inputs get a contiguous pooled output; other layouts keep theirs, from ATen's allocator.
  at::Tensor out = x.is_contiguous() ? empty_cpu_large(x.sizes(), x.options().dtype(dtype))
                                     : at::empty_like(x, x.options().dtype(dtype));
  out.copy_(x);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, CPU, m) { m.impl("cast_pooled", &cast_pooled_op); }

}  // namespace llkern
