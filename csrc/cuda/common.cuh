// Device helpers shared by the csrc CUDA kernels: conversions to and from the accumulation type.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace adalora_kernels {
namespace cuda {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(double v) {
  return static_cast<T>(v);
}

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline unsigned int blocks_for(int64_t n, int threads) { return static_cast<unsigned int>((n + threads - 1) / threads); }

}  // namespace cuda
}  // namespace adalora_kernels
