// Large CPU output buffers from llkern's buffer pool (huge pages, reused across steps);
// small ones from the ordinary allocator. See cpu/buffer_pool.cpp for why.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/buffer_pool.h"

namespace llkern {

inline at::Tensor empty_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * options.dtype().itemsize();
  if (nbytes >= kBufferPoolMinBytes) {
    if (void* block = buffer_pool_acquire(nbytes)) {
      return at::from_blob(
          block, sizes, [nbytes](void* p) { buffer_pool_release(p, nbytes); }, options.device(at::kCPU));
    }
  }
  return at::empty(sizes, options);
}

}  // namespace llkern
