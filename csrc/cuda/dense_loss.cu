// CUDA kernels of dense_loss (schema in csrc/ops.cpp, definition in
// mtl_kernels/reference/dense_loss.py, per-element math in
// common/dense_loss.h): the loss sum, its count of terms and of malformed
// targets, and the gradient of the sum, in one pass over the predictions.
//
// One thread per pixel (cross-entropy, normals) or per element (L1, BCE), its
// item in cuda/dense_loss_terms.cuh. For NCHW predictions neighbouring threads
// take neighbouring pixels, so each channel's loads coalesce. Each block
// reduces its partial sums (warp shuffles, then shared memory) into its own
// slot of a buffer that at::sum adds: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "common/dense_loss.h"
#include "common/dense_loss_args.h"
#include "cuda/dense_loss_terms.cuh"

namespace mtl_kernels {
namespace {

constexpr int kThreads = kLossThreads;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(const scalar_t* __restrict x,
                                                                 const int64_t* __restrict target,
                                                                 scalar_t* __restrict grad, double* __restrict part,
                                                                 int64_t pixels, int64_t C, Pixels px) {
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (q < pixels) ce_item(x, target, grad, q, C, px, sum, count, bad);
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) normals_kernel(const scalar_t* __restrict x, const acc_t* __restrict target,
                                                           scalar_t* __restrict grad, double* __restrict part,
                                                           int64_t pixels, Pixels px) {
  const int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (q < pixels) normals_item(x, target, grad, q, px, sum, count, bad);
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

// L1 (kKind == kL1) or balanced BCE over n elements laid out alike in x, target and grad.
template <int64_t kKind, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) flat_kernel(const scalar_t* __restrict x, const acc_t* __restrict target,
                                                        scalar_t* __restrict grad, double* __restrict part, int64_t n,
                                                        const double* __restrict pos_weight, int64_t invalid) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  acc_t sum = 0, count = 0, bad = 0;
  if (i < n) flat_item<kKind>(x, target, grad, i, static_cast<acc_t>(*pos_weight), invalid, sum, count, bad);
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

std::tuple<at::Tensor, at::Tensor> dense_loss_cuda(const at::Tensor& pred, const at::Tensor& target, int64_t kind,
                                                   const at::Tensor& pos_weight, int64_t invalid,
                                                   bool /*inplace_backward: autograd only*/) {
  check_dense_loss_args(pred, target, kind);
  check_pos_weight(pos_weight, pred, "dense_loss");
  const bool flat = kind == kL1 || kind == kBalancedBce;
  const at::cuda::OptionalCUDAGuard guard(pred.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor grad = at::empty_like(pred);
  if (pred.numel() == 0) return {at::zeros({3}, pred.options().dtype(at::kDouble)), grad};  // no 0-block launch
  const Pixels px = pixels_of(pred);
  const int64_t items = flat ? pred.numel() : pred.size(0) * px.P;
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "dense_loss: input too large");
  at::Tensor part = at::empty({blocks, 3}, pred.options().dtype(at::kDouble));
  const at::Tensor w = pos_weight.to(pred.device(), at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dense_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(kind == kCrossEntropy || target.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "dense_loss: target must be ", c10::CppTypeToScalarType<acc_t>::value, " for ", pred.scalar_type(),
                " predictions");
    const scalar_t* x = pred.const_data_ptr<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    double* pp = part.mutable_data_ptr<double>();
    const dim3 grid(static_cast<unsigned>(blocks));
    if (kind == kCrossEntropy) {
      cross_entropy_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x, target.const_data_ptr<int64_t>(), g, pp,
                                                                           items, pred.size(1), px);
    } else if (kind == kNormalsL1) {
      normals_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x, target.const_data_ptr<acc_t>(), g, pp, items,
                                                                     px);
    } else if (kind == kL1) {
      flat_kernel<kL1, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(x, target.const_data_ptr<acc_t>(), g, pp, items,
                                                                       w.const_data_ptr<double>(), invalid);
    } else {
      flat_kernel<kBalancedBce, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          x, target.const_data_ptr<acc_t>(), g, pp, items, w.const_data_ptr<double>(), invalid);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {part.sum(0), grad};
}

// o = g * s with s read from device memory (no host read-back) and the product taken in
// acc_t: at::mul would first round a device scalar to grad's dtype, and 1/count is below
// half precision's normal range for any count over 16384. o may be g (in place).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(const scalar_t* g, scalar_t* o, int64_t n,
                                                         const double* __restrict s) {
  const acc_t scale = static_cast<acc_t>(*s);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
}

void scale_cuda(const at::Tensor& grad, const at::Tensor& grad_sum, at::Tensor& out) {
  TORCH_CHECK(grad.is_non_overlapping_and_dense(), "dense_loss_backward: grad must be dense");
  TORCH_CHECK(grad_sum.numel() == 1, "dense_loss_backward: grad_sum must hold one value");
  const at::cuda::OptionalCUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const at::Tensor s = grad_sum.to(grad.device(), at::kDouble).contiguous();
  // Elementwise over memory: grad and out share one dense layout (out is grad or empty_like(grad)).
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "dense_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scale_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, s.const_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dense_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& grad_sum) {
  at::Tensor out = at::empty_like(grad);
  scale_cuda(grad, grad_sum, out);
  return out;
}

void dense_loss_backward_inplace_cuda(at::Tensor& grad, const at::Tensor& grad_sum) {
  scale_cuda(grad, grad_sum, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("dense_loss", &dense_loss_cuda);
  m.impl("dense_loss_backward", &dense_loss_backward_cuda);
  m.impl("dense_loss_backward_", &dense_loss_backward_inplace_cuda);
}

}  // namespace mtl_kernels
