// tests/cuda_emu: the current "CUDA stream" of the bindings, on the CPU (kernels run as they launch).
#pragma once

#include <ATen/ATen.h>

#include "../../cuda_runtime.h"

namespace at {
namespace cuda {
struct EmulatedStream {
  cudaStream_t stream() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace at
