// Large CPU output buffers backed by transparent huge pages.
//
// A fresh multi-megabyte allocation is mmap'ed by malloc and page-faulted 4 KiB at a time on
// first write: for a 64 MiB gradient that costs more than the kernel's own pass. Where the
// kernel leaves THP to madvise (the common default), asking for huge pages cuts the faults
// 512-fold. Small buffers use the ordinary allocator.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace llkern {

inline at::Tensor empty_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * options.dtype().itemsize();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= 2 * kHugePage) {
    const size_t rounded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = std::aligned_alloc(kHugePage, rounded);
    if (ptr != nullptr) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace llkern
