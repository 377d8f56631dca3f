// NDDR fusion, the part shared by the CPU and CUDA kernels: argument checks and
// the 1x1 convolution of the virtual concatenation as T GEMMs (BLAS / cuBLAS
// through ATen) that read each task tensor in place and accumulate into one
// [B, T*C, H, W] result z, so all T tasks' convolutions are one pass over each
// input. The memory-bound rest (BN + ReLU epilogue and its backward) is done
// by five device kernels, passed in as `Kernels`:
//   channel_stats(z, T) -> (mean, biased var) per channel k of z, [T*C]
//   affine_relu(z, scale, shift, ys)      ys[t] = max(z[:, tC+c] * scale + shift, 0)
//   relu_sums(grad_ys, z, scale, shift, mean) -> (sum dy', sum dy' * (z - mean)), dy' = dy * [y > 0]
//   bn_relu_grad(grad_ys, z, scale, shift, a, b, dz)   dz = dy' * scale + z * a + b
//   relu_grad(grad_ys, ys, dz)             dz = dy * [y > 0]
// per channel k = t*C + c; scale, shift, a, b are [T*C] tensors in the accumulation type.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>
#include <vector>

#include "common/cross_stitch.h"

namespace mtl_kernels {
namespace nddr {

inline void check_features(at::TensorList xs, const char* name, at::TensorList like) {
  TORCH_CHECK(!xs.empty(), "nddr: ", name, " must hold at least one tensor");
  const at::Tensor& ref = like.empty() ? xs[0] : like[0];
  TORCH_CHECK(like.empty() || xs.size() == like.size(), "nddr: ", name, " holds ", xs.size(), " tensors, expected ",
              like.size());
  TORCH_CHECK(ref.dim() == 4, "nddr: ", name, "[0] must be 4-D [B, C, H, W], got ", ref.sizes());
  for (size_t j = 0; j < xs.size(); ++j) {
    TORCH_CHECK(xs[j].sizes() == ref.sizes() && xs[j].scalar_type() == ref.scalar_type() &&
                    xs[j].device() == ref.device(),
                "nddr: ", name, "[", j, "] (", xs[j].sizes(), ", ", xs[j].scalar_type(), ", ", xs[j].device(),
                ") must match ", ref.sizes(), ", ", ref.scalar_type(), ", ", ref.device());
  }
}

inline void check_param(const at::Tensor& p, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK(p.sizes() == shape, "nddr: ", name, " must have shape ", shape, ", got ", p.sizes());
  TORCH_CHECK(p.device() == x.device(), "nddr: ", name, " is on ", p.device(), ", expected ", x.device());
  TORCH_CHECK(p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat, "nddr: ", name,
              " must have the features' dtype (", x.scalar_type(), ") or float32, got ", p.scalar_type());
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Per-channel vector in the accumulation type.
inline at::Tensor acc(const at::Tensor& v, const at::Tensor& x) { return v.to(acc_type(x)).contiguous(); }

// x[j] seen as a matrix: [B*P, C] rows of pixels (channels_last) or [B, C, P] (NCHW).
inline at::Tensor as_matrix(const at::Tensor& x, bool channels_last) {
  const int64_t B = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  return channels_last ? x.permute({0, 2, 3, 1}).view({B * P, C}) : x.view({B, C, P});
}

// On the CPU, half features' GEMMs run on float copies, z summed over the T inputs in float and
// rounded once, as the reference's convolution does. Summed in half, each input's product is
// rounded into z, more pre-activations near zero flip across the ReLU than in the reference, and
// the gradients (through the ReLU mask) moved 1-3% from fp64's under torch 2.11's CPU GEMMs.
inline bool gemm_in_float(const at::Tensor& x) { return x.is_cpu() && at::isReducedFloatingType(x.scalar_type()); }

inline std::vector<at::Tensor> to_float(const std::vector<at::Tensor>& xs) {
  std::vector<at::Tensor> out;
  for (const auto& x : xs) out.push_back(x.to(at::kFloat));  // keeps the memory format
  return out;
}

// z = weight @ concat_j xs[j], as T accumulating GEMMs over the inputs in place.
inline at::Tensor conv1x1(const std::vector<at::Tensor>& xs, const at::Tensor& weight, at::MemoryFormat fmt) {
  if (gemm_in_float(xs[0])) return conv1x1(to_float(xs), weight, fmt).to(xs[0].scalar_type());
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t T = xs.size(), B = xs[0].size(0), C = xs[0].size(1);
  const at::Tensor w = weight.to(xs[0].scalar_type());
  at::Tensor z = at::empty({B, T * C, xs[0].size(2), xs[0].size(3)}, xs[0].options().memory_format(fmt));
  at::Tensor zm = as_matrix(z, cl);
  for (int64_t j = 0; j < T; ++j) {
    const at::Tensor xj = as_matrix(xs[j], cl), wj = w.narrow(1, j * C, C);  // [T*C, C]
    if (cl) {
      if (j == 0) at::mm_out(zm, xj, wj.t());
      else zm.addmm_(xj, wj.t());
    } else {
      const at::Tensor wb = wj.expand({B, T * C, C});
      if (j == 0) at::bmm_out(zm, wb, xj);
      else zm.baddbmm_(wb, xj);
    }
  }
  return z;
}

// grad_weight = dz @ concat_j xs[j]^T and grad_xs[j] = weight[:, jC:]^T @ dz.
inline std::tuple<std::vector<at::Tensor>, at::Tensor> conv1x1_backward(const at::Tensor& dz,
                                                                        const std::vector<at::Tensor>& xs,
                                                                        const at::Tensor& weight,
                                                                        at::MemoryFormat fmt) {
  if (gemm_in_float(xs[0])) {
    auto [grad_xs, grad_weight] = conv1x1_backward(dz.to(at::kFloat), to_float(xs), weight, fmt);
    for (auto& g : grad_xs) g = g.to(xs[0].scalar_type());
    return {grad_xs, grad_weight};
  }
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t T = xs.size(), B = xs[0].size(0), C = xs[0].size(1);
  const at::Tensor w = weight.to(xs[0].scalar_type());
  const at::Tensor dzm = as_matrix(dz, cl);
  auto grad_xs = empty_like_all(xs, fmt);
  std::vector<at::Tensor> grad_w_blocks;
  for (int64_t j = 0; j < T; ++j) {
    const at::Tensor xj = as_matrix(xs[j], cl), wj = w.narrow(1, j * C, C);
    at::Tensor gxj = as_matrix(grad_xs[j], cl);
    if (cl) {
      at::mm_out(gxj, dzm, wj);                          // [B*P, T*C] @ [T*C, C]
      grad_w_blocks.push_back(at::mm(dzm.t(), xj));      // [T*C, B*P] @ [B*P, C]
    } else {
      at::bmm_out(gxj, wj.t().expand({B, C, T * C}), dzm);  // [C, T*C] @ [T*C, P] per image
      grad_w_blocks.push_back(at::bmm(dzm, xj.transpose(1, 2)).sum(0));
    }
  }
  return {grad_xs, at::cat(grad_w_blocks, 1).to(weight.scalar_type())};
}

template <class Kernels>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> train(at::TensorList xs_in,
                                                                              const at::Tensor& weight,
                                                                              const at::Tensor& bn_weight,
                                                                              const at::Tensor& bn_bias, double eps) {
  check_features(xs_in, "xs", {});
  const at::Tensor& x0 = xs_in[0];
  const int64_t T = xs_in.size(), C = x0.size(1), TC = T * C;
  check_param(weight, "weight", {TC, TC}, x0);
  check_param(bn_weight, "bn_weight", {TC}, x0);
  check_param(bn_bias, "bn_bias", {TC}, x0);
  const int64_t n = x0.size(0) * x0.size(2) * x0.size(3);
  TORCH_CHECK(n > 1, "nddr: expected more than 1 value per channel when training, got input size ", x0.sizes());
  const auto fmt = dense_format(x0);
  const auto xs = in_format(xs_in, fmt);
  at::Tensor z = conv1x1(xs, weight, fmt);
  auto [mean, var] = Kernels::channel_stats(z, T);
  const at::Tensor scale = acc(bn_weight, x0) * at::rsqrt(var + eps);
  const at::Tensor shift = acc(bn_bias, x0) - mean * scale;
  auto ys = empty_like_all(xs, fmt);
  Kernels::affine_relu(z, scale, shift, ys);
  return {ys, z, mean, var};
}

template <class Kernels>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> train_backward(
    at::TensorList grad_ys_in, at::TensorList xs_in, const at::Tensor& z, const at::Tensor& weight,
    const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& mean, const at::Tensor& var,
    double eps) {
  check_features(xs_in, "xs", {});
  check_features(grad_ys_in, "grad_ys", xs_in);
  const at::Tensor& x0 = xs_in[0];
  const int64_t T = xs_in.size(), C = x0.size(1), TC = T * C;
  const auto fmt = dense_format(x0);
  const auto xs = in_format(xs_in, fmt);
  const auto grad_ys = in_format(grad_ys_in, fmt);
  const at::Tensor zc = z.contiguous(fmt);
  TORCH_CHECK(zc.size(1) == TC, "nddr: z must have T*C = ", TC, " channels, got ", z.sizes());
  const double n = static_cast<double>(x0.size(0) * x0.size(2) * x0.size(3));
  const at::Tensor mu = acc(mean, x0), invstd = at::rsqrt(acc(var, x0) + eps);
  const at::Tensor scale = acc(bn_weight, x0) * invstd;
  const at::Tensor shift = acc(bn_bias, x0) - mu * scale;
  auto [sum_dy, sum_dy_zc] = Kernels::relu_sums(grad_ys, zc, scale, shift, mu);
  // BN backward with batch statistics, per channel: dz = dy' * scale + z * a + b.
  const at::Tensor a = -scale * invstd * invstd * sum_dy_zc / n;
  const at::Tensor b = -scale * sum_dy / n - mu * a;
  at::Tensor dz = at::empty_like(zc);
  Kernels::bn_relu_grad(grad_ys, zc, scale, shift, a, b, dz);
  auto [grad_xs, grad_weight] = conv1x1_backward(dz, xs, weight, fmt);
  return {grad_xs, grad_weight, (sum_dy_zc * invstd).to(bn_weight.scalar_type()), sum_dy.to(bn_bias.scalar_type())};
}

template <class Kernels>
std::vector<at::Tensor> eval(at::TensorList xs_in, const at::Tensor& weight, const at::Tensor& bias) {
  check_features(xs_in, "xs", {});
  const at::Tensor& x0 = xs_in[0];
  const int64_t TC = static_cast<int64_t>(xs_in.size()) * x0.size(1);
  check_param(weight, "weight", {TC, TC}, x0);
  check_param(bias, "bias", {TC}, x0);
  const auto fmt = dense_format(x0);
  const auto xs = in_format(xs_in, fmt);
  at::Tensor z = conv1x1(xs, weight, fmt);
  auto ys = empty_like_all(xs, fmt);
  Kernels::affine_relu(z, at::ones({TC}, z.options().dtype(acc_type(x0))), acc(bias, x0), ys);
  return ys;
}

template <class Kernels>
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> eval_backward(at::TensorList grad_ys_in,
                                                                         at::TensorList xs_in, at::TensorList ys_in,
                                                                         const at::Tensor& weight) {
  check_features(xs_in, "xs", {});
  check_features(grad_ys_in, "grad_ys", xs_in);
  check_features(ys_in, "ys", xs_in);
  const at::Tensor& x0 = xs_in[0];
  const int64_t T = xs_in.size(), C = x0.size(1);
  const auto fmt = dense_format(x0);
  const auto xs = in_format(xs_in, fmt);
  at::Tensor dz = at::empty({x0.size(0), T * C, x0.size(2), x0.size(3)}, x0.options().memory_format(fmt));
  Kernels::relu_grad(in_format(grad_ys_in, fmt), in_format(ys_in, fmt), dz);
  auto [grad_xs, grad_weight] = conv1x1_backward(dz, xs, weight, fmt);
  at::Tensor grad_bias = dz.sum(at::IntArrayRef{0, 2, 3}, /*keepdim=*/false, acc_type(x0)).to(weight.scalar_type());
  return {grad_xs, grad_weight, grad_bias};
}

}  // namespace nddr
}  // namespace mtl_kernels
