// Register-tiled float32 kernels for the rank-r products (see rank_products.h), written once over GCC vector
// types and compiled three times with tiles sized to the registers of each: AVX-512 (32 registers of 16
// floats), AVX2 (16 of 8) and baseline x86-64/other (16 of 4). cpu_isa() picks one, once.
#include "rank_products.h"

#include <algorithm>
#include <cstring>

#include "isa.h"

// Vectors are only passed between inlined helpers, never across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// Every helper is forced inline: an entry point's target attribute only reaches code inlined into it.
#define AK_INLINE __attribute__((always_inline)) inline

namespace adalora_kernels {
namespace {

template <int64_t L>
struct VecOf;  // GCC wants a literal vector_size, so one specialisation per width
template <>
struct VecOf<4> {
  typedef float type __attribute__((vector_size(16)));
};
template <>
struct VecOf<8> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<16> {
  typedef float type __attribute__((vector_size(64)));
};

// L lanes per vector; tiles: dot products of DR rows x DJ ranks, outer products of OJ ranks x 2 vectors of
// columns, rank updates of UR rows x 2 vectors of columns, each small enough to live in registers.
template <int64_t L, int64_t DR, int64_t DJ, int64_t OJ, int64_t UR>
struct Tiles {
  typedef typename VecOf<L>::type vf;

  static AK_INLINE vf load(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }

  static AK_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

  static AK_INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int64_t l = 0; l < L; ++l) s += v[l];
    return s;
  }

  static AK_INLINE void dot_tile(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B,
                                 int64_t ld_b, int64_t i0, int64_t ni, int64_t j0, int64_t nj, int64_t K) {
    const int64_t K_vec = K - K % L;
    vf acc[DR][DJ] = {};
    for (int64_t k = 0; k < K_vec; k += L) {
      vf x[DR];
      for (int64_t i = 0; i < DR; ++i) x[i] = i < ni ? load(a + (i0 + i) * ld_a + k) : vf{};
      for (int64_t j = 0; j < DJ; ++j) {
        if (j >= nj) break;
        const vf b = load(B + (j0 + j) * ld_b + k);
        for (int64_t i = 0; i < DR; ++i) acc[i][j] += x[i] * b;
      }
    }
    for (int64_t i = 0; i < ni; ++i) {
      for (int64_t j = 0; j < nj; ++j) {
        float s = hsum(acc[i][j]);
        for (int64_t k = K_vec; k < K; ++k) s += a[(i0 + i) * ld_a + k] * B[(j0 + j) * ld_b + k];
        out[(j0 + j) * ld_out + i0 + i] = s;
      }
    }
  }

  static AK_INLINE void dot(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B, int64_t ld_b,
                            int64_t rows, int64_t R, int64_t K) {
    for (int64_t i0 = 0; i0 < rows; i0 += DR) {
      for (int64_t j0 = 0; j0 < R; j0 += DJ) {
        dot_tile(out, ld_out, a, ld_a, B, ld_b, i0, std::min(DR, rows - i0), j0, std::min(DJ, R - j0), K);
      }
    }
  }

  // OJ ranks x 2L columns of C stay in registers while every row streams past
  static AK_INLINE void outer(float* C, int64_t ld_c, Factor S, const float* a, int64_t ld_a, int64_t rows,
                              int64_t R, int64_t K) {
    const int64_t K_vec = K - K % (2 * L);
    for (int64_t j0 = 0; j0 < R; j0 += OJ) {
      const int64_t nj = std::min(OJ, R - j0);
      for (int64_t k = 0; k < K_vec; k += 2 * L) {
        vf acc[OJ][2] = {};
        for (int64_t j = 0; j < nj; ++j) {
          acc[j][0] = load(C + (j0 + j) * ld_c + k);
          acc[j][1] = load(C + (j0 + j) * ld_c + k + L);
        }
        for (int64_t i = 0; i < rows; ++i) {
          const vf x0 = load(a + i * ld_a + k), x1 = load(a + i * ld_a + k + L);
          const float* s = S.data + i * S.s_row + j0 * S.s_col;
          for (int64_t j = 0; j < OJ; ++j) {
            if (j >= nj) break;
            const float sj = s[j * S.s_col];
            acc[j][0] += sj * x0;
            acc[j][1] += sj * x1;
          }
        }
        for (int64_t j = 0; j < nj; ++j) {
          store(C + (j0 + j) * ld_c + k, acc[j][0]);
          store(C + (j0 + j) * ld_c + k + L, acc[j][1]);
        }
      }
      for (int64_t k = K_vec; k < K; ++k) {
        for (int64_t j = j0; j < j0 + nj; ++j) {
          float c = C[j * ld_c + k];
          for (int64_t i = 0; i < rows; ++i) c += S.data[i * S.s_row + j * S.s_col] * a[i * ld_a + k];
          C[j * ld_c + k] = c;
        }
      }
    }
  }

  // UR rows x 2L columns of out stay in registers while every rank streams past
  static AK_INLINE void update(float* out, int64_t ld_out, Factor S, const float* B, int64_t ld_b, const float* bias,
                               int64_t rows, int64_t R, int64_t K) {
    const int64_t K_vec = K - K % (2 * L);
    for (int64_t i0 = 0; i0 < rows; i0 += UR) {
      const int64_t ni = std::min(UR, rows - i0);
      for (int64_t k = 0; k < K_vec; k += 2 * L) {
        const vf b0 = bias != nullptr ? load(bias + k) : vf{};
        const vf b1 = bias != nullptr ? load(bias + k + L) : vf{};
        vf acc[UR][2];
        for (int64_t i = 0; i < UR; ++i) acc[i][0] = b0, acc[i][1] = b1;
        for (int64_t j = 0; j < R; ++j) {
          const vf B0 = load(B + j * ld_b + k), B1 = load(B + j * ld_b + k + L);
          for (int64_t i = 0; i < UR; ++i) {
            if (i >= ni) break;
            const float s = S.data[(i0 + i) * S.s_row + j * S.s_col];
            acc[i][0] += s * B0;
            acc[i][1] += s * B1;
          }
        }
        for (int64_t i = 0; i < ni; ++i) {
          store(out + (i0 + i) * ld_out + k, acc[i][0]);
          store(out + (i0 + i) * ld_out + k + L, acc[i][1]);
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
};

using Baseline = Tiles<4, 2, 6, 6, 4>;

#if defined(__x86_64__) && defined(__GNUC__)
#define AK_X86 1
using Avx2 = Tiles<8, 3, 4, 6, 4>;  // 3 x 4 dot tiles: 10 % faster than 2 x 6 here
using Avx512 = Tiles<16, 4, 6, 6, 4>;
#endif

struct Table {
  void (*dot)(float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t);
  void (*outer)(float*, int64_t, Factor, const float*, int64_t, int64_t, int64_t, int64_t);
  void (*update)(float*, int64_t, Factor, const float*, int64_t, const float*, int64_t, int64_t, int64_t);
};

// One table of entry points per instruction set; each entry's body is compiled for that set.
#define AK_TABLE(NAME, T, ATTR)                                                                                    \
  ATTR void NAME##_dot(float* o, int64_t lo, const float* a, int64_t la, const float* B, int64_t lb, int64_t rows, \
                       int64_t R, int64_t K) {                                                                     \
    T::dot(o, lo, a, la, B, lb, rows, R, K);                                                                       \
  }                                                                                                                \
  ATTR void NAME##_outer(float* C, int64_t lc, Factor S, const float* a, int64_t la, int64_t rows, int64_t R,      \
                         int64_t K) {                                                                              \
    T::outer(C, lc, S, a, la, rows, R, K);                                                                         \
  }                                                                                                                \
  ATTR void NAME##_update(float* o, int64_t lo, Factor S, const float* B, int64_t lb, const float* bias,           \
                          int64_t rows, int64_t R, int64_t K) {                                                    \
    T::update(o, lo, S, B, lb, bias, rows, R, K);                                                                  \
  }                                                                                                                \
  constexpr Table NAME##_table{NAME##_dot, NAME##_outer, NAME##_update};

AK_TABLE(baseline, Baseline, )
#ifdef AK_X86
AK_TABLE(avx2, Avx2, __attribute__((target("avx2"))))
AK_TABLE(avx512, Avx512, __attribute__((target("avx512f"))))
#endif

// The table of the instruction set cpu_isa() names.
const Table& table() {
  static const Table& chosen = [] () -> const Table& {
#ifdef AK_X86
    switch (cpu_isa()) {
      case CpuIsa::kAvx512:
        return avx512_table;
      case CpuIsa::kAvx2:
        return avx2_table;
      case CpuIsa::kBaseline:
        break;
    }
#else
    cpu_isa();  // an unknown ADALORA_KERNELS_CPU_ISA is refused on every machine
#endif
    return baseline_table;
  }();
  return chosen;
}

}  // namespace

void rank_dot(float* out, int64_t ld_out, const float* a, int64_t ld_a, const float* B, int64_t ld_b, int64_t rows,
              int64_t R, int64_t K) {
  table().dot(out, ld_out, a, ld_a, B, ld_b, rows, R, K);
}

void rank_outer(float* C, int64_t ld_c, Factor S, const float* a, int64_t ld_a, int64_t rows, int64_t R, int64_t K) {
  table().outer(C, ld_c, S, a, ld_a, rows, R, K);
}

void rank_update(float* out, int64_t ld_out, Factor S, const float* B, int64_t ld_b, const float* bias, int64_t rows,
                 int64_t R, int64_t K) {
  table().update(out, ld_out, S, B, ld_b, bias, rows, R, K);
}

}  // namespace adalora_kernels
