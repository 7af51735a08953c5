#include "isa.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

namespace adalora_kernels {

CpuIsa cpu_isa() {
  static const CpuIsa chosen = [] {
    const char* env = std::getenv("ADALORA_KERNELS_CPU_ISA");
    const std::string want = env != nullptr ? env : "";
    if (!want.empty() && want != "baseline" && want != "avx2" && want != "avx512") {
      throw std::invalid_argument("ADALORA_KERNELS_CPU_ISA: expected baseline, avx2 or avx512, got '" + want + "'");
    }
    if (want == "baseline") return CpuIsa::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2");
    if (avx512 && (want.empty() || want == "avx512")) return CpuIsa::kAvx512;
    if (avx2) return CpuIsa::kAvx2;
#endif
    return CpuIsa::kBaseline;
  }();
  return chosen;
}

}  // namespace adalora_kernels
