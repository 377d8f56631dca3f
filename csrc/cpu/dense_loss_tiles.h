// dense_loss's CPU tile loops, compiled per instruction set, for the kernel
// files that use them (cpu/dense_loss.cpp, cpu/dense_loss_upsampled.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/OpMathType.h>

#include "common/dense_loss.h"
#include "cpu/isa.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kTile = 256;        // pixels per cross-entropy / normals tile
constexpr int64_t kFlatTile = 4096;  // elements per L1 / BCE tile

struct Partial {
  double sum = 0, count = 0, bad = 0;
};

#define MTL_ISA_ROWS "cpu/dense_loss_rows.h"
#include "cpu/isa_variants.h"

// The same tile function in the best instruction set this CPU has.
#define DENSE_LOSS_ISA(...)                                     \
  switch (best_isa()) {                                         \
    case Isa::kAvx512: return isa_avx512::__VA_ARGS__;          \
    case Isa::kAvx2: return isa_avx2::__VA_ARGS__;              \
    default: return isa_base::__VA_ARGS__;                      \
  }

}  // namespace
}  // namespace mtl_kernels
