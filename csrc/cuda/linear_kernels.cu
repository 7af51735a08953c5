// CUDA kernels of the csrc backend's fused AdaLoRA linear layer: the parts cuBLAS cannot do for us. Those
// are the shrink with the dropout mask generated in registers, u = dt * lam, the dropout-masked adapter term of
// dx, and dQ (partials per block of rows, no atomics: results are bitwise reproducible). The mask is the counter-based hash of dropout_hash.h, the same on the CPU.
#include "../dropout_hash.h"
#include "common.cuh"
#include "kernels.cuh"

namespace adalora_kernels {
namespace cuda {
namespace {

constexpr int kTileM = 32, kTileK = 32, kMaxR = 128, kThreads = 256;
constexpr int kOutPerThread = kTileM * kMaxR / kThreads;  // 16
constexpr int kRanksPerThread = 16;

template <typename T>
__global__ void shrink_dropout_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk, const T* __restrict__ q,
                                      T* __restrict__ t, int64_t M, int64_t K, int R, uint64_t seed,
                                      uint32_t threshold, typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  __shared__ A xs[kTileM][kTileK + 1];
  __shared__ A qs[kMaxR][kTileK + 1];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  A acc[kOutPerThread];
  for (int j = 0; j < kOutPerThread; ++j) acc[j] = A(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTileM * kTileK; e += kThreads) {
      const int i = e / kTileK, k = e % kTileK;
      const int64_t row = row0 + i, col = k0 + k;
      A v = A(0);
      if (row < M && col < K) {
        v = to_acc(x[row * sxm + col * sxk]);
        if (threshold > 0 &&
            !dropout_keep(dropout_row_key(seed, static_cast<uint64_t>(row)), static_cast<uint32_t>(col), threshold))
          v = A(0);
      }
      xs[i][k] = v;
    }
    for (int e = threadIdx.x; e < R * kTileK; e += kThreads) {
      const int r = e / kTileK, k = e % kTileK;
      const int64_t col = k0 + k;
      qs[r][k] = col < K ? to_acc(q[r * K + col]) : A(0);
    }
    __syncthreads();
    for (int j = 0; j < kOutPerThread; ++j) {
      const int o = threadIdx.x + j * kThreads;
      if (o < kTileM * R) {
        const int i = o / R, r = o % R;
        A s = A(0);
        for (int k = 0; k < kTileK; ++k) s += xs[i][k] * qs[r][k];
        acc[j] += s;
      }
    }
    __syncthreads();
  }
  for (int j = 0; j < kOutPerThread; ++j) {
    const int o = threadIdx.x + j * kThreads;
    if (o < kTileM * R) {
      const int64_t row = row0 + o / R;
      if (row < M) t[row * R + o % R] = from_acc<T>(acc[j] * scale);
    }
  }
}

template <typename T, typename A>
__global__ void scale_by_lam_kernel(const T* __restrict__ dt, const T* __restrict__ lam, A* __restrict__ u, int64_t M,
                                    int R) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * R) return;
  u[idx] = to_acc(dt[idx]) * to_acc(lam[idx % R]);
}

template <typename T, typename A>
__global__ void masked_adapter_dx_kernel(T* __restrict__ dx, const A* __restrict__ u, const T* __restrict__ q,
                                         int64_t M, int64_t K, int R, uint64_t seed, uint32_t threshold, A scale) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * K) return;
  const int64_t m = idx / K, k = idx % K;
  if (threshold > 0 &&
      !dropout_keep(dropout_row_key(seed, static_cast<uint64_t>(m)), static_cast<uint32_t>(k), threshold))
    return;
  A s = A(0);
  for (int r = 0; r < R; ++r) s += u[m * R + r] * to_acc(q[r * K + k]);
  dx[idx] = from_acc<T>(to_acc(dx[idx]) + s * scale);
}

// one partial of dQ per block of rows (blockIdx.z), each element written by one thread: no atomics
template <typename T, typename A>
__global__ void dq_kernel(const T* __restrict__ x, int64_t sxm, int64_t sxk, const A* __restrict__ u,
                          A* __restrict__ dq_part, int64_t M, int64_t K, int R, uint64_t seed, uint32_t threshold,
                          int64_t rows_per_block) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int r0 = blockIdx.y * kRanksPerThread;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_block;
  const int64_t m_end = m_begin + rows_per_block < M ? m_begin + rows_per_block : M;
  if (k >= K) return;
  A acc[kRanksPerThread];
  for (int j = 0; j < kRanksPerThread; ++j) acc[j] = A(0);
  for (int64_t m = m_begin; m < m_end; ++m) {
    if (threshold > 0 &&
        !dropout_keep(dropout_row_key(seed, static_cast<uint64_t>(m)), static_cast<uint32_t>(k), threshold))
      continue;
    const A xv = to_acc(x[m * sxm + k * sxk]);
    for (int j = 0; j < kRanksPerThread && r0 + j < R; ++j) acc[j] += u[m * R + r0 + j] * xv;
  }
  A* part = dq_part + static_cast<int64_t>(blockIdx.z) * R * K;
  for (int j = 0; j < kRanksPerThread && r0 + j < R; ++j) part[(r0 + j) * K + k] = acc[j];
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t rows, int64_t cols, uint64_t seed,
                                 uint32_t threshold) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * cols) return;
  const int64_t m = idx / cols;
  out[idx] = dropout_keep(dropout_row_key(seed, static_cast<uint64_t>(m)), static_cast<uint32_t>(idx % cols), threshold);
}

}  // namespace

template <typename T>
cudaError_t shrink_dropout(const T* x, int64_t sxm, int64_t sxk, const T* q, T* t, int64_t M, int64_t K, int R,
                           uint64_t seed, uint32_t threshold, double scale, cudaStream_t stream) {
  if (R > kMaxR) return cudaErrorInvalidValue;
  if (M == 0 || R == 0) return cudaSuccess;
  shrink_dropout_kernel<T><<<blocks_for(M, kTileM), kThreads, 0, stream>>>(
      x, sxm, sxk, q, t, M, K, R, seed, threshold, static_cast<typename AccOf<T>::type>(scale));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t scale_by_lam(const T* dt, const T* lam, A* u, int64_t M, int R, cudaStream_t stream) {
  if (M * R == 0) return cudaSuccess;
  scale_by_lam_kernel<T, A><<<blocks_for(M * R, kThreads), kThreads, 0, stream>>>(dt, lam, u, M, R);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t masked_adapter_dx(T* dx, const A* u, const T* q, int64_t M, int64_t K, int R, uint64_t seed,
                              uint32_t threshold, double scale, cudaStream_t stream) {
  if (M * K == 0 || R == 0) return cudaSuccess;
  masked_adapter_dx_kernel<T, A><<<blocks_for(M * K, kThreads), kThreads, 0, stream>>>(
      dx, u, q, M, K, R, seed, threshold, static_cast<A>(scale));
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t dq_partials(const T* x, int64_t sxm, int64_t sxk, const A* u, A* dq_part, int64_t M, int64_t K, int R,
                        uint64_t seed, uint32_t threshold, cudaStream_t stream) {
  if (M * K == 0 || R == 0) return cudaSuccess;
  const dim3 grid(blocks_for(K, kThreads), blocks_for(R, kRanksPerThread), static_cast<unsigned int>(dq_splits(M)));
  dq_kernel<T, A><<<grid, kThreads, 0, stream>>>(x, sxm, sxk, u, dq_part, M, K, R, seed, threshold, kDqRowsPerSplit);
  return cudaGetLastError();
}

cudaError_t keep_mask(bool* out, int64_t rows, int64_t cols, uint64_t seed, uint32_t threshold, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  keep_mask_kernel<<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(out, rows, cols, seed, threshold);
  return cudaGetLastError();
}

#define AK_INSTANTIATE(T, A)                                                                                      \
  template cudaError_t shrink_dropout<T>(const T*, int64_t, int64_t, const T*, T*, int64_t, int64_t, int,       \
                                         uint64_t, uint32_t, double, cudaStream_t);                             \
  template cudaError_t scale_by_lam<T, A>(const T*, const T*, A*, int64_t, int, cudaStream_t);                  \
  template cudaError_t masked_adapter_dx<T, A>(T*, const A*, const T*, int64_t, int64_t, int, uint64_t,         \
                                               uint32_t, double, cudaStream_t);                                 \
  template cudaError_t dq_partials<T, A>(const T*, int64_t, int64_t, const A*, A*, int64_t, int64_t, int,       \
                                         uint64_t, uint32_t, cudaStream_t);

AK_INSTANTIATE(float, float)
AK_INSTANTIATE(double, double)
AK_INSTANTIATE(__half, float)
AK_INSTANTIATE(__nv_bfloat16, float)

}  // namespace cuda
}  // namespace adalora_kernels
