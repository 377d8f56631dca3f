// NDDR fusion on the CPU: the GEMMs and BN math are shared with CUDA
// (common/nddr.h); these are the memory-bound kernels around them, each one
// pass over the T task tensors and the [B, T*C, H, W] convolution result z.
//
// Rows: in NCHW a row is one (image, channel k = t*C + c) with P contiguous
// pixels and one set of per-channel scalars; in channels_last a row is one
// pixel, and each task's C contiguous channels of it are one segment with
// per-element scalars. Each kernel body is written once as a generic lambda
// and instantiated for both cases (kVec: scalars vary along the segment), so
// the compiler vectorises each loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/nddr.h"
#include "cpu/huge_pages.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task at least
constexpr int64_t kChunks = 64;      // fixed, so sums do not depend on the thread count
constexpr int64_t kLanes = 8;        // independent partial sums: lets row sums vectorise

using PerRow = std::integral_constant<bool, false>;      // NCHW: one channel per segment
using PerElement = std::integral_constant<bool, true>;   // channels_last: one channel per element

struct Shape {
  bool channels_last;
  int64_t B, T, C, P;
  int64_t rows() const { return channels_last ? B * P : B * T * C; }
  int64_t row_len() const { return channels_last ? T * C : P; }
  int64_t grain() const { return std::max<int64_t>(1, kGrain / row_len()); }
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

// Rows per channels_last chunk: about kChunks chunks, a count fixed by the shape alone.
inline int64_t chunk_rows(int64_t rows) { return std::max<int64_t>(1, (rows + kChunks - 1) / kChunks); }

// Calls f(kind, z_offset, task, task_offset, k0, n) for every segment of rows
// [r0, r1): n contiguous elements of z from channel k0 (PerRow) or channels
// k0.. (PerElement), and the same elements of task tensor `task`.
template <typename F>
void for_segments(const Shape& s, int64_t r0, int64_t r1, const F& f) {
  const int64_t TC = s.T * s.C;
  for (int64_t r = r0; r < r1; ++r) {
    if (s.channels_last) {
      for (int64_t t = 0; t < s.T; ++t) f(PerElement{}, r * TC + t * s.C, t, r * s.C, t * s.C, s.C);
    } else {
      const int64_t b = r / TC, k = r % TC;
      f(PerRow{}, r * s.P, k / s.C, (b * s.C + k % s.C) * s.P, k, s.P);
    }
  }
}

// on ? g : 0 without a branch (a random ReLU mask mispredicts half the time)
// and without multiplying (which would turn an inf/NaN gradient under a closed
// mask into NaN where the reference gives 0).
template <typename T>
inline T keep_if(bool on, T g) {
  using bits_t = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  bits_t b;
  std::memcpy(&b, &g, sizeof b);
  b &= static_cast<bits_t>(-static_cast<bits_t>(on));
  std::memcpy(&g, &b, sizeof b);
  return g;
}

// The per-channel scalar for element i of a segment starting at channel k0.
template <typename Kind, typename acc_t>
inline acc_t chan(const acc_t* p, int64_t k0, int64_t i) {
  if constexpr (Kind::value) return p[k0 + i];
  else return p[k0];
}

struct CpuKernels {
  // Batch mean and biased variance per channel of z, numerically safe: NCHW
  // rows are centred on their own mean (two passes over a row in cache);
  // channels_last chunks on their first row. Partials merge with Chan's formula.
  static std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z, int64_t T) {
    const Shape s = shape_of(z, T);
    const int64_t TC = s.T * s.C, rows = s.rows();
    const int64_t per_chunk = s.channels_last ? chunk_rows(rows) : 1;
    const int64_t chunks = (rows + per_chunk - 1) / per_chunk;  // none empty
    const auto acc_type = nddr::acc_type(z);
    // [chunks, 3, width]: count, mean, M2 of each part
    at::Tensor part = at::zeros({chunks, 3, s.channels_last ? TC : 1}, z.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_channel_stats_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      double* out = part.mutable_data_ptr<double>();
      at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
        std::vector<acc_t> shift(TC), s1(TC), s2(TC);
        for (int64_t q = q0; q < q1; ++q) {
          double* o = out + q * 3 * (s.channels_last ? TC : 1);
          const int64_t r_begin = q * per_chunk, r_end = std::min(rows, r_begin + per_chunk);
          if (!s.channels_last) {
            const scalar_t* zr = zp + r_begin * s.P;
            acc_t lane[kLanes] = {};
            int64_t i = 0;
            for (; i + kLanes <= s.P; i += kLanes)
              for (int64_t l = 0; l < kLanes; ++l) lane[l] += static_cast<acc_t>(zr[i + l]);
            acc_t sum = 0;
            for (; i < s.P; ++i) sum += static_cast<acc_t>(zr[i]);
            for (int64_t l = 0; l < kLanes; ++l) sum += lane[l];
            const acc_t m = sum / s.P;
            acc_t lane2[kLanes] = {};
            for (i = 0; i + kLanes <= s.P; i += kLanes)
              for (int64_t l = 0; l < kLanes; ++l) {
                const acc_t d = static_cast<acc_t>(zr[i + l]) - m;
                lane2[l] += d * d;
              }
            acc_t m2 = 0;
            for (; i < s.P; ++i) m2 += (static_cast<acc_t>(zr[i]) - m) * (static_cast<acc_t>(zr[i]) - m);
            for (int64_t l = 0; l < kLanes; ++l) m2 += lane2[l];
            o[0] = s.P, o[1] = m, o[2] = m2;
            continue;
          }
          for (int64_t k = 0; k < TC; ++k) shift[k] = static_cast<acc_t>(zp[r_begin * TC + k]), s1[k] = s2[k] = 0;
          for (int64_t r = r_begin; r < r_end; ++r) {
            const scalar_t* zr = zp + r * TC;
            for (int64_t k = 0; k < TC; ++k) {
              const acc_t d = static_cast<acc_t>(zr[k]) - shift[k];
              s1[k] += d;
              s2[k] += d * d;
            }
          }
          const double n = r_end - r_begin;
          for (int64_t k = 0; k < TC; ++k) {
            o[k] = n;
            o[TC + k] = shift[k] + s1[k] / n;
            o[2 * TC + k] = std::max(0.0, double(s2[k]) - double(s1[k]) * s1[k] / n);
          }
        }
      });
    });
    // Merge the parts of each channel in a fixed order (Chan et al.).
    const at::Tensor p = s.channels_last ? part : part.view({s.B, TC, 3}).permute({0, 2, 1});  // [parts, 3, TC]
    const at::Tensor cnt = p.select(1, 0), mu = p.select(1, 1), m2 = p.select(1, 2);
    const at::Tensor n = cnt.sum(0);
    const at::Tensor mean = (cnt * mu).sum(0) / n;
    const at::Tensor var = (m2.sum(0) + (cnt * (mu - mean).square()).sum(0)) / n;
    return {mean.to(acc_type), var.to(acc_type)};
  }

  static void affine_relu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          std::vector<at::Tensor>& ys) {
    for (const auto& y : ys) prefer_huge_pages(y);
    const Shape s = shape_of(z, ys.size());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_affine_relu_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>();
      const auto y = ptrs<scalar_t>(ys);
      at::parallel_for(0, s.rows(), s.grain(), [&](int64_t r0, int64_t r1) {
        for_segments(s, r0, r1, [&](auto kind, int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n) {
          using Kind = decltype(kind);
          const scalar_t* zr = zp + zo;
          scalar_t* yt = y[t] + yo;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t v = static_cast<acc_t>(zr[i]) * chan<Kind>(sc, k0, i) + chan<Kind>(sh, k0, i);
            yt[i] = static_cast<scalar_t>(v < 0 ? acc_t(0) : v);  // NaN stays NaN, as F.relu
          }
        });
      });
    });
  }

  static std::tuple<at::Tensor, at::Tensor> relu_sums(const std::vector<at::Tensor>& grad_ys, const at::Tensor& z,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const at::Tensor& mean) {
    const Shape s = shape_of(z, grad_ys.size());
    const int64_t TC = s.T * s.C, rows = s.rows();
    // Partial sums per NCHW row or per channels_last chunk of rows, reduced in a fixed order.
    const int64_t per_chunk = s.channels_last ? chunk_rows(rows) : 1;
    const int64_t chunks = (rows + per_chunk - 1) / per_chunk, width = s.channels_last ? TC : 1;
    at::Tensor partial = at::zeros({chunks, 2, width}, scale.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_relu_sums_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const acc_t *sc = scale.const_data_ptr<acc_t>(), *sh = shift.const_data_ptr<acc_t>(),
                  *mu = mean.const_data_ptr<acc_t>();
      const auto gy = ptrs<scalar_t>(grad_ys);
      acc_t* part = partial.mutable_data_ptr<acc_t>();
      at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / (per_chunk * s.row_len())), [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          acc_t* out = part + q * 2 * width;
          for_segments(s, q * per_chunk, std::min(rows, (q + 1) * per_chunk),
                       [&](auto kind, int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n) {
                         using Kind = decltype(kind);
                         const scalar_t *zr = zp + zo, *g = gy[t] + yo;
                         auto term = [&](int64_t i, acc_t& d, acc_t& dz) {
                           const acc_t zi = static_cast<acc_t>(zr[i]);
                           d = keep_if(!(zi * chan<Kind>(sc, k0, i) + chan<Kind>(sh, k0, i) <= 0), static_cast<acc_t>(g[i]));
                           dz = d * (zi - chan<Kind>(mu, k0, i));
                         };
                         if constexpr (Kind::value) {  // one sum per channel: independent, vectorises
                           for (int64_t i = 0; i < n; ++i) {
                             acc_t d, dz;
                             term(i, d, dz);
                             out[k0 + i] += d;
                             out[width + k0 + i] += dz;
                           }
                         } else {  // one sum per row: lanes
                           acc_t l1[kLanes] = {}, l2[kLanes] = {};
                           int64_t i = 0;
                           for (; i + kLanes <= n; i += kLanes)
                             for (int64_t l = 0; l < kLanes; ++l) {
                               acc_t d, dz;
                               term(i + l, d, dz);
                               l1[l] += d;
                               l2[l] += dz;
                             }
                           for (; i < n; ++i) {
                             acc_t d, dz;
                             term(i, d, dz);
                             l1[0] += d;
                             l2[0] += dz;
                           }
                           for (int64_t l = 0; l < kLanes; ++l) out[0] += l1[l], out[1] += l2[l];
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
      at::parallel_for(0, s.rows(), s.grain(), [&](int64_t r0, int64_t r1) {
        for_segments(s, r0, r1, [&](auto kind, int64_t zo, int64_t t, int64_t yo, int64_t k0, int64_t n) {
          using Kind = decltype(kind);
          const scalar_t *zr = zp + zo, *g = gy[t] + yo;
          scalar_t* d = dzp + zo;
          for (int64_t i = 0; i < n; ++i) {
            const acc_t zi = static_cast<acc_t>(zr[i]), scale_i = chan<Kind>(sc, k0, i);
            const acc_t dy = keep_if(!(zi * scale_i + chan<Kind>(sh, k0, i) <= 0), static_cast<acc_t>(g[i]));
            d[i] = static_cast<scalar_t>(dy * scale_i + zi * chan<Kind>(ap, k0, i) + chan<Kind>(bp, k0, i));
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
      at::parallel_for(0, s.rows(), s.grain(), [&](int64_t r0, int64_t r1) {
        for_segments(s, r0, r1, [&](auto, int64_t zo, int64_t t, int64_t yo, int64_t, int64_t n) {
          const scalar_t *g = gy[t] + yo, *yt = y[t] + yo;
          scalar_t* d = dzp + zo;
          // !(y <= 0), not y > 0: a NaN output passes its gradient, as F.relu's backward does
          for (int64_t i = 0; i < n; ++i) d[i] = keep_if(!(yt[i] <= scalar_t(0)), g[i]);
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
