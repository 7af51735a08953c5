// The dropout mask of DESIGN §4, shared by the CPU and CUDA code (no torch headers), bit for bit the Triton
// kernels' (tl.philox, tl.uint_to_uniform_float) and adalora_kernels.reference.dropout_keep_mask's:
//
//   element (row, col) of the M x in adapter input is kept when word col % 4 of
//   Philox4x32-10(counter = (col / 4, row, 0, 0), key = (seed mod 2^32, seed >> 32)), read as a uniform in
//   [0, 1), is >= p (p in float32).
//
// The uniform is float32(float32(v) * 4.6566127342e-10f) with v = w, or ~w where w's top bit is set (v < 2^31).
// It is non-decreasing in v, so the compare is v >= dropout_threshold(p), an integer found once per call. A pure
// function of the seed and the position: backward regenerates the forward's mask, nothing is stored, and every
// backend draws the same bits, so a run may change backend.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define AK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AK_HOST_DEVICE inline
#endif

namespace adalora_kernels {

struct PhiloxWords {
  uint32_t w[4];
};

AK_HOST_DEVICE void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with ten rounds of counter (c0, c1, 0, 0) under the 64-bit seed.
AK_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__)
#pragma GCC unroll 10  // unrolled, the callers' loops over column groups vectorise
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_b, lo_b, hi_a, lo_a;
    mulhilo32(0xCD9E8D57u, c2, hi_b, lo_b);
    mulhilo32(0xD2511F53u, c0, hi_a, lo_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// The words of columns 4 * group .. 4 * group + 3 of `row`.
AK_HOST_DEVICE PhiloxWords dropout_words(uint64_t seed, uint64_t row, uint64_t group) {
  return philox4x32_10(seed, static_cast<uint32_t>(group), static_cast<uint32_t>(row));
}

// Whether a word is kept: its v (w, or ~w where the top bit is set) reaches the threshold.
AK_HOST_DEVICE bool dropout_keep_word(uint32_t w, uint32_t threshold) {
  const uint32_t v = w ^ static_cast<uint32_t>(static_cast<int32_t>(w) >> 31);
  return v >= threshold;
}

// Word i of w, by selects (on a GPU a dynamic index into a register array would put it in local memory).
AK_HOST_DEVICE uint32_t word_at(const PhiloxWords& w, uint64_t i) {
  return i == 0 ? w.w[0] : i == 1 ? w.w[1] : i == 2 ? w.w[2] : w.w[3];
}

AK_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t row, uint64_t col, uint32_t threshold) {
  return dropout_keep_word(word_at(dropout_words(seed, row, col / 4), col % 4), threshold);
}

// The least v in [0, 2^31] whose uniform float32(float32(v) * 4.6566127342e-10f) is >= float32(p): 0 keeps
// every word (p = 0), 2^31 none. A binary search over the float32 arithmetic the Triton kernels do (IEEE
// single precision, round to nearest: no excess precision on x86-64 or aarch64).
inline uint32_t dropout_threshold(double p) {
  const float pf = static_cast<float>(p);
  volatile float scale = 4.6566127342e-10f;  // volatile: computed at run time as the kernels compute it
  uint32_t lo = 0, hi = 1u << 31;
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const float u = static_cast<float>(static_cast<int32_t>(mid)) * scale;
    if (u >= pf) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

}  // namespace adalora_kernels
