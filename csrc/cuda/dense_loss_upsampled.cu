// CUDA kernels of dense_loss_upsampled (schema in csrc/ops.cpp; the definition
// is F.interpolate then mtl_kernels/reference/dense_loss.py): the dense losses
// of predictions smaller (or larger) than their targets, resized bilinearly
// (align_corners=False, as F.interpolate) inside the loss pass.
//
// One thread per target pixel (cross-entropy, normals) or target element (L1,
// BCE). It interpolates its values from the four source pixels, computes the
// terms as dense_loss.cu does, and spreads each gradient back onto those four
// pixels by atomic adds into a float32 (float64) gradient of the prediction's
// size, as upsample_bilinear2d's own CUDA backward does. So the full-size
// prediction and its gradient never exist. The loss partials are per block
// (deterministic); the gradient's rounding depends on the order of the adds,
// which is why the op alerts under torch.use_deterministic_algorithms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/dense_loss.h"
#include "common/dense_loss_args.h"
#include "cuda/dense_loss_terms.cuh"

namespace mtl_kernels {
namespace {

constexpr int kThreads = kLossThreads;

struct Geometry {  // prediction [B, C, Hi, Wi] by strides, resized to Ho x Wo
  int64_t Hi, Wi, Ho, Wo, sB, sC, sH, sW;
};

// Where output index o samples an axis of n_in (align_corners=False), as PyTorch computes it:
// between i0 and i1, with weight l on i1.
template <typename acc_t>
__device__ __forceinline__ void source_index(int64_t o, int64_t n_in, int64_t n_out, int64_t& i0, int64_t& i1,
                                             acc_t& l) {
  const acc_t scale = static_cast<acc_t>(n_in) / static_cast<acc_t>(n_out);
  const acc_t src = fmax(scale * (static_cast<acc_t>(o) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
  i0 = min(static_cast<int64_t>(src), n_in - 1);
  i1 = i0 + (i0 < n_in - 1);
  l = src - static_cast<acc_t>(i0);
}

// The four source offsets (within a channel plane) of target pixel p and their weights.
template <typename acc_t>
struct Taps {
  int64_t o00, o01, o10, o11;
  acc_t hy, hx, ly, lx;

  __device__ Taps(int64_t p, const Geometry& g) {
    int64_t y0, y1, x0, x1;
    source_index(p / g.Wo, g.Hi, g.Ho, y0, y1, ly);
    source_index(p % g.Wo, g.Wi, g.Wo, x0, x1, lx);
    hy = acc_t(1) - ly, hx = acc_t(1) - lx;
    o00 = y0 * g.sH + x0 * g.sW, o01 = y0 * g.sH + x1 * g.sW;
    o10 = y1 * g.sH + x0 * g.sW, o11 = y1 * g.sH + x1 * g.sW;
  }
  template <typename scalar_t>
  __device__ acc_t lerp(const scalar_t* __restrict plane) const {
    return hy * (hx * static_cast<acc_t>(plane[o00]) + lx * static_cast<acc_t>(plane[o01])) +
           ly * (hx * static_cast<acc_t>(plane[o10]) + lx * static_cast<acc_t>(plane[o11]));
  }
  __device__ void scatter(acc_t* plane, acc_t d) const {  // the transpose of lerp
    atomicAdd(plane + o00, hy * hx * d);
    atomicAdd(plane + o01, hy * lx * d);
    atomicAdd(plane + o10, ly * hx * d);
    atomicAdd(plane + o11, ly * lx * d);
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(const scalar_t* __restrict x,
                                                                 const int64_t* __restrict target,
                                                                 acc_t* __restrict grad, double* __restrict part,
                                                                 int64_t pixels, int64_t C, Geometry geo) {
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (q < pixels) {
    const int64_t P = geo.Ho * geo.Wo, b = q / P, label = target[q];
    const bool valid = label != kIgnoreIndex, in_range = label >= 0 && label < C, ok = valid && in_range;
    bad = valid && !in_range;
    const Taps<acc_t> taps(q % P, geo);
    const scalar_t* xb = x + b * geo.sB;
    acc_t m, s, xt;
    ce_softmax_stats([&](int64_t c) { return taps.lerp(xb + c * geo.sC); }, C, label, m, s, xt);
    if (ok) {  // ignored pixels add nothing to the gradient
      sum = m + log_acc(s) - xt, count = 1;
      const acc_t inv = acc_t(1) / s;
      acc_t* gb = grad + b * geo.sB;
      for (int64_t c = 0; c < C; ++c)
        taps.scatter(gb + c * geo.sC, exp_acc(taps.lerp(xb + c * geo.sC) - m) * inv - acc_t(c == label));
    }
  }
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) normals_kernel(const scalar_t* __restrict x, const acc_t* __restrict target,
                                                           acc_t* __restrict grad, double* __restrict part,
                                                           int64_t pixels, Geometry geo) {
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (q < pixels) {
    const int64_t P = geo.Ho * geo.Wo, b = q / P, p = q % P;
    const Taps<acc_t> taps(p, geo);
    acc_t v[3], t[3], g[3];
    for (int c = 0; c < 3; ++c) {
      v[c] = taps.lerp(x + b * geo.sB + c * geo.sC);
      t[c] = target[(b * 3 + c) * P + p];  // contiguous [B, 3, Ho, Wo]
    }
    int malformed = 0;
    count = normals_pixel(v, t, sum, g, malformed);
    bad = malformed;
    for (int c = 0; c < 3; ++c) taps.scatter(grad + b * geo.sB + c * geo.sC, g[c]);
  }
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

// L1 (kKind == kL1) or balanced BCE; element i of the contiguous target [B, C, Ho, Wo].
template <int64_t kKind, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) flat_kernel(const scalar_t* __restrict x, const acc_t* __restrict target,
                                                        acc_t* __restrict grad, double* __restrict part, int64_t n,
                                                        int64_t C, Geometry geo, const double* __restrict pos_weight,
                                                        int64_t invalid) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (i < n) {
    const int64_t P = geo.Ho * geo.Wo, bc = i / P;
    const int64_t plane = (bc / C) * geo.sB + (bc % C) * geo.sC;
    const Taps<acc_t> taps(i % P, geo);
    acc_t g;
    flat_term<kKind>(taps.lerp(x + plane), target[i], static_cast<acc_t>(*pos_weight), invalid, sum, g, count, bad);
    if (g != acc_t(0)) taps.scatter(grad + plane, g);  // L1 holes add nothing
  }
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

std::tuple<at::Tensor, at::Tensor> dense_loss_upsampled_cuda(const at::Tensor& pred, const at::Tensor& target,
                                                             int64_t kind, const at::Tensor& pos_weight,
                                                             int64_t invalid, bool /*inplace_backward*/) {
  check_dense_loss_upsampled_args(pred, target, kind);
  check_pos_weight(pos_weight, pred, "dense_loss_upsampled");
  // The gradient is allocated in pred's layout and addressed with pred's strides.
  TORCH_CHECK(pred.is_non_overlapping_and_dense(), "dense_loss_upsampled: pred must be dense (NCHW or channels_last)");
  const int64_t B = pred.size(0), C = pred.size(1);
  const Geometry geo{pred.size(2), pred.size(3), target.size(-2), target.size(-1),
                     pred.stride(0), pred.stride(1), pred.stride(2), pred.stride(3)};
  at::globalContext().alertNotDeterministic("dense_loss_upsampled_cuda");
  const at::cuda::OptionalCUDAGuard guard(pred.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool flat = kind == kL1 || kind == kBalancedBce;
  const int64_t items = flat ? target.numel() : B * geo.Ho * geo.Wo;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "dense_loss_upsampled: input too large");
  at::Tensor part = at::empty({blocks, 3}, pred.options().dtype(at::kDouble));
  const at::Tensor w = pos_weight.to(pred.device(), at::kDouble).contiguous();
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dense_loss_upsampled_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(kind == kCrossEntropy || target.scalar_type() == acc_type, "dense_loss_upsampled: target must be ",
                acc_type, " for ", pred.scalar_type(), " predictions");
    // In pred's layout (strides), so the kernels address pred and its gradient alike.
    at::Tensor acc = at::zeros_like(pred, pred.options().dtype(acc_type));
    const scalar_t* x = pred.const_data_ptr<scalar_t>();
    acc_t* g = acc.mutable_data_ptr<acc_t>();
    double* pp = part.mutable_data_ptr<double>();
    const dim3 grid(static_cast<unsigned>(blocks));
    if (kind == kCrossEntropy) {
      cross_entropy_kernel<scalar_t, acc_t>
          <<<grid, kThreads, 0, stream>>>(x, target.const_data_ptr<int64_t>(), g, pp, items, C, geo);
    } else if (kind == kNormalsL1) {
      normals_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x, target.const_data_ptr<acc_t>(), g, pp, items, geo);
    } else if (kind == kL1) {
      flat_kernel<kL1, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x, target.const_data_ptr<acc_t>(), g, pp, items, C, geo, w.const_data_ptr<double>(), invalid);
    } else {
      flat_kernel<kBalancedBce, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x, target.const_data_ptr<acc_t>(), g, pp, items, C, geo, w.const_data_ptr<double>(), invalid);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad = acc.to(pred.scalar_type());  // keeps pred's strides; no copy for float32 / float64
  });
  return {part.sum(0), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) { m.impl("dense_loss_upsampled", &dense_loss_upsampled_cuda); }

}  // namespace mtl_kernels
