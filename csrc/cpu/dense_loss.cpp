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

std::tuple<at::Tensor, at::Tensor> dense_loss_cpu(const at::Tensor& pred, const at::Tensor& target, int64_t kind,
                                                  const at::Tensor& pos_weight, int64_t invalid,
                                                  bool /*inplace_backward: autograd only*/) {
  check_dense_loss_args(pred, target, kind);
  check_pos_weight(pos_weight, pred, "dense_loss");
  at::Tensor grad = at::empty_like(pred);
  prefer_huge_pages(grad);
  const int64_t tiles = tiles_of(pred, kind);
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
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 1 << 16, [&](int64_t begin, int64_t end) { scale_span(g, o, begin, end, s); });
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
