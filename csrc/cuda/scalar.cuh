// Device-side scalar helpers shared by the CUDA kernels: accumulation type, and loads / stores
// that convert 16-bit floats through float. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace llkern {
namespace cuda {

// float, or double for double inputs.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float load_f(float v) { return v; }
__device__ __forceinline__ double load_f(double v) { return v; }
__device__ __forceinline__ float load_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T store_f(typename Acc<T>::type v);
template <> __device__ __forceinline__ float store_f<float>(float v) { return v; }
template <> __device__ __forceinline__ double store_f<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half store_f<__half>(float v) { return __float2half_rn(v); }

}  // namespace cuda
}  // namespace llkern
