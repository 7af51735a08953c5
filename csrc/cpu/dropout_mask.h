// DESIGN §4's dropout keep-mask on the CPU (dropout_philox.h's bits), for blocks of rows.
#pragma once
#include <cstdint>

namespace adalora_kernels {

// mask[i * cols + k] = keep(row0 + i, k) (1 or 0) for i < rows, k < cols.
void keep_rows(uint8_t* mask, int64_t rows, int64_t cols, int64_t row0, uint64_t seed, uint32_t threshold);

}  // namespace adalora_kernels
