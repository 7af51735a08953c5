// Register-tiled float32 kernels for the rank-r products (see rank_products.h). A vf holds 16 floats: one
// AVX-512 register, two AVX2 ones, four SSE ones; target_clones builds each entry point for all three.
#include "rank_products.h"

#include <algorithm>
#include <cstring>

// Every helper is forced inline: the entry points' target_clones only reach code inlined into them.
#define AK_INLINE __attribute__((always_inline)) inline

namespace adalora_kernels {
namespace {

typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

AK_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

AK_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

AK_INLINE float hsum(vf v) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// ---- rank_dot: 4 rows x 6 ranks of dot products, 16 columns at a time
constexpr int64_t kDotRows = 4, kDotRanks = 6;

AK_INLINE void dot_tile(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B, int64_t ld_b,
                        int64_t i0, int64_t ni, int64_t j0, int64_t nj, int64_t K) {
  const int64_t K_vec = K - K % kLanes;
  vf acc[kDotRows][kDotRanks] = {};
  for (int64_t k = 0; k < K_vec; k += kLanes) {
    vf x[kDotRows];
    for (int64_t i = 0; i < kDotRows; ++i) {
      x[i] = i < ni ? load(a + (i0 + i) * ld_a + k) : vf{};
    }
    for (int64_t j = 0; j < kDotRanks; ++j) {
      if (j >= nj) break;
      const vf b = load(B + (j0 + j) * ld_b + k);
      for (int64_t i = 0; i < kDotRows; ++i) acc[i][j] += x[i] * b;
    }
  }
  for (int64_t i = 0; i < ni; ++i) {
    for (int64_t j = 0; j < nj; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K_vec; k < K; ++k) {
        s += a[(i0 + i) * ld_a + k] * B[(j0 + j) * ld_b + k];
      }
      out[(j0 + j) * ld_out + i0 + i] = s;
    }
  }
}


// ---- rank_outer: 6 ranks x 32 columns of C held in registers while every row streams past
constexpr int64_t kOuterRanks = 6, kOuterCols = 2 * kLanes;

AK_INLINE void outer_impl(float* C, int64_t ld_c, Factor S, const float* a, int64_t ld_a, int64_t rows, int64_t R,
                          int64_t K) {
  const int64_t K_vec = K - K % kOuterCols;
  for (int64_t j0 = 0; j0 < R; j0 += kOuterRanks) {
    const int64_t nj = std::min(kOuterRanks, R - j0);
    for (int64_t k = 0; k < K_vec; k += kOuterCols) {
      vf acc[kOuterRanks][2] = {};
      for (int64_t j = 0; j < nj; ++j) {
        acc[j][0] = load(C + (j0 + j) * ld_c + k);
        acc[j][1] = load(C + (j0 + j) * ld_c + k + kLanes);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const vf x0 = load(a + i * ld_a + k), x1 = load(a + i * ld_a + k + kLanes);
        const float* s = S.data + i * S.s_row + j0 * S.s_col;
        for (int64_t j = 0; j < kOuterRanks; ++j) {
          if (j >= nj) break;
          const float sj = s[j * S.s_col];
          acc[j][0] += sj * x0;
          acc[j][1] += sj * x1;
        }
      }
      for (int64_t j = 0; j < nj; ++j) {
        store(C + (j0 + j) * ld_c + k, acc[j][0]);
        store(C + (j0 + j) * ld_c + k + kLanes, acc[j][1]);
      }
    }
    for (int64_t k = K_vec; k < K; ++k) {
      for (int64_t j = j0; j < j0 + nj; ++j) {
        float c = C[j * ld_c + k];
        for (int64_t i = 0; i < rows; ++i) {
          c += S.data[i * S.s_row + j * S.s_col] * a[i * ld_a + k];
        }
        C[j * ld_c + k] = c;
      }
    }
  }
}

// ---- rank_update: 4 rows x 32 columns of out in registers while every rank streams past
constexpr int64_t kUpdateRows = 4, kUpdateCols = 2 * kLanes;

AK_INLINE void update_impl(float* out, int64_t ld_out, Factor S, const float* B, int64_t ld_b, const float* bias,
                           int64_t rows, int64_t R, int64_t K) {
  const int64_t K_vec = K - K % kUpdateCols;
  for (int64_t i0 = 0; i0 < rows; i0 += kUpdateRows) {
    const int64_t ni = std::min(kUpdateRows, rows - i0);
    for (int64_t k = 0; k < K_vec; k += kUpdateCols) {
      const vf b0 = bias != nullptr ? load(bias + k) : vf{};
      const vf b1 = bias != nullptr ? load(bias + k + kLanes) : vf{};
      vf acc[kUpdateRows][2];
      for (int64_t i = 0; i < kUpdateRows; ++i) acc[i][0] = b0, acc[i][1] = b1;
      for (int64_t j = 0; j < R; ++j) {
        const vf B0 = load(B + j * ld_b + k), B1 = load(B + j * ld_b + k + kLanes);
        for (int64_t i = 0; i < kUpdateRows; ++i) {
          if (i >= ni) break;
          const float s = S.data[(i0 + i) * S.s_row + j * S.s_col];
          acc[i][0] += s * B0;
          acc[i][1] += s * B1;
        }
      }
      for (int64_t i = 0; i < ni; ++i) {
        float* o = out + (i0 + i) * ld_out + k;
        store(o, acc[i][0]);
        store(o + kLanes, acc[i][1]);
      }
    }
    for (int64_t i = i0; i < i0 + ni; ++i) {
      for (int64_t k = K_vec; k < K; ++k) {
        float v = bias != nullptr ? bias[k] : 0.0f;
        for (int64_t j = 0; j < R; ++j) v += S.data[i * S.s_row + j * S.s_col] * B[j * ld_b + k];
        out[i * ld_out + k] = v;
      }
    }
  }
}

}  // namespace

#define AK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

AK_CLONES void rank_dot(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B, int64_t ld_b,
                        int64_t rows, int64_t R, int64_t K) {
  for (int64_t i0 = 0; i0 < rows; i0 += kDotRows) {
    for (int64_t j0 = 0; j0 < R; j0 += kDotRanks) {
      dot_tile(out, ld_out, a, ld_a, B, ld_b, i0, std::min(kDotRows, rows - i0), j0, std::min(kDotRanks, R - j0), K);
    }
  }
}

AK_CLONES void rank_outer(float* C, int64_t ld_c, Factor S, const float* a, int64_t ld_a, int64_t rows, int64_t R,
                          int64_t K) {
  outer_impl(C, ld_c, S, a, ld_a, rows, R, K);
}

AK_CLONES void rank_update(float* out, int64_t ld_out, Factor S, const float* B, int64_t ld_b, const float* bias,
                           int64_t rows, int64_t R, int64_t K) {
  update_impl(out, ld_out, S, B, ld_b, bias, rows, R, K);
}

}  // namespace adalora_kernels
