// Helpers shared by the csrc CUDA kernels: conversions to and from the accumulation type. The float and double
// overloads are host-device, so the per-item functions of adapter_passes.cuh also compile with a host compiler
// (tests/cuda_passes_host.cpp runs them on the CPU); the 16-bit ones exist under nvcc only.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "../dropout_philox.h"  // AK_HOST_DEVICE

namespace adalora_kernels {
namespace cuda {

AK_HOST_DEVICE float to_acc(float v) { return v; }
AK_HOST_DEVICE double to_acc(double v) { return v; }

template <typename T>
AK_HOST_DEVICE T from_acc(float v) {
  return static_cast<T>(v);
}
template <typename T>
AK_HOST_DEVICE T from_acc(double v) {
  return static_cast<T>(v);
}

#if defined(__CUDACC__)
AK_HOST_DEVICE float to_acc(__half v) { return __half2float(v); }
AK_HOST_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
AK_HOST_DEVICE __half from_acc<__half>(float v) {
  return __float2half(v);
}
template <>
AK_HOST_DEVICE __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
#endif

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
