// CUDA kernel of the rank allocator's device work: one launch updates PEFT's sensitivity EMAs of every layer
// in place and writes every triplet score, through a pointer table. One block per triplet owns row i of Q,
// column i of P and lam_i; the block reduces the two means. Built with --fmad=false, so each product and
// sum is rounded on its own, as in PEFT's separate ops.
#include "common.cuh"
#include "kernels.cuh"

namespace adalora_kernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T ema_step(const T* p, const T* g, T* ipt_avg, T* unc_avg, int64_t e, T b1, T c1, T b2,
                                      T c2) {
  const T ipt = fabs(p[e] * g[e]);
  const T a = b1 * ipt_avg[e] + c1 * ipt;
  ipt_avg[e] = a;
  const T u = b2 * unc_avg[e] + c2 * fabs(ipt - a);
  unc_avg[e] = u;
  return a * u;
}

template <typename T>
__device__ T block_sum(T v, T* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void sensitivity_kernel(const int64_t* __restrict__ table, const int32_t* __restrict__ tri_layer,
                                   const int32_t* __restrict__ tri_rank, const T* __restrict__ coef,
                                   T* __restrict__ scores) {
  __shared__ T scratch[kThreads];
  const int64_t* row = table + static_cast<int64_t>(tri_layer[blockIdx.x]) * 16;
  const int64_t i = tri_rank[blockIdx.x];
  const int64_t out_f = row[12], in_f = row[13], r = row[14];
  const T b1 = coef[0], c1 = coef[1], b2 = coef[2], c2 = coef[3];
  auto ptr = [&](int col) { return reinterpret_cast<T*>(row[col]); };
  T q_part = T(0), p_part = T(0);
  for (int64_t k = threadIdx.x; k < in_f; k += kThreads)
    q_part += ema_step(ptr(4), ptr(5), ptr(6), ptr(7), i * in_f + k, b1, c1, b2, c2);
  for (int64_t o = threadIdx.x; o < out_f; o += kThreads)
    p_part += ema_step(ptr(0), ptr(1), ptr(2), ptr(3), o * r + i, b1, c1, b2, c2);
  const T q_sum = block_sum(q_part, scratch);
  const T p_sum = block_sum(p_part, scratch);
  if (threadIdx.x == 0) {
    const T s_lam = ema_step(ptr(8), ptr(9), ptr(10), ptr(11), i, b1, c1, b2, c2);
    scores[blockIdx.x] = s_lam + (q_sum / static_cast<T>(in_f) + p_sum / static_cast<T>(out_f));
  }
}

}  // namespace

template <typename T>
cudaError_t sensitivity_update(const int64_t* table, const int32_t* tri_layer, const int32_t* tri_rank,
                               const T* coef, T* scores, int64_t triplets, cudaStream_t stream) {
  if (triplets == 0) return cudaSuccess;
  sensitivity_kernel<T><<<static_cast<unsigned int>(triplets), kThreads, 0, stream>>>(table, tri_layer, tri_rank,
                                                                                        coef, scores);
  return cudaGetLastError();
}

template cudaError_t sensitivity_update<float>(const int64_t*, const int32_t*, const int32_t*, const float*, float*,
                                               int64_t, cudaStream_t);
template cudaError_t sensitivity_update<double>(const int64_t*, const int32_t*, const int32_t*, const double*,
                                                double*, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace adalora_kernels
