// NDDR fusion on the CPU: the GEMMs and BN math are shared with CUDA
// (common/nddr.h); these are the memory-bound kernels around them, each one
// pass over the T task tensors and the [B, T*C, H, W] convolution result z.
//
// Rows: in NCHW a row is one (image, channel k = t*C + c) with P contiguous
// pixels and one set of per-channel scalars; in channels_last a row is one
// pixel with T*C contiguous channels, task t's outputs at columns [tC, tC+C).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/nddr.h"
#include "cpu/huge_pages.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task at least
constexpr int64_t kChunks = 64;      // fixed, so sums do not depend on the thread count

struct Shape {
  bool channels_last;
  int64_t B, T, C, P;
};

Shape shape_of(const at::Tensor& z, int64_t T) {
  return {z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous(), z.size(0), T, z.size(1) / T,
          z.size(2) * z.size(3)};
}

template <typename scalar_t>
std::vector<scalar_t*> ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<scalar_t*> p;
  for (const auto& t : ts) p.push_back(const_cast<scalar_t*>(t.const_data_ptr<scalar_t>()));
  return p;
}

// Calls f(z_row, task_rows, k0, n): n contiguous elements of z starting at
// channel k0 (NCHW: one channel, n = P; channels_last: all T*C channels of a
// pixel, one call per task with n = C), with the matching offset into the task
// tensors. Rows [r0, r1) of the layout's row space.
template <typename F>
void for_rows(const Shape& s, int64_t r0, int64_t r1, const F& f) {
  const int64_t TC = s.T * s.C;
  for (int64_t r = r0; r < r1; ++r) {
    if (s.channels_last) {
      for (int64_t t = 0; t < s.T; ++t) f(r * TC + t * s.C, t, r * s.C, t * s.C, s.C, /*per_element_channel=*/true);
    } else {
      const int64_t b = r / TC, k = r % TC, t = k / s.C, c = k % s.C;
      f(r * s.P, t, (b * s.C + c) * s.P, k, s.P, false);
    }
  }
}

int64_t rows_of(const Shape& s) { return s.channels_last ? s.B * s.P : s.B * s.T * s.C; }
int64_t row_len(const Shape& s) { return s.channels_last ? s.T * s.C : s.P; }

struct CpuKernels {
  static void affine_relu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          std::vector<at::Tensor>& ys) {
    for (const auto& y : ys) prefer_huge_pages(y);
    const Shape s = shape_of(z, ys.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_affine_relu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>();
      const auto y = ptrs<scalar_t>(ys);
      at::parallel_for(0, rows_of(s), std::max<int64_t>(1, kGrain / row_len(s)), [&](int64_t r0, int64_t r1) {
        for_rows(s, r0, r1, [&](int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n, bool vec) {
          scalar_t* yt = y[t] + yo;
          const scalar_t* zr = zp + zo;
          if (vec) {
            for (int64_t i = 0; i < n; ++i)
              yt[i] = static_cast<scalar_t>(std::max(acc_t(0), static_cast<acc_t>(zr[i]) * sc[k0 + i] + sh[k0 + i]));
          } else {
            const acc_t a = sc[k0], b = sh[k0];
            for (int64_t i = 0; i < n; ++i)
              yt[i] = static_cast<scalar_t>(std::max(acc_t(0), static_cast<acc_t>(zr[i]) * a + b));
          }
        });
      });
    });
  }

  static std::tuple<at::Tensor, at::Tensor> relu_sums(const std::vector<at::Tensor>& grad_ys, const at::Tensor& z,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const at::Tensor& mean) {
    const Shape s = shape_of(z, grad_ys.size());
    const int64_t TC = s.T * s.C, rows = rows_of(s);
    // Per-row partial sums (NCHW: [B, TC] rows; channels_last: [chunks, TC]), reduced in a fixed order.
    const int64_t chunks = s.channels_last ? std::min(kChunks, rows) : rows;
    at::Tensor partial = at::zeros({chunks, 2, s.channels_last ? TC : 1}, scale.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_relu_sums_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>(),
                  *mu = mean.const_data_ptr<acc_t>();
      const auto gy = ptrs<scalar_t>(grad_ys);
      acc_t* part = partial.mutable_data_ptr<acc_t>();
      const int64_t per_chunk = (rows + chunks - 1) / chunks;
      at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / (per_chunk * row_len(s))), [&](int64_t k0_, int64_t k1_) {
        for (int64_t q = k0_; q < k1_; ++q) {
          acc_t* out = part + q * 2 * (s.channels_last ? TC : 1);
          for_rows(s, q * per_chunk, std::min(rows, (q + 1) * per_chunk),
                   [&](int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n, bool vec) {
                     const scalar_t *zr = zp + zo, *g = gy[t] + yo;
                     if (vec) {
                       acc_t *sd = out + k0, *sdz = out + TC + k0;
                       for (int64_t i = 0; i < n; ++i) {
                         const acc_t zi = static_cast<acc_t>(zr[i]);
                         const acc_t d = zi * sc[k0 + i] + sh[k0 + i] > 0 ? static_cast<acc_t>(g[i]) : acc_t(0);
                         sd[i] += d;
                         sdz[i] += d * (zi - mu[k0 + i]);
                       }
                     } else {
                       const acc_t a = sc[k0], b = sh[k0], m = mu[k0];
                       acc_t sd = 0, sdz = 0;
                       for (int64_t i = 0; i < n; ++i) {
                         const acc_t zi = static_cast<acc_t>(zr[i]);
                         const acc_t d = zi * a + b > 0 ? static_cast<acc_t>(g[i]) : acc_t(0);
                         sd += d;
                         sdz += d * (zi - m);
                       }
                       out[0] = sd;
                       out[1] = sdz;
                     }
                   });
        }
      });
    });
    if (s.channels_last) {
      const at::Tensor sums = partial.sum(0);  // [2, TC]
      return {sums[0], sums[1]};
    }
    const at::Tensor sums = partial.view({s.B, TC, 2}).sum(0);  // rows are (b, k)
    return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous()};
  }

  static void bn_relu_grad(const std::vector<at::Tensor>& grad_ys, const at::Tensor& z, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& a, const at::Tensor& b, at::Tensor& dz) {
    prefer_huge_pages(dz);
    const Shape s = shape_of(z, grad_ys.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_bn_relu_grad_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
      const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>(),
                  *ap = a.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
      const auto gy = ptrs<scalar_t>(grad_ys);
      at::parallel_for(0, rows_of(s), std::max<int64_t>(1, kGrain / row_len(s)), [&](int64_t r0, int64_t r1) {
        for_rows(s, r0, r1, [&](int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n, bool vec) {
          const scalar_t *zr = zp + zo, *g = gy[t] + yo;
          scalar_t* d = dzp + zo;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t k = vec ? k0 + i : k0;
            const acc_t zi = static_cast<acc_t>(zr[i]);
            const acc_t dy = zi * sc[k] + sh[k] > 0 ? static_cast<acc_t>(g[i]) : acc_t(0);
            d[i] = static_cast<scalar_t>(dy * sc[k] + zi * ap[k] + bp[k]);
          }
        });
      });
    });
  }

  static void relu_grad(const std::vector<at::Tensor>& grad_ys, const std::vector<at::Tensor>& ys, at::Tensor& dz) {
    prefer_huge_pages(dz);
    const Shape s = shape_of(dz, grad_ys.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "nddr_relu_grad_cpu", [&] {
      scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
      const auto gy = ptrs<scalar_t>(grad_ys);
      const auto y = ptrs<scalar_t>(ys);
      at::parallel_for(0, rows_of(s), std::max<int64_t>(1, kGrain / row_len(s)), [&](int64_t r0, int64_t r1) {
        for_rows(s, r0, r1, [&](int64_t zo, int64_t t, int64_t yo, int64_t, int64_t n, bool) {
          const scalar_t *g = gy[t] + yo, *yt = y[t] + yo;
          scalar_t* d = dzp + zo;
          for (int64_t i = 0; i < n; ++i) d[i] = yt[i] > scalar_t(0) ? g[i] : scalar_t(0);
        });
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("nddr_train", &nddr::train<CpuKernels>);
  m.impl("nddr_train_backward", &nddr::train_backward<CpuKernels>);
  m.impl("nddr_eval", &nddr::eval<CpuKernels>);
  m.impl("nddr_eval_backward", &nddr::eval_backward<CpuKernels>);
}

}  // namespace mtl_kernels
