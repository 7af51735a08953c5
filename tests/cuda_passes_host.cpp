// The csrc CUDA backend's streaming passes (csrc/cuda/adapter_passes.cuh) built with the host compiler, for
// tests/test_csrc_cuda_passes.py: every item of a pass run in turn on the CPU, as the CUDA kernels' grid-stride
// loops run them on the GPU (the items are independent). float and double; V as the launcher would pick it.
#include "adapter_passes.cuh"

using namespace adalora_kernels::cuda;

namespace {

template <typename T, int V>
void scale_all(const T* x, int64_t sxm, int64_t sxk, T* xd, int64_t M, int64_t K, uint64_t seed, uint32_t thr,
               T scale) {
  for (int64_t i = 0; i < pass_items(M, K, V); ++i) dropout_scale_item<T, V>(i, x, sxm, sxk, xd, M, K, seed, thr, scale);
}

template <typename T, int V>
void expand_all(const T* dt, const T* lam, const T* q, T* out, int64_t M, int64_t K, int R, uint64_t seed,
                uint32_t thr, T scale) {
  for (int64_t i = 0; i < pass_items(M, K, V); ++i)
    masked_expand_item<T, V>(i, dt, lam, q, out, M, K, R, seed, thr, scale);
}

template <typename T>
int scale_v(int v, const T* x, int64_t sxm, int64_t sxk, T* xd, int64_t M, int64_t K, uint64_t seed, uint32_t thr,
            T scale) {
  switch (v) {
    case 1: scale_all<T, 1>(x, sxm, sxk, xd, M, K, seed, thr, scale); return 0;
    case 2: scale_all<T, 2>(x, sxm, sxk, xd, M, K, seed, thr, scale); return 0;
    case 4: scale_all<T, 4>(x, sxm, sxk, xd, M, K, seed, thr, scale); return 0;
    case 8: scale_all<T, 8>(x, sxm, sxk, xd, M, K, seed, thr, scale); return 0;
  }
  return 1;
}

template <typename T>
int expand_v(int v, const T* dt, const T* lam, const T* q, T* out, int64_t M, int64_t K, int R, uint64_t seed,
             uint32_t thr, T scale) {
  switch (v) {
    case 1: expand_all<T, 1>(dt, lam, q, out, M, K, R, seed, thr, scale); return 0;
    case 2: expand_all<T, 2>(dt, lam, q, out, M, K, R, seed, thr, scale); return 0;
    case 4: expand_all<T, 4>(dt, lam, q, out, M, K, R, seed, thr, scale); return 0;
    case 8: expand_all<T, 8>(dt, lam, q, out, M, K, R, seed, thr, scale); return 0;
  }
  return 1;
}

}  // namespace

extern "C" {

int ak_vector_width(int bytes, int64_t K, const void* a, int64_t sa, const void* b, int64_t sb) {
  const void* bases[] = {a, b};
  const int64_t strides[] = {sa, sb};
  return vector_width(bytes, K, bases, strides, 2);
}

uint32_t ak_dropout_threshold(double p) { return adalora_kernels::dropout_threshold(p); }

int ak_dropout_scale_f32(const float* x, int64_t sxm, int64_t sxk, float* xd, int64_t M, int64_t K, uint64_t seed,
                         uint32_t thr, float scale, int v) {
  return scale_v<float>(v, x, sxm, sxk, xd, M, K, seed, thr, scale);
}
int ak_dropout_scale_f64(const double* x, int64_t sxm, int64_t sxk, double* xd, int64_t M, int64_t K, uint64_t seed,
                         uint32_t thr, double scale, int v) {
  return scale_v<double>(v, x, sxm, sxk, xd, M, K, seed, thr, scale);
}
int ak_masked_expand_f32(const float* dt, const float* lam, const float* q, float* out, int64_t M, int64_t K, int R,
                         uint64_t seed, uint32_t thr, float scale, int v) {
  return expand_v<float>(v, dt, lam, q, out, M, K, R, seed, thr, scale);
}
int ak_masked_expand_f64(const double* dt, const double* lam, const double* q, double* out, int64_t M, int64_t K,
                         int R, uint64_t seed, uint32_t thr, double scale, int v) {
  return expand_v<double>(v, dt, lam, q, out, M, K, R, seed, thr, scale);
}
}
