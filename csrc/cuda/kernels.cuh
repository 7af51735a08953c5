// Launchers of the csrc backend's CUDA kernels. No torch headers: raw pointers, strides and a stream, so
// the .cu files compile with plain nvcc. Each launcher returns the launch's cudaError_t for the caller to check.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace adalora_kernels {
namespace cuda {

// t (M x R, contiguous) = drop(x) Q^T * scale; x strided (sxm, sxk), Q (R x K) contiguous; R <= 128.
// threshold 0 means no dropout.
template <typename T>
cudaError_t shrink_dropout(const T* x, int64_t sxm, int64_t sxk, const T* q, T* t, int64_t M, int64_t K, int R,
                           uint64_t seed, uint32_t threshold, double scale, cudaStream_t stream);

// u = dt * lam (acc type); dt (M x R) and lam (R) contiguous
template <typename T, typename A>
cudaError_t scale_by_lam(const T* dt, const T* lam, A* u, int64_t M, int R, cudaStream_t stream);

// dx (M x K, contiguous) += drop'(u Q) * scale
template <typename T, typename A>
cudaError_t masked_adapter_dx(T* dx, const A* u, const T* q, int64_t M, int64_t K, int R, uint64_t seed,
                              uint32_t threshold, double scale, cudaStream_t stream);

// dq_part (dq_splits(M) x R x K) = u^T drop(x) over each split's rows, without the 1/(1-p) scale; summed by the
// caller in a fixed order, so dQ is bitwise reproducible (no atomics)
constexpr int64_t kDqRowsPerSplit = 256;
inline int64_t dq_splits(int64_t M) { return M > 0 ? (M + kDqRowsPerSplit - 1) / kDqRowsPerSplit : 1; }
template <typename T, typename A>
cudaError_t dq_partials(const T* x, int64_t sxm, int64_t sxk, const A* u, A* dq_part, int64_t M, int64_t K, int R,
                        uint64_t seed, uint32_t threshold, cudaStream_t stream);

// out (rows x cols) = the keep-mask the kernels above apply
cudaError_t keep_mask(bool* out, int64_t rows, int64_t cols, uint64_t seed, uint32_t threshold, cudaStream_t stream);

// PEFT's sensitivity EMAs and the triplet scores of every layer in one launch. table: 16 int64 per layer
// (pointers to P, dP, Ibar_P, Ubar_P, Q, dQ, Ibar_Q, Ubar_Q, lam, dlam, Ibar_lam, Ubar_lam; out, in, r, 0),
// tri_layer / tri_rank: the layer and the rank of each triplet; coef: beta1, 1-beta1, beta2, 1-beta2.
template <typename T>
cudaError_t sensitivity_update(const int64_t* table, const int32_t* tri_layer, const int32_t* tri_rank,
                               const T* coef, T* scores, int64_t triplets, cudaStream_t stream);

}  // namespace cuda
}  // namespace adalora_kernels
