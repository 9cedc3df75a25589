// tests/cuda_emu: the device guard of the bindings; the emulated device is the CPU tensors' own.
#pragma once

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
#include "CUDAException.h"
