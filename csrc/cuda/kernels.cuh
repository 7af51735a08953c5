// Launchers of the csrc backend's CUDA kernels. No torch headers: raw pointers, strides and a stream, so
// the .cu files compile with plain nvcc. Each launcher returns the launch's cudaError_t for the caller to check.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace adalora_kernels {
namespace cuda {

// xd (M x K, contiguous) = drop(x) * scale, x strided (sxm, sxk); 16-byte vectors where the layout allows
template <typename T>
cudaError_t dropout_scale(const T* x, int64_t sxm, int64_t sxk, T* xd, int64_t M, int64_t K, uint64_t seed,
                          uint32_t threshold, double scale, cudaStream_t stream);

// out (M x K, contiguous) = drop'((dt diag(lam)) Q) * scale, the products summed in float (double for double);
// threshold 0: no mask. dt (M x R), lam (R), Q (R x K) contiguous; any R.
template <typename T>
cudaError_t masked_expand(const T* dt, const T* lam, const T* q, T* out, int64_t M, int64_t K, int R, uint64_t seed,
                          uint32_t threshold, double scale, cudaStream_t stream);

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
