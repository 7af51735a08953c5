// The keep-mask of a block of rows, one version per instruction set (cpu_isa()), all bit for bit
// dropout_philox.h's. The vector versions run Philox4x32-10 for 16 (AVX-512) or 8 (AVX2) column groups at once:
// each lane a counter (group, row, 0, 0), the 32x32 -> 64-bit products taken for the even and the odd lanes
// (vpmuludq) and their halves blended back into 32-bit lanes. The keep bits of a group's four words land in the
// four bytes of its 32-bit lane (word j shifted by 8 j), which in memory are the group's four columns in order,
// so a vector of lanes is stored as the mask's bytes directly. About 3x (AVX-512) and 2x (AVX2) the scalar
// version's speed on the CI machine.
#include "dropout_mask.h"

#include <algorithm>
#include <cstring>

#include "../dropout_philox.h"
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define AK_X86 1
#include <immintrin.h>
#endif

namespace adalora_kernels {
namespace {

constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u, kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

// The words of a chunk of column groups drawn first (a loop over groups the compiler vectorises in part), then
// compared in column order.
void keep_rows_scalar(uint8_t* mask, int64_t rows, int64_t cols, int64_t row0, uint64_t seed, uint32_t threshold) {
  constexpr int64_t kChunk = 64;  // column groups (of four) per draw
  uint32_t words[4 * kChunk];  // column 4 g + j's word at 4 g + j
  const int64_t groups = (cols + 3) / 4;
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t row = static_cast<uint32_t>(row0 + i);
    uint8_t* m = mask + i * cols;
    for (int64_t g0 = 0; g0 < groups; g0 += kChunk) {
      const int64_t n = std::min(kChunk, groups - g0);
      for (int64_t g = 0; g < n; ++g) {
        const PhiloxWords w = philox4x32_10(seed, static_cast<uint32_t>(g0 + g), row);
        for (int j = 0; j < 4; ++j) words[4 * g + j] = w.w[j];
      }
      const int64_t c0 = 4 * g0, c1 = std::min(cols, 4 * (g0 + n));
      for (int64_t k = c0; k < c1; ++k) m[k] = dropout_keep_word(words[k - c0], threshold);
    }
  }
}

#ifdef AK_X86

// The bytes of a vector of lanes (each holding four mask bytes) stored from m, the last `bytes` of them only.
template <int64_t kBytes, typename V>
__attribute__((always_inline)) inline void store_bytes(uint8_t* m, const V& v, int64_t bytes) {
  alignas(64) uint8_t staged[kBytes];
  std::memcpy(staged, &v, kBytes);
  std::memcpy(m, staged, static_cast<size_t>(std::min(bytes, kBytes)));
}

__attribute__((target("avx512f"))) void keep_rows_avx512(uint8_t* mask, int64_t rows, int64_t cols, int64_t row0,
                                                          uint64_t seed, uint32_t threshold) {
  constexpr int64_t kLanes = 16;
  const int64_t groups = (cols + 3) / 4;
  const __m512i mul_a = _mm512_set1_epi64(kMulA), mul_b = _mm512_set1_epi64(kMulB);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i th = _mm512_set1_epi32(static_cast<int32_t>(threshold)), one = _mm512_set1_epi32(1);
  constexpr __mmask16 kOdd = 0xAAAA;
  for (int64_t i = 0; i < rows; ++i) {
    uint8_t* m = mask + i * cols;
    for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {
      __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(g0)), lane);
      __m512i c1 = _mm512_set1_epi32(static_cast<int32_t>(row0 + i));
      __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < 10; ++round) {
        const __m512i b_even = _mm512_mul_epu32(c2, mul_b), b_odd = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), mul_b);
        const __m512i a_even = _mm512_mul_epu32(c0, mul_a), a_odd = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), mul_a);
        const __m512i hi_b = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(b_even, 32), b_odd);
        const __m512i hi_a = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(a_even, 32), a_odd);
        c1 = _mm512_xor_si512(c1, _mm512_set1_epi32(static_cast<int32_t>(k0)));
        c3 = _mm512_xor_si512(c3, _mm512_set1_epi32(static_cast<int32_t>(k1)));
        c0 = _mm512_xor_si512(hi_b, c1);
        c2 = _mm512_xor_si512(hi_a, c3);
        c1 = _mm512_mask_blend_epi32(kOdd, b_even, _mm512_slli_epi64(b_odd, 32));
        c3 = _mm512_mask_blend_epi32(kOdd, a_even, _mm512_slli_epi64(a_odd, 32));
        k0 += kWeyl0;
        k1 += kWeyl1;
      }
      const __m512i words[4] = {c0, c1, c2, c3};
      __m512i bytes = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {  // v = w, or ~w where the top bit is set; kept where v >= threshold
        const __m512i v = _mm512_xor_si512(words[j], _mm512_srai_epi32(words[j], 31));
        const __m512i kept = _mm512_maskz_mov_epi32(_mm512_cmpge_epu32_mask(v, th), one);
        bytes = _mm512_or_si512(bytes, _mm512_slli_epi32(kept, 8 * j));
      }
      const int64_t c = 4 * g0;
      if (cols - c >= 4 * kLanes) {
        _mm512_storeu_si512(m + c, bytes);
      } else {
        store_bytes<4 * kLanes>(m + c, bytes, cols - c);
      }
    }
  }
}

__attribute__((target("avx2"))) void keep_rows_avx2(uint8_t* mask, int64_t rows, int64_t cols, int64_t row0,
                                                     uint64_t seed, uint32_t threshold) {
  constexpr int64_t kLanes = 8;
  const int64_t groups = (cols + 3) / 4;
  const __m256i mul_a = _mm256_set1_epi64x(kMulA), mul_b = _mm256_set1_epi64x(kMulB);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i th = _mm256_set1_epi32(static_cast<int32_t>(threshold)), one = _mm256_set1_epi32(1);
  constexpr int kOdd = 0xAA;
  for (int64_t i = 0; i < rows; ++i) {
    uint8_t* m = mask + i * cols;
    for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(g0)), lane);
      __m256i c1 = _mm256_set1_epi32(static_cast<int32_t>(row0 + i));
      __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < 10; ++round) {
        const __m256i b_even = _mm256_mul_epu32(c2, mul_b), b_odd = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), mul_b);
        const __m256i a_even = _mm256_mul_epu32(c0, mul_a), a_odd = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), mul_a);
        const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(b_even, 32), b_odd, kOdd);
        const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(a_even, 32), a_odd, kOdd);
        c1 = _mm256_xor_si256(c1, _mm256_set1_epi32(static_cast<int32_t>(k0)));
        c3 = _mm256_xor_si256(c3, _mm256_set1_epi32(static_cast<int32_t>(k1)));
        c0 = _mm256_xor_si256(hi_b, c1);
        c2 = _mm256_xor_si256(hi_a, c3);
        c1 = _mm256_blend_epi32(b_even, _mm256_slli_epi64(b_odd, 32), kOdd);
        c3 = _mm256_blend_epi32(a_even, _mm256_slli_epi64(a_odd, 32), kOdd);
        k0 += kWeyl0;
        k1 += kWeyl1;
      }
      const __m256i words[4] = {c0, c1, c2, c3};
      __m256i bytes = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {  // v >= threshold unsigned: max(v, threshold) == v
        const __m256i v = _mm256_xor_si256(words[j], _mm256_srai_epi32(words[j], 31));
        const __m256i kept = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_max_epu32(v, th), v), one);
        bytes = _mm256_or_si256(bytes, _mm256_slli_epi32(kept, 8 * j));
      }
      const int64_t c = 4 * g0;
      if (cols - c >= 4 * kLanes) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(m + c), bytes);
      } else {
        store_bytes<4 * kLanes>(m + c, bytes, cols - c);
      }
    }
  }
}

#endif  // AK_X86

}  // namespace

void keep_rows(uint8_t* mask, int64_t rows, int64_t cols, int64_t row0, uint64_t seed, uint32_t threshold) {
  using Fn = void (*)(uint8_t*, int64_t, int64_t, int64_t, uint64_t, uint32_t);
  static const Fn chosen = [] () -> Fn {
    switch (cpu_isa()) {
#ifdef AK_X86
      case CpuIsa::kAvx512:
        return keep_rows_avx512;
      case CpuIsa::kAvx2:
        return keep_rows_avx2;
#endif
      default:
        return keep_rows_scalar;
    }
  }();
  chosen(mask, rows, cols, row0, seed, threshold);
}

}  // namespace adalora_kernels
