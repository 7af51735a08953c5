// The dropout mask of the csrc backend, shared by the CPU and CUDA code (no torch headers).
//
// Element (row, col) of the M x in adapter input is kept when the top 24 bits of a counter-based hash of
// (seed, row, col) reach the threshold ceil(p * 2^24): a pure function of the seed and the position, so
// backward regenerates the forward's mask exactly and nothing is stored. Two rounds of murmur3's 32-bit
// finaliser (fmix32) per element, one per row; 32-bit multiplies only, so it vectorises (AVX2, GPUs).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define AK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AK_HOST_DEVICE inline
#endif

namespace adalora_kernels {

AK_HOST_DEVICE uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

// Per-row key: mixes both halves of the 64-bit seed with the row index.
AK_HOST_DEVICE uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(seed >> 32);
  return fmix32(fmix32(lo ^ 0x9e3779b9u) ^ hi ^ fmix32(static_cast<uint32_t>(row) + 0x7f4a7c15u) ^
                static_cast<uint32_t>(row >> 32));
}

// Per-column key: the inner round, the same for every row (loops over many rows compute it once).
AK_HOST_DEVICE uint32_t dropout_col_key(uint32_t col) { return fmix32(col * 0x9e3779b1u + 0x632be5abu); }

AK_HOST_DEVICE bool dropout_keep_keyed(uint32_t row_key, uint32_t col_key, uint32_t threshold) {
  return (fmix32(col_key ^ row_key) >> 8) >= threshold;
}

AK_HOST_DEVICE bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return dropout_keep_keyed(row_key, dropout_col_key(col), threshold);
}

// ceil(p * 2^24): P(keep) = 1 - threshold / 2^24, within 2^-24 of 1 - p.
inline uint32_t dropout_threshold(double p) {
  double scaled = p * 16777216.0;
  uint32_t t = static_cast<uint32_t>(scaled);
  return (static_cast<double>(t) < scaled) ? t + 1 : t;
}

}  // namespace adalora_kernels
