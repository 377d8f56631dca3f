// dense_loss_upsampled on the CPU: the dense losses of predictions smaller
// than their targets, upsampled bilinearly (align_corners=False, as
// F.interpolate) inside the loss pass: the full-resolution prediction and its
// gradient never exist. For each tile of a target row the C interpolated
// logits go to a scratch tile, the loss tile functions of dense_loss run on it
// (cpu/dense_loss_rows.h), and the gradient is scattered back with the same
// four bilinear weights.
//
// The parallel tasks are (image b, source row i): task (b, i) takes the target
// rows whose upper source row is i. Their upper halves add into row i of the
// gradient, which only this task writes; their lower halves (row i + 1) go to
// a second buffer, added in afterwards. So no two threads ever write the same
// element, and the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/dense_loss_args.h"
#include "cpu/dense_loss_tiles.h"

namespace mtl_kernels {
namespace {

// Where output index o of an axis of `out` samples an axis of `in` (align_corners=False):
// between i0[o] and i1[o] with weight l[o] on i1, as PyTorch's upsample_bilinear2d computes it.
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l(out) {
    const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
    for (int64_t o = 0; o < out; ++o) {
      const acc_t src = std::max(scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
      i0[o] = std::min(static_cast<int64_t>(src), in - 1);
      i1[o] = i0[o] + (i0[o] < in - 1);
      l[o] = src - static_cast<acc_t>(i0[o]);
    }
  }
};

// The loss of one scratch tile v (C rows of kTile) of target row (b, y) from column xs, its
// gradient into dv. Cross-entropy labels are [B, Ho, Wo]; other targets [B, C, Ho, Wo].
template <typename acc_t>
Partial scratch_tile(int64_t kind, const acc_t* v, acc_t* dv, int64_t n, int64_t C, const at::Tensor& target,
                     int64_t b, int64_t y, int64_t xs, acc_t w, int64_t invalid) {
  const int64_t Ho = target.size(-2), Wo = target.size(-1);
  if (kind == kCrossEntropy) {
    const int64_t* t = target.const_data_ptr<int64_t>() + (b * Ho + y) * Wo + xs;
    DENSE_LOSS_ISA(ce_tile<true, acc_t, acc_t>(v, t, dv, n, C, kTile, 1))
  }
  const acc_t* t = target.const_data_ptr<acc_t>() + (b * C * Ho + y) * Wo + xs;
  if (kind == kNormalsL1) DENSE_LOSS_ISA(normals_tile<true, acc_t, acc_t>(v, t, dv, n, kTile, 1, Ho * Wo))
  Partial sum;
  for (int64_t c = 0; c < C; ++c) {  // L1 and BCE: one row per channel
    auto row = [&]() -> Partial {
      if (kind == kL1) DENSE_LOSS_ISA(l1_tile(v + c * kTile, t + c * Ho * Wo, dv + c * kTile, n, invalid))
      DENSE_LOSS_ISA(bce_tile(v + c * kTile, t + c * Ho * Wo, dv + c * kTile, n, w))
    };
    const Partial p = row();
    sum.sum += p.sum, sum.count += p.count, sum.bad += p.bad;
  }
  return sum;
}

template <typename scalar_t, typename acc_t>
Partial band(int64_t kind, int64_t b, int64_t i, const at::Tensor& pred, const at::Tensor& target, acc_t* grad,
             acc_t* down, const Axis<acc_t>& ay, const Axis<acc_t>& ax, int64_t y_begin, int64_t y_end, acc_t w,
             int64_t invalid) {
  const int64_t C = pred.size(1), Hi = pred.size(2), Wi = pred.size(3), Wo = target.size(-1);
  const int64_t sB = pred.stride(0), sC = pred.stride(1), sH = pred.stride(2), sW = pred.stride(3);
  const scalar_t* p = pred.const_data_ptr<scalar_t>() + b * sB;
  std::vector<acc_t> v(C * kTile), dv(C * kTile);
  Partial part;
  for (int64_t y = y_begin; y < y_end; ++y) {
    const int64_t y1 = ay.i1[y];
    const acc_t ly = ay.l[y], hy = acc_t(1) - ly;
    for (int64_t xs = 0; xs < Wo; xs += kTile) {
      const int64_t n = std::min(kTile, Wo - xs);
      for (int64_t c = 0; c < C; ++c) {  // interpolate
        const scalar_t* r0 = p + c * sC + i * sH;
        const scalar_t* r1 = p + c * sC + y1 * sH;
        acc_t* vr = v.data() + c * kTile;
        for (int64_t k = 0; k < n; ++k) {
          const int64_t a0 = ax.i0[xs + k] * sW, a1 = ax.i1[xs + k] * sW;
          const acc_t lx = ax.l[xs + k], hx = acc_t(1) - lx;
          vr[k] = hy * (hx * static_cast<acc_t>(r0[a0]) + lx * static_cast<acc_t>(r0[a1])) +
                  ly * (hx * static_cast<acc_t>(r1[a0]) + lx * static_cast<acc_t>(r1[a1]));
        }
      }
      const Partial t = scratch_tile(kind, v.data(), dv.data(), n, C, target, b, y, xs, w, invalid);
      part.sum += t.sum, part.count += t.count, part.bad += t.bad;
      for (int64_t c = 0; c < C; ++c) {  // scatter back: row i here, row y1 into `down`
        acc_t* g0 = grad + ((b * C + c) * Hi + i) * Wi;
        acc_t* g1 = down + ((b * C + c) * Hi + y1) * Wi;
        const acc_t* d = dv.data() + c * kTile;
        for (int64_t k = 0; k < n; ++k) {
          const int64_t x0 = ax.i0[xs + k], x1 = ax.i1[xs + k];
          const acc_t lx = ax.l[xs + k], hx = acc_t(1) - lx;
          g0[x0] += hy * hx * d[k];
          g0[x1] += hy * lx * d[k];
          g1[x0] += ly * hx * d[k];
          g1[x1] += ly * lx * d[k];
        }
      }
    }
  }
  return part;
}

std::tuple<at::Tensor, at::Tensor> dense_loss_upsampled_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                            int64_t kind, const at::Tensor& pos_weight,
                                                            int64_t invalid, bool /*inplace_backward*/) {
  check_dense_loss_upsampled_args(pred, target, kind);
  check_pos_weight(pos_weight, pred, "dense_loss_upsampled");
  const int64_t B = pred.size(0), C = pred.size(1), Hi = pred.size(2), Wi = pred.size(3);
  const int64_t Ho = target.size(-2), Wo = target.size(-1);
  at::Tensor stats = at::empty({3}, pred.options().dtype(at::kDouble));
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dense_loss_upsampled_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(kind == kCrossEntropy || target.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "dense_loss_upsampled: target must be ", c10::CppTypeToScalarType<acc_t>::value);
    const acc_t w = kind == kBalancedBce ? static_cast<acc_t>(pos_weight.item<double>()) : acc_t(0);
    const Axis<acc_t> ay(Hi, Ho), ax(Wi, Wo);
    std::vector<int64_t> first(Hi + 1, Ho);  // target rows [first[i], first[i + 1]) have upper source row i
    for (int64_t y = Ho - 1; y >= 0; --y) first[ay.i0[y]] = y;
    for (int64_t i = Hi - 1; i >= 0; --i) first[i] = std::min(first[i], first[i + 1]);
    at::Tensor acc = at::zeros({B, C, Hi, Wi}, pred.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    at::Tensor down = at::zeros_like(acc);
    std::vector<Partial> parts(B * Hi);
    at::parallel_for(0, B * Hi, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hi, i = task % Hi;
        parts[task] = band<scalar_t, acc_t>(kind, b, i, pred, target, acc.mutable_data_ptr<acc_t>(),
                                            down.mutable_data_ptr<acc_t>(), ay, ax, first[i], first[i + 1], w, invalid);
      }
    });
    acc.add_(down);
    grad = acc.to(pred.scalar_type()).contiguous(pred.suggest_memory_format());
    double* s = stats.mutable_data_ptr<double>();
    s[0] = s[1] = s[2] = 0;
    for (const Partial& p : parts) s[0] += p.sum, s[1] += p.count, s[2] += p.bad;
  });
  return {stats, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) { m.impl("dense_loss_upsampled", &dense_loss_upsampled_cpu); }

}  // namespace mtl_kernels
