// dense_loss's CPU tile loops, compiled per instruction set, for the kernel
// files that use them (cpu/dense_loss.cpp, cpu/dense_loss_group.cpp,
// cpu/dense_loss_upsampled.cpp); run_tile picks a full-size prediction's tile
// loop, scale_span is the backward's.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
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

// How many tiles run_tile splits a full-size prediction of `kind` into.
inline int64_t tiles_of(const at::Tensor& pred, int64_t kind) {
  if (kind == kL1 || kind == kBalancedBce) return (pred.numel() + kFlatTile - 1) / kFlatTile;
  const int64_t P = pred.size(2) * pred.size(3);
  return pred.size(0) * ((P + kTile - 1) / kTile);
}

// Tile `tile` of a full-size prediction: its partial sums, its gradient written into grad.
// Tiles are kFlatTile elements (L1, BCE: pred, target and grad share one dense layout) or
// kTile pixels of one image (cross-entropy, normals).
template <typename scalar_t, typename acc_t>
Partial run_tile(int64_t kind, int64_t tile, const at::Tensor& pred, const at::Tensor& target, at::Tensor& grad,
                 acc_t w, int64_t invalid) {
  const scalar_t* x = pred.const_data_ptr<scalar_t>();
  scalar_t* g = grad.mutable_data_ptr<scalar_t>();
  if (kind == kL1 || kind == kBalancedBce) {  // flat: pred, target and grad share one dense layout
    const int64_t begin = tile * kFlatTile, n = std::min(kFlatTile, pred.numel() - begin);
    const acc_t* t = target.const_data_ptr<acc_t>() + begin;
    if (kind == kL1) DENSE_LOSS_ISA(l1_tile(x + begin, t, g + begin, n, invalid))
    DENSE_LOSS_ISA(bce_tile(x + begin, t, g + begin, n, w))
  }
  // per pixel: tile -> (image b, first pixel p0); [B, C, H*W] by strides
  const int64_t P = pred.size(2) * pred.size(3), tiles = (P + kTile - 1) / kTile;
  const int64_t b = tile / tiles, p0 = (tile % tiles) * kTile, n = std::min(kTile, P - p0);
  const int64_t sC = pred.stride(1), sP = pred.size(3) > 1 ? pred.stride(3) : pred.stride(2);
  const int64_t off = b * pred.stride(0) + p0 * sP;
  if (kind == kCrossEntropy) {
    const int64_t* t = target.const_data_ptr<int64_t>() + b * P + p0;
    const int64_t C = pred.size(1);
    if (sP == 1) DENSE_LOSS_ISA(ce_tile<true, scalar_t, acc_t>(x + off, t, g + off, n, C, sC, sP))
    DENSE_LOSS_ISA(ce_tile<false, scalar_t, acc_t>(x + off, t, g + off, n, C, sC, sP))
  }
  const acc_t* t = target.const_data_ptr<acc_t>() + off;
  if (sP == 1) DENSE_LOSS_ISA(normals_tile<true, scalar_t, acc_t>(x + off, t, g + off, n, sC, sP, sC))
  DENSE_LOSS_ISA(normals_tile<false, scalar_t, acc_t>(x + off, t, g + off, n, sC, sP, sC))
}

// o[i] = g[i] * s for i in [begin, end), the product in acc_t; o may be g (in place).
template <typename scalar_t>
void scale_span(const scalar_t* g, scalar_t* o, int64_t begin, int64_t end, double s) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t scale = static_cast<acc_t>(s);
  for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
}

}  // namespace
}  // namespace mtl_kernels
