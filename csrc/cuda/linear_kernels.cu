// CUDA kernels of the csrc backend's AdaLoRA linear layer: grid-stride loops over the items of
// adapter_passes.cuh (16-byte vectors where the layout allows), and the keep-mask for tests. The mask is
// dropout_philox.h's, the same on the CPU and in the Triton kernels; nothing is stored between forward and
// backward.
#include <algorithm>

#include "adapter_passes.cuh"
#include "common.cuh"
#include "kernels.cuh"

namespace adalora_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // the grid-stride loops cover the rest

unsigned int grid_for(int64_t items) {
  return static_cast<unsigned int>(std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ int64_t first_item() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t item_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) dropout_scale_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk,
                                                                 T* __restrict__ xd, int64_t M, int64_t K,
                                                                 uint64_t seed, uint32_t threshold,
                                                                 typename AccOf<T>::type scale) {
  const int64_t items = pass_items(M, K, V);
  for (int64_t i = first_item(); i < items; i += item_stride())
    dropout_scale_item<T, V>(i, x, sxm, sxk, xd, M, K, seed, threshold, scale);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) masked_expand_kernel(const T* __restrict__ dt, const T* __restrict__ lam,
                                                                 const T* __restrict__ q, T* __restrict__ out,
                                                                 int64_t M, int64_t K, int R, uint64_t seed,
                                                                 uint32_t threshold, typename AccOf<T>::type scale) {
  const int64_t items = pass_items(M, K, V);
  for (int64_t i = first_item(); i < items; i += item_stride())
    masked_expand_item<T, V>(i, dt, lam, q, out, M, K, R, seed, threshold, scale);
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t rows, int64_t cols, uint64_t seed,
                                 uint32_t threshold) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  out[idx] = dropout_keep(seed, static_cast<uint64_t>(idx / cols), static_cast<uint64_t>(idx % cols), threshold);
}

}  // namespace

template <typename T>
cudaError_t dropout_scale(const T* x, int64_t sxm, int64_t sxk, T* xd, int64_t M, int64_t K, uint64_t seed,
                          uint32_t threshold, double scale, cudaStream_t stream) {
  if (M * K == 0) return cudaSuccess;
  const void* bases[] = {x, xd};
  const int64_t strides[] = {sxk == 1 ? sxm : 1, K};
  const int v = sxk == 1 ? vector_width(sizeof(T), K, bases, strides, 2) : 1;
  const auto s = static_cast<typename AccOf<T>::type>(scale);
  constexpr int kV = 16 / sizeof(T);
  if (v == kV) {
    dropout_scale_kernel<T, kV><<<grid_for(pass_items(M, K, kV)), kThreads, 0, stream>>>(
        x, sxm, sxk, xd, M, K, seed, threshold, s);
  } else {
    dropout_scale_kernel<T, 1><<<grid_for(pass_items(M, K, 1)), kThreads, 0, stream>>>(
        x, sxm, sxk, xd, M, K, seed, threshold, s);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t masked_expand(const T* dt, const T* lam, const T* q, T* out, int64_t M, int64_t K, int R, uint64_t seed,
                          uint32_t threshold, double scale, cudaStream_t stream) {
  if (M * K == 0) return cudaSuccess;
  const void* bases[] = {q, out};
  const int64_t strides[] = {K, K};
  const int v = vector_width(sizeof(T), K, bases, strides, 2);
  const auto s = static_cast<typename AccOf<T>::type>(scale);
  constexpr int kV = 16 / sizeof(T);
  if (v == kV) {
    masked_expand_kernel<T, kV><<<grid_for(pass_items(M, K, kV)), kThreads, 0, stream>>>(
        dt, lam, q, out, M, K, R, seed, threshold, s);
  } else {
    masked_expand_kernel<T, 1><<<grid_for(pass_items(M, K, 1)), kThreads, 0, stream>>>(
        dt, lam, q, out, M, K, R, seed, threshold, s);
  }
  return cudaGetLastError();
}

cudaError_t keep_mask(bool* out, int64_t rows, int64_t cols, uint64_t seed, uint32_t threshold, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  keep_mask_kernel<<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(out, rows, cols, seed, threshold);
  return cudaGetLastError();
}

#define AK_INSTANTIATE(T)                                                                                         \
  template cudaError_t dropout_scale<T>(const T*, int64_t, int64_t, T*, int64_t, int64_t, uint64_t, uint32_t,    \
                                        double, cudaStream_t);                                                   \
  template cudaError_t masked_expand<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int, uint64_t,       \
                                        uint32_t, double, cudaStream_t);

AK_INSTANTIATE(float)
AK_INSTANTIATE(double)
AK_INSTANTIATE(__half)
AK_INSTANTIATE(__nv_bfloat16)

}  // namespace cuda
}  // namespace adalora_kernels
