// The csrc CUDA backend's two streaming passes, one work item at a time. Everything of the adapter that is a
// GEMM runs in cuBLAS (binding.cpp); what cuBLAS cannot do is the dropout mask, and these passes apply it:
//
//   dropout_scale   xd = drop(x) / (1 - p)                          read x once, write xd once
//   masked_expand   out = drop'((dt diag(lam)) Q) / (1 - p)         read dt (M x r) and Q (r x K), write out once
//
// masked_expand writes the adapter's share of dx into the buffer that cuBLAS then accumulates g W onto (addmm_
// with beta = 1), so dx is written once by the pass and once by the GEMM, never read-modified-written.
//
// An item is V consecutive columns (16 bytes where the pointers, strides and K allow, else V = 1) of
// kRowsPerItem consecutive rows: one Philox call per row and four columns (dropout_philox.h), and in
// masked_expand each Q vector loaded serves every row. Items are independent: no shared memory, no synchronisation, so the kernels
// are grid-stride loops over items, and the same functions compile with a host compiler for the float and double
// types, where tests/cuda_passes_host.cpp runs every item on the CPU against the reference.
#pragma once
#include <cstdint>

#include "../dropout_philox.h"
#include "common.cuh"

#if defined(__CUDA_ARCH__)
#define AK_UNROLL _Pragma("unroll")
#else
#define AK_UNROLL  // the host compiler (nvcc's host pass included) unrolls as it sees fit
#endif

namespace adalora_kernels {
namespace cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

constexpr int kRowsPerItem = 4;  // rows per work item of either pass

// V for a pass whose vectors start at base + row * row_stride + a multiple of V (elements of `bytes` each):
// 16 / bytes when every such address is 16-byte aligned and K is a multiple of it, else 1.
AK_HOST_DEVICE int vector_width(int bytes, int64_t K, const void* const* bases, const int64_t* row_strides, int n) {
  const int v = 16 / bytes;
  if (v <= 1 || K % v != 0) return 1;
  for (int i = 0; i < n; ++i) {
    if (reinterpret_cast<uintptr_t>(bases[i]) % 16 != 0 || row_strides[i] % v != 0) return 1;
  }
  return v;
}

// V contiguous elements from p: one 16-byte load where V > 1 (p aligned, as vector_width checked)
template <typename T, int V>
AK_HOST_DEVICE Vec<T, V> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

// keep[j] = keep(m, k0 + j) for the V columns from k0 (a multiple of V): one Philox call per four columns; V < 4
// takes its words from the one call that covers them.
template <int V>
AK_HOST_DEVICE void keep_bits(bool (&keep)[V], uint64_t seed, int64_t m, int64_t k0, uint32_t threshold) {
  if constexpr (V >= 4) {
    AK_UNROLL
    for (int g = 0; g < V / 4; ++g) {
      const PhiloxWords w = dropout_words(seed, static_cast<uint64_t>(m), static_cast<uint64_t>(k0 / 4 + g));
      AK_UNROLL
      for (int j = 0; j < 4; ++j) keep[4 * g + j] = dropout_keep_word(w.w[j], threshold);
    }
  } else {
    const PhiloxWords w = dropout_words(seed, static_cast<uint64_t>(m), static_cast<uint64_t>(k0 / 4));
    AK_UNROLL
    for (int j = 0; j < V; ++j) keep[j] = dropout_keep_word(word_at(w, static_cast<uint64_t>(k0 % 4 + j)), threshold);
  }
}

// xd[m, k0 .. k0 + V) = keep(m, k) ? x[m, k] * scale : 0 for the kRowsPerItem rows m of item (row group, k0 / V);
// xd is M x K contiguous. V > 1 needs x's column stride to be 1 (vector_width decides).
template <typename T, int V>
AK_HOST_DEVICE void dropout_scale_item(int64_t item, const T* x, int64_t sxm, int64_t sxk, T* xd, int64_t M,
                                       int64_t K, uint64_t seed, uint32_t threshold,
                                       typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  const int64_t per_row = K / V;
  const int64_t group = item / per_row, k0 = (item - group * per_row) * V, m0 = group * kRowsPerItem;
  AK_UNROLL
  for (int i = 0; i < kRowsPerItem; ++i) {
    const int64_t m = m0 + i;
    if (m >= M) continue;
    Vec<T, V> in;
    if (V > 1) {
      in = load_vec<T, V>(x + m * sxm + k0);
    } else {
      in.v[0] = x[m * sxm + k0 * sxk];
    }
    bool keep[V];
    keep_bits<V>(keep, seed, m, k0, threshold);
    Vec<T, V> out;
    AK_UNROLL
    for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(keep[j] ? to_acc(in.v[j]) * scale : A(0));
    *reinterpret_cast<Vec<T, V>*>(xd + m * K + k0) = out;
  }
}

// out[m, k0 .. k0 + V) for the kRowsPerItem rows m of item (row group, k0 / V):
//   keep(m, k) ? scale * sum_r (dt[m, r] * lam[r]) * Q[r, k] : 0, summed in A (u = dt * lam rounded in A, as
// the reference's u). threshold 0: no dropout (every element kept). dt (M x R), lam (R), Q (R x K) and out
// (M x K) contiguous.
template <typename T, int V>
AK_HOST_DEVICE void masked_expand_item(int64_t item, const T* dt, const T* lam, const T* q, T* out, int64_t M,
                                       int64_t K, int R, uint64_t seed, uint32_t threshold,
                                       typename AccOf<T>::type scale) {
  using A = typename AccOf<T>::type;
  const int64_t per_row = K / V;
  const int64_t group = item / per_row, k0 = (item - group * per_row) * V, m0 = group * kRowsPerItem;
  const int64_t last = M - 1;  // a tail group's missing rows read the last row's u (their sums are not stored)
  A acc[kRowsPerItem][V];
  AK_UNROLL
  for (int i = 0; i < kRowsPerItem; ++i) {
    AK_UNROLL
    for (int j = 0; j < V; ++j) acc[i][j] = A(0);
  }
  for (int r = 0; r < R; ++r) {
    const Vec<T, V> qv = load_vec<T, V>(q + r * K + k0);
    const A l = to_acc(lam[r]);
    AK_UNROLL
    for (int i = 0; i < kRowsPerItem; ++i) {
      const A u = to_acc(dt[(m0 + i < M ? m0 + i : last) * R + r]) * l;
      AK_UNROLL
      for (int j = 0; j < V; ++j) acc[i][j] += u * to_acc(qv.v[j]);
    }
  }
  AK_UNROLL
  for (int i = 0; i < kRowsPerItem; ++i) {
    if (m0 + i >= M) continue;
    bool keep[V];
    if (threshold > 0) {
      keep_bits<V>(keep, seed, m0 + i, k0, threshold);
    } else {
      AK_UNROLL
      for (int j = 0; j < V; ++j) keep[j] = true;
    }
    Vec<T, V> o;
    AK_UNROLL
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(keep[j] ? acc[i][j] * scale : A(0));
    *reinterpret_cast<Vec<T, V>*>(out + (m0 + i) * K + k0) = o;
  }
}

// the items of either pass: groups of kRowsPerItem rows times vectors of V columns
AK_HOST_DEVICE int64_t pass_items(int64_t M, int64_t K, int V) { return (M + kRowsPerItem - 1) / kRowsPerItem * (K / V); }

}  // namespace cuda
}  // namespace adalora_kernels
