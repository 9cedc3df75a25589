// CPU-side scalar helpers shared by the CPU kernels: accumulation type and stores that round
// 16-bit floats. No torch headers.
#pragma once

#include "../kernels/dtypes.h"

namespace llkern {
namespace cpu {

// float, or double for double inputs.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename T, typename Acc>
inline T store(Acc v) {
  if constexpr (sizeof(T) == sizeof(Acc)) {
    return T(v);
  } else {
    return from_float<T>(float(v));
  }
}

}  // namespace cpu
}  // namespace llkern
