// Cross-stitch on the CPU: ys[i] = sum_j alpha[i, j, c] * xs[j], and its
// backward, each in one pass over the T task tensors, read in place.
//
// The tensors are either NCHW, where row (b, c) is P = H*W contiguous pixels
// sharing one alpha[:, :, c], or channels_last, where row (b, p) is C
// contiguous channels whose weights vary along the row. Rows are cut into
// blocks of kBlock elements that stay in L1 while the T inputs are mixed.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/cross_stitch.h"
#include "cpu/huge_pages.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kBlock = 256;         // elements mixed at a time, per task
constexpr int64_t kGrain = 1 << 15;     // elements per parallel task at least
constexpr int64_t kLanes = 8;           // independent partial sums: lets dot() vectorise
constexpr int64_t kNhwcChunks = 64;     // fixed, so grad_alpha does not depend on the thread count

template <typename T>
using Ptrs = std::vector<T*>;

// acc[k] = sum_j w[j * w_stride] * x[j][k] for k < n: one weight per task (NCHW).
template <typename scalar_t, typename acc_t>
inline void mix_scalar_weights(acc_t* acc, int64_t n, const acc_t* w, int64_t w_stride,
                               const Ptrs<const scalar_t>& x, int64_t off) {
  const scalar_t* x0 = x[0] + off;
  for (int64_t k = 0; k < n; ++k) acc[k] = w[0] * static_cast<acc_t>(x0[k]);
  for (size_t j = 1; j < x.size(); ++j) {
    const scalar_t* xj = x[j] + off;
    const acc_t wj = w[j * w_stride];
    for (int64_t k = 0; k < n; ++k) acc[k] += wj * static_cast<acc_t>(xj[k]);
  }
}

// acc[k] = sum_j w[j * w_stride + k] * x[j][k] for k < n: per-channel weights (channels_last).
template <typename scalar_t, typename acc_t>
inline void mix_vector_weights(acc_t* acc, int64_t n, const acc_t* w, int64_t w_stride,
                               const Ptrs<const scalar_t>& x, int64_t off) {
  const scalar_t* x0 = x[0] + off;
  for (int64_t k = 0; k < n; ++k) acc[k] = w[k] * static_cast<acc_t>(x0[k]);
  for (size_t j = 1; j < x.size(); ++j) {
    const scalar_t* xj = x[j] + off;
    const acc_t* wj = w + j * w_stride;
    for (int64_t k = 0; k < n; ++k) acc[k] += wj[k] * static_cast<acc_t>(xj[k]);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* y, const acc_t* acc, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] = static_cast<scalar_t>(acc[k]);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += static_cast<acc_t>(a[k + l]) * static_cast<acc_t>(b[k + l]);
  acc_t sum = 0;
  for (; k < n; ++k) sum += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
  for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

// Same as dot() but one sum per element: s[k] += a[k] * b[k] (channels_last grad_alpha).
template <typename scalar_t, typename acc_t>
inline void fma_into(acc_t* s, const scalar_t* a, const scalar_t* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) s[k] += static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]);
}

template <typename scalar_t>
Ptrs<const scalar_t> const_ptrs(const std::vector<at::Tensor>& ts) {
  Ptrs<const scalar_t> p;
  for (const auto& t : ts) p.push_back(t.const_data_ptr<scalar_t>());
  return p;
}

template <typename scalar_t>
Ptrs<scalar_t> mutable_ptrs(std::vector<at::Tensor>& ts) {
  Ptrs<scalar_t> p;
  for (auto& t : ts) p.push_back(t.mutable_data_ptr<scalar_t>());
  return p;
}

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename acc_t>
void forward_nchw(const Ptrs<const scalar_t>& x, const Ptrs<scalar_t>& y, const acc_t* a, int64_t T, int64_t rows,
                  int64_t C, int64_t P) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / P), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> w(T * T);
    acc_t acc[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % C;
      for (int64_t ij = 0; ij < T * T; ++ij) w[ij] = a[ij * C + c];
      for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
        const int64_t n = std::min(kBlock, P - p0), off = r * P + p0;
        for (int64_t i = 0; i < T; ++i) {
          mix_scalar_weights(acc, n, &w[i * T], 1, x, off);  // row i of alpha
          store(y[i] + off, acc, n);
        }
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_nhwc(const Ptrs<const scalar_t>& x, const Ptrs<scalar_t>& y, const acc_t* a, int64_t T, int64_t rows,
                  int64_t C) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t r0, int64_t r1) {
    acc_t acc[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
        const int64_t n = std::min(kBlock, C - c0), off = r * C + c0;
        for (int64_t i = 0; i < T; ++i) {
          mix_vector_weights(acc, n, a + i * T * C + c0, C, x, off);  // alpha[i, j, c0:]
          store(y[i] + off, acc, n);
        }
      }
    }
  });
}

std::vector<at::Tensor> cross_stitch_cpu(at::TensorList xs_in, const at::Tensor& alpha) {
  check_cross_stitch_args(xs_in, alpha, "xs");
  const auto fmt = dense_format(xs_in[0]);
  const auto xs = in_format(xs_in, fmt);
  auto ys = empty_like_all(xs, fmt);
  for (const auto& y : ys) prefer_huge_pages(y);
  const int64_t T = xs.size(), B = xs[0].size(0), C = xs[0].size(1), P = xs[0].size(2) * xs[0].size(3);
  if (xs[0].numel() == 0) return ys;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "cross_stitch_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor a = alpha.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto x = const_ptrs<scalar_t>(xs);
    const auto y = mutable_ptrs<scalar_t>(ys);
    if (fmt == at::MemoryFormat::ChannelsLast)
      forward_nhwc(x, y, a.const_data_ptr<acc_t>(), T, B * P, C);
    else
      forward_nchw(x, y, a.const_data_ptr<acc_t>(), T, B * C, C, P);
  });
  return ys;
}

// --------------------------------------------------------------- backward
// grad_xs[j] = sum_i alpha[i, j, c] * grad_ys[i] is the forward with alpha
// transposed; grad_alpha[i, j, c] = sum over b, p of grad_ys[i] * xs[j] is
// summed per row (or per chunk) into a partial buffer in the same pass, then
// reduced in a fixed order, so the result is deterministic.

template <typename scalar_t, typename acc_t>
void backward_nchw(const Ptrs<const scalar_t>& gy, const Ptrs<const scalar_t>& x, const Ptrs<scalar_t>& gx,
                   const acc_t* a, acc_t* partial /* [rows, T*T] */, int64_t T, int64_t rows, int64_t C, int64_t P) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / P), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> w(T * T);
    acc_t acc[kBlock];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % C;
      for (int64_t ij = 0; ij < T * T; ++ij) w[ij] = a[ij * C + c];
      acc_t* s = partial + r * T * T;
      for (int64_t p0 = 0; p0 < P; p0 += kBlock) {
        const int64_t n = std::min(kBlock, P - p0), off = r * P + p0;
        for (int64_t j = 0; j < T; ++j) {
          mix_scalar_weights(acc, n, &w[j], T, gy, off);  // column j of alpha
          store(gx[j] + off, acc, n);
        }
        for (int64_t i = 0; i < T; ++i)
          for (int64_t j = 0; j < T; ++j) s[i * T + j] += dot<scalar_t, acc_t>(gy[i] + off, x[j] + off, n);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(const Ptrs<const scalar_t>& gy, const Ptrs<const scalar_t>& x, const Ptrs<scalar_t>& gx,
                   const acc_t* a, acc_t* partial /* [chunks, T*T, C] */, int64_t T, int64_t rows, int64_t C,
                   int64_t chunks) {
  // alpha transposed, [j, i, c], so that grad_xs[j] mixes contiguous weight rows.
  std::vector<acc_t> at_(T * T * C);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j) std::copy_n(a + (i * T + j) * C, C, at_.data() + (j * T + i) * C);
  const int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    acc_t acc[kBlock];
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* s = partial + k * T * T * C;
      const int64_t r_end = std::min(rows, (k + 1) * rows_per_chunk);
      for (int64_t r = k * rows_per_chunk; r < r_end; ++r) {
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const int64_t n = std::min(kBlock, C - c0), off = r * C + c0;
          for (int64_t j = 0; j < T; ++j) {
            mix_vector_weights(acc, n, at_.data() + j * T * C + c0, C, gy, off);
            store(gx[j] + off, acc, n);
          }
          for (int64_t i = 0; i < T; ++i)
            for (int64_t j = 0; j < T; ++j) fma_into(s + (i * T + j) * C + c0, gy[i] + off, x[j] + off, n);
        }
      }
    }
  });
}

std::tuple<std::vector<at::Tensor>, at::Tensor> cross_stitch_backward_cpu(at::TensorList grad_ys_in,
                                                                        at::TensorList xs_in,
                                                                        const at::Tensor& alpha) {
  check_cross_stitch_args(xs_in, alpha, "xs");
  check_cross_stitch_args(grad_ys_in, alpha, "grad_ys");
  TORCH_CHECK(grad_ys_in[0].sizes() == xs_in[0].sizes() && grad_ys_in[0].scalar_type() == xs_in[0].scalar_type() &&
                  grad_ys_in[0].device() == xs_in[0].device(),
              "cross_stitch_backward: grad_ys must match xs in shape, dtype and device");
  const auto fmt = dense_format(xs_in[0]);
  const auto xs = in_format(xs_in, fmt);
  const auto gys = in_format(grad_ys_in, fmt);
  auto gxs = empty_like_all(xs, fmt);
  for (const auto& g : gxs) prefer_huge_pages(g);
  const int64_t T = xs.size(), B = xs[0].size(0), C = xs[0].size(1), P = xs[0].size(2) * xs[0].size(3);
  if (xs[0].numel() == 0) return {gxs, at::zeros_like(alpha, at::MemoryFormat::Contiguous)};
  at::Tensor grad_alpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "cross_stitch_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor a = alpha.to(acc_type).contiguous();
    const auto gy = const_ptrs<scalar_t>(gys);
    const auto x = const_ptrs<scalar_t>(xs);
    const auto gx = mutable_ptrs<scalar_t>(gxs);
    if (fmt == at::MemoryFormat::ChannelsLast) {
      const int64_t chunks = std::min(kNhwcChunks, B * P);
      at::Tensor partial = at::zeros({chunks, T, T, C}, xs[0].options().dtype(acc_type));
      backward_nhwc(gy, x, gx, a.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), T, B * P, C, chunks);
      grad_alpha = partial.sum(0);
    } else {
      at::Tensor partial = at::zeros({B, C, T, T}, xs[0].options().dtype(acc_type));
      backward_nchw(gy, x, gx, a.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), T, B * C, C, P);
      grad_alpha = partial.sum(0).permute({1, 2, 0});
    }
  });
  return {gxs, grad_alpha.to(alpha.scalar_type()).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("cross_stitch", &cross_stitch_cpu);
  m.impl("cross_stitch_backward", &cross_stitch_backward_cpu);
}

}  // namespace mtl_kernels
