// Float32 kernels for the rank-r products of the fused linear layer on the CPU, on blocks of rows that are
// in cache. oneDNN/MKL run these skinny shapes (one side only r = 1..128 wide) at a third to two thirds of the
// machine's peak; register-tiled loops over GCC vector types, built for AVX-512, AVX2 and baseline x86-64
// (or the target's own SIMD elsewhere), run them 1.7 to 3 times faster on blocks of 64 rows (AVX-512,
// measured against MKL on the 2-core CI machine).
//
// Conventions: rows x K operands are row-major with row stride ld and unit column stride; an r-wide factor
// S is addressed S[i * s_row + j * s_col], so that t and dt can be read in either layout.
#pragma once
#include <cstdint>

namespace adalora_kernels {

struct Factor {  // an r-wide operand S, S[i, j] = data[i * s_row + j * s_col]
  const float* data;
  int64_t s_row, s_col;
};

// out[j * ld_out + i] = sum_k a[i, k] * B[j, k] for i < rows, j < R (B is R x K, row stride ld_b).
void rank_dot(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B, int64_t ld_b, int64_t rows,
              int64_t R, int64_t K);

// C[j, k] += sum_i S[i, j] * a[i, k] (C is R x K, row stride ld_c).
void rank_outer(float* C, int64_t ld_c, Factor S, const float* a, int64_t ld_a, int64_t rows, int64_t R, int64_t K);

// out[i, k] = bias[k] + sum_j S[i, j] * B[j, k] (B is R x K, row stride ld_b; bias nullable).
void rank_update(float* out, int64_t ld_out, Factor S, const float* B, int64_t ld_b, const float* bias, int64_t rows,
                 int64_t R, int64_t K);

}  // namespace adalora_kernels
