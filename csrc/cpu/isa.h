// The x86 instruction set the CPU kernels run: the widest the CPU has, or the one ADALORA_KERNELS_CPU_ISA names
// (baseline, avx2, avx512; for tests and comparisons; one the CPU lacks falls back to the best it has). Read once
// per process; an unknown name throws std::invalid_argument naming the variable.
#pragma once

namespace adalora_kernels {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

CpuIsa cpu_isa();

}  // namespace adalora_kernels
