// dense_loss on the CPU: the loss sum, its count of terms, the number of
// malformed targets, and the gradient of the sum, in one pass over the
// predictions (see csrc/ops.cpp). Tiles of pixels (cross-entropy, normals) or
// of elements (L1, BCE) run in parallel; each writes its partial sums to a
// slot of its own and the slots are added in order, so the result does not
// depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/dense_loss.h"
#include "common/dense_loss_args.h"
#include "cpu/dense_loss_tiles.h"
#include "cpu/huge_pages.h"

namespace mtl_kernels {
namespace {

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

std::tuple<at::Tensor, at::Tensor> dense_loss_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t kind,
                                                  const at::Tensor& pos_weight, int64_t invalid,
                                                  bool /*inplace_backward: autograd only*/) {
  check_dense_loss_args(pred, target, kind);
  const bool flat = kind == kL1 || kind == kBalancedBce;
  at::Tensor grad = at::empty_like(pred);
  prefer_huge_pages(grad);
  const int64_t P = pred.size(2) * pred.size(3);
  const int64_t tiles = flat ? (pred.numel() + kFlatTile - 1) / kFlatTile : pred.size(0) * ((P + kTile - 1) / kTile);
  std::vector<Partial> parts(tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dense_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(kind == kCrossEntropy || target.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "dense_loss: target must be ", c10::CppTypeToScalarType<acc_t>::value, " for ", pred.scalar_type(),
                " predictions");
    const acc_t w = kind == kBalancedBce ? static_cast<acc_t>(pos_weight.item<double>()) : acc_t(0);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) parts[i] = run_tile<scalar_t, acc_t>(kind, i, pred, target, grad, w, invalid);
    });
  });
  double sum = 0, count = 0, bad = 0;
  for (const Partial& p : parts) sum += p.sum, count += p.count, bad += p.bad;
  at::Tensor stats = at::empty({3}, pred.options().dtype(at::kDouble));
  double* s = stats.mutable_data_ptr<double>();
  s[0] = sum, s[1] = count, s[2] = bad;
  return {stats, grad};
}

// One streaming pass; its own kernel rather than at::mul so the fresh output
// gets huge pages (a 100 MB gradient otherwise costs more in page faults than
// in the multiply).
// out = grad * grad_sum in acc_t; out may be grad itself.
void scale_cpu(const at::Tensor& grad, const at::Tensor& grad_sum, at::Tensor& out) {
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), "dense_loss_backward: grad must be dense");
  TORCH_CHECK(grad_sum.numel() == 1, "dense_loss_backward: grad_sum must hold one value");
  const double s = grad_sum.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dense_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(s);
    at::parallel_for(0, grad.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
    });
  });
}

at::Tensor dense_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& grad_sum) {
  at::Tensor out = at::empty_like(grad);
  prefer_huge_pages(out);
  scale_cpu(grad, grad_sum, out);
  return out;
}

void dense_loss_backward_inplace_cpu(at::Tensor& grad, const at::Tensor& grad_sum) { scale_cpu(grad, grad_sum, grad); }

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("dense_loss", &dense_loss_cpu);
  m.impl("dense_loss_backward", &dense_loss_backward_cpu);
  m.impl("dense_loss_backward_", &dense_loss_backward_inplace_cpu);
}

}  // namespace mtl_kernels
