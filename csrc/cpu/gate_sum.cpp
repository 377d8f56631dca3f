// gate_sum on the CPU: outs[t] = residuals[t] + sum_{i: targets[i] == t}
// feats[i] * sigmoid(gates[i] * scale + shift), and its backward, one pass
// each. feats and gates are read in place with their own strides (channel
// slices of PAD-Net's stacked convolution outputs), element (b, c, p) at
// b*sB + c*sC + p*sP.
//
// The loops follow the outputs' layout: NCHW rows (b, c) of P pixels with one
// channel's scale/shift, or channels_last rows (b, p) of C channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // the rows: streaming stores (cpu/stream_store.h), F16C conversions
#endif

#include "common/cross_stitch.h"
#include "cpu/huge_pages.h"
#include "cpu/isa.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel task at least
constexpr int64_t kChunks = 64;      // channels_last partial sums: fixed count, deterministic

template <typename T>
struct View {  // a [B, C, H*W] tensor by its strides
  T* ptr;
  int64_t sB, sC, sP;
};

template <typename T>
View<T> view_of(const at::Tensor& x) {
  const int64_t W = x.size(3);
  const int64_t sP = W > 1 ? x.stride(3) : x.stride(2);
  return {const_cast<T*>(x.const_data_ptr<T>()), x.stride(0), x.stride(1), sP};
}

// One row per NCHW image, channels and pixels merged, when there is no per-channel
// affine and each [C, H*W] image block of every tensor is one evenly strided run
// (PAD-Net's channel slices of a stacked convolution output are). At T=3, B=8, C=64,
// 60 x 80 against a row per plane: forward 5.8 vs 6.9 ms, backward 8.9 vs 9.7 (an
// interleaved A/B). Only with images enough to keep every thread busy.
bool whole_image_rows(bool channels_last, bool affine, int64_t B, std::initializer_list<at::TensorList> groups) {
  if (channels_last || affine || B < 2 * at::get_num_threads()) return false;
  for (const auto& xs : groups)
    for (const auto& x : xs) {
      const int64_t sP = x.size(3) > 1 ? x.stride(3) : x.stride(2);  // as view_of
      if (x.size(1) > 1 && x.stride(1) != x.size(2) * x.size(3) * sP) return false;
    }
  return true;
}

struct Walk {  // rows of the outputs' layout
  bool channels_last;
  int64_t B, C, P;
  bool whole_images = false;  // NCHW, one row per image: C and the pixels merged (see whole_image_rows)
  int64_t rows() const { return whole_images ? B : channels_last ? B * P : B * C; }
  int64_t len() const { return whole_images ? C * P : channels_last ? C : P; }
  // Offset of a row's first element in v, and the step along the row.
  template <typename T>
  std::pair<int64_t, int64_t> row(const View<T>& v, int64_t r) const {
    if (whole_images) return {r * v.sB, v.sP};
    if (channels_last) return {(r / P) * v.sB + (r % P) * v.sP, v.sC};
    return {(r / C) * v.sB + (r % C) * v.sC, v.sP};
  }
  int64_t channel(int64_t r, int64_t k) const { return channels_last ? k : r % C; }
};

// The per-row loops, compiled three times (baseline x86-64 = SSE2, AVX2,
// AVX-512) and picked at run time: on the dev machine the sigmoid's polynomial
// and division ran 8x faster per element with AVX-512 than with SSE2.
#define MTL_ISA_ROWS "cpu/gate_sum_rows.h"
#include "cpu/isa_variants.h"

// stream: write the outputs with streaming stores (AVX2 and AVX-512 only; see
// cpu/stream_store.h and kStreamAboveBytes).
template <bool kVec, typename scalar_t, typename acc_t>
void output_row_dispatch(bool stream, scalar_t* out, const scalar_t* res, int64_t n, int64_t pairs,
                         const scalar_t* const* f, const int64_t* fs, const scalar_t* const* g, const int64_t* gs,
                         const acc_t* sc, const acc_t* sh) {
  const Isa isa = best_isa();
  if (stream && isa == Isa::kAvx512)
    return isa_avx512::output_row<kVec, true>(out, res, n, pairs, f, fs, g, gs, sc, sh);
  if (stream && isa == Isa::kAvx2) return isa_avx2::output_row<kVec, true>(out, res, n, pairs, f, fs, g, gs, sc, sh);
  switch (isa) {
    case Isa::kAvx512: return isa_avx512::output_row<kVec, false>(out, res, n, pairs, f, fs, g, gs, sc, sh);
    case Isa::kAvx2: return isa_avx2::output_row<kVec, false>(out, res, n, pairs, f, fs, g, gs, sc, sh);
    default: return isa_base::output_row<kVec, false>(out, res, n, pairs, f, fs, g, gs, sc, sh);
  }
}

template <bool kVec, bool kSums, typename scalar_t, typename acc_t>
void gate_row_backward_dispatch(bool stream, int64_t n, const scalar_t* go, const scalar_t* f, const scalar_t* g,
                                scalar_t* gf, scalar_t* gg, const int64_t (&st)[4], const acc_t* sc, const acc_t* sh,
                                acc_t* sums, int64_t width) {
  const Isa isa = best_isa();
  if (stream && isa == Isa::kAvx512)
    return isa_avx512::gate_row_backward_streamed<kVec, kSums>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
  if (stream && isa == Isa::kAvx2)
    return isa_avx2::gate_row_backward_streamed<kVec, kSums>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
  switch (isa) {
    case Isa::kAvx512: return isa_avx512::gate_row_backward<kVec, kSums>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
    case Isa::kAvx2: return isa_avx2::gate_row_backward<kVec, kSums>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
    default: return isa_base::gate_row_backward<kVec, kSums>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
  }
}

// Whether an op that moves `bytes` through memory should write its outputs
// with streaming stores: when it moves more than twice a large last-level
// cache (32 MiB on the dev machine), its outputs are gone from the cache by
// the time the next op reads them, so reading their lines before writing them
// is wasted traffic. Smaller ops keep plain stores (their outputs may still be
// in cache for the next op).
constexpr int64_t kStreamAboveBytes = int64_t(64) << 20;

void check(at::TensorList feats, at::TensorList gates, at::IntArrayRef targets, int64_t num_outputs,
           const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(!feats.empty() && feats.size() == gates.size() && feats.size() == targets.size(),
              "gate_sum: feats, gates and targets must be non-empty and of the same length");
  const at::Tensor& f0 = feats[0];
  TORCH_CHECK(f0.dim() == 4, "gate_sum: feats[0] must be 4-D [B, C, H, W], got ", f0.sizes());
  for (size_t i = 0; i < feats.size(); ++i) {
    for (const at::Tensor* x : {&feats[i], &gates[i]})
      TORCH_CHECK(x->sizes() == f0.sizes() && x->scalar_type() == f0.scalar_type() && x->device() == f0.device(),
                  "gate_sum: pair ", i, " must match feats[0] in shape, dtype and device");
    TORCH_CHECK(0 <= targets[i] && targets[i] < num_outputs, "gate_sum: targets[", i, "] = ", targets[i],
                " is not in [0, ", num_outputs, ")");
  }
  for (const auto* v : {&scale, &shift})
    if (v->has_value())
      TORCH_CHECK((*v)->dim() == 1 && (*v)->size(0) == f0.size(1) && (*v)->device() == f0.device(),
                  "gate_sum: scale and shift must be [C] on the features' device");
}

// Per-channel vector in the accumulation type: given, or `fill` everywhere.
at::Tensor channel_vector(const std::optional<at::Tensor>& v, const at::Tensor& like, double fill) {
  const auto acc = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (v.has_value()) return v->to(acc).contiguous();
  return at::full({like.size(1)}, fill, like.options().dtype(acc));
}

std::vector<at::Tensor> gate_sum_cpu(at::TensorList residuals_in, at::TensorList feats, at::TensorList gates,
                                     at::IntArrayRef targets, int64_t num_outputs,
                                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  check(feats, gates, targets, num_outputs, scale, shift);
  TORCH_CHECK(residuals_in.empty() || static_cast<int64_t>(residuals_in.size()) == num_outputs,
              "gate_sum: residuals must hold num_outputs tensors or none");
  const at::Tensor& f0 = feats[0];
  const auto fmt = dense_format(residuals_in.empty() ? f0 : residuals_in[0]);
  const auto residuals = in_format(residuals_in, fmt);
  std::vector<at::Tensor> outs;
  for (int64_t t = 0; t < num_outputs; ++t) {
    outs.push_back(at::empty(f0.sizes(), f0.options().memory_format(fmt)));
    prefer_huge_pages(outs.back());
  }
  if (f0.numel() == 0) return outs;
  const bool cl = fmt == at::MemoryFormat::ChannelsLast, affine = scale.has_value() || shift.has_value();
  const Walk walk{cl, f0.size(0), f0.size(1), f0.size(2) * f0.size(3),
                  whole_image_rows(cl, affine, f0.size(0), {feats, gates, outs, residuals})};
  const at::Tensor sc = channel_vector(scale, f0, 1.0), sh = channel_vector(shift, f0, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gate_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<View<scalar_t>> f, g, out, res;
    for (size_t i = 0; i < feats.size(); ++i) f.push_back(view_of<scalar_t>(feats[i])), g.push_back(view_of<scalar_t>(gates[i]));
    for (auto& o : outs) out.push_back(view_of<scalar_t>(o));
    for (auto& r : residuals) res.push_back(view_of<scalar_t>(r));
    const acc_t *scp = sc.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
    const int64_t n = walk.len();
    const int64_t planes = num_outputs + static_cast<int64_t>(residuals.size() + 2 * feats.size());
    const bool stream = planes * f0.numel() * static_cast<int64_t>(sizeof(scalar_t)) > kStreamAboveBytes;
    at::parallel_for(0, walk.rows(), std::max<int64_t>(1, kGrain / n), [&](int64_t r0, int64_t r1) {
      // this row's pairs of each output: pointers to their rows, and the steps along them
      std::vector<const scalar_t*> fp(f.size()), gp(f.size());
      std::vector<int64_t> fs(f.size()), gs(f.size());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = walk.channels_last || walk.whole_images ? 0 : r % walk.C;
        for (int64_t t = 0; t < num_outputs; ++t) {
          int64_t pairs = 0;
          for (size_t i = 0; i < f.size(); ++i) {
            if (targets[i] != t) continue;
            auto [fo, fst] = walk.row(f[i], r);
            auto [go, gst] = walk.row(g[i], r);
            fp[pairs] = f[i].ptr + fo, fs[pairs] = fst, gp[pairs] = g[i].ptr + go, gs[pairs] = gst;
            ++pairs;
          }
          // outputs and residuals are dense in the outputs' layout: unit stride along the row
          scalar_t* op = out[t].ptr + walk.row(out[t], r).first;
          const scalar_t* rp = res.empty() ? nullptr : res[t].ptr + walk.row(res[t], r).first;
          if (walk.channels_last)
            output_row_dispatch<true>(stream, op, rp, n, pairs, fp.data(), fs.data(), gp.data(), gs.data(), scp, shp);
          else
            output_row_dispatch<false>(stream, op, rp, n, pairs, fp.data(), fs.data(), gp.data(), gs.data(), scp + c,
                                       shp + c);
        }
      }
      if (stream) isa_base::stream_fence();
    });
  });
  return outs;
}

// An output gradient the caller passes in: feats[0]'s shape, dtype and device,
// and a layout the row loops can write (H and W merge into one pixel axis).
void check_grad_out(const at::Tensor& g, const at::Tensor& f0, const char* name, size_t i) {
  TORCH_CHECK(g.sizes() == f0.sizes() && g.scalar_type() == f0.scalar_type() && g.device() == f0.device(),
              "gate_sum_backward_out: ", name, "[", i, "] must match feats in shape, dtype and device");
  TORCH_CHECK(g.size(2) == 1 || g.size(3) == 1 || g.stride(2) == g.size(3) * g.stride(3),
              "gate_sum_backward_out: ", name, "[", i, "] must have its H and W axes mergeable into one");
}

// Writes grad_feats and grad_gates (allocated by the caller, any layout the
// row loops read) and returns (grad_scale, grad_shift).
std::tuple<at::Tensor, at::Tensor> gate_sum_backward_into(at::TensorList grad_outs_in, at::TensorList feats,
                                                          at::TensorList gates, at::IntArrayRef targets,
                                                          const std::optional<at::Tensor>& scale,
                                                          const std::optional<at::Tensor>& shift,
                                                          at::TensorList grad_feats, at::TensorList grad_gates) {
  const at::Tensor& f0 = feats[0];  // the callers below have checked the arguments
  for (const auto& g : grad_outs_in)
    TORCH_CHECK(g.sizes() == f0.sizes() && g.scalar_type() == f0.scalar_type() && g.device() == f0.device(),
                "gate_sum_backward: grad_outs must match feats in shape, dtype and device");
  // walk the features' layout: they and their gradients are 4 of the 5 streams
  const auto fmt = dense_format(f0);
  const auto grad_outs = in_format(grad_outs_in, fmt);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast, sums = scale.has_value() || shift.has_value();
  const Walk walk{cl, f0.size(0), f0.size(1), f0.size(2) * f0.size(3),
                  whole_image_rows(cl, sums, f0.size(0), {feats, gates, grad_feats, grad_gates, grad_outs})};
  const auto acc_type = f0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Per-row (NCHW) or per-chunk (channels_last) partial sums of the gate
  // gradient before the affine, and of it times the gate: grad_shift, grad_scale.
  const int64_t per_chunk = walk.channels_last ? std::max<int64_t>(1, (walk.rows() + kChunks - 1) / kChunks) : 1;
  const int64_t chunks = (walk.rows() + per_chunk - 1) / per_chunk;
  at::Tensor partial = at::zeros({sums ? chunks : 0, 2, walk.channels_last ? walk.C : 1}, f0.options().dtype(acc_type));
  if (f0.numel() > 0) {
    const at::Tensor sc = channel_vector(scale, f0, 1.0), sh = channel_vector(shift, f0, 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gate_sum_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<View<scalar_t>> f, g, gf, gg, go;
      for (size_t i = 0; i < feats.size(); ++i) {
        f.push_back(view_of<scalar_t>(feats[i])), g.push_back(view_of<scalar_t>(gates[i]));
        gf.push_back(view_of<scalar_t>(grad_feats[i])), gg.push_back(view_of<scalar_t>(grad_gates[i]));
      }
      for (auto& o : grad_outs) go.push_back(view_of<scalar_t>(o));
      const acc_t *scp = sc.const_data_ptr<acc_t>(), *shp = sh.const_data_ptr<acc_t>();
      acc_t* part = sums ? partial.mutable_data_ptr<acc_t>() : nullptr;
      const int64_t n = walk.len(), width = walk.channels_last ? walk.C : 1;
      const int64_t planes = static_cast<int64_t>(grad_outs.size() + 4 * feats.size());
      const bool stream = planes * f0.numel() * static_cast<int64_t>(sizeof(scalar_t)) > kStreamAboveBytes;
      at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / (n * per_chunk)), [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          acc_t* ps = sums ? part + q * 2 * width : nullptr;
          for (int64_t r = q * per_chunk; r < std::min(walk.rows(), (q + 1) * per_chunk); ++r) {
            for (size_t i = 0; i < f.size(); ++i) {
              const int64_t oo = walk.row(go[targets[i]], r).first;  // grad_outs: outputs' layout, unit stride
              auto [fo, fs] = walk.row(f[i], r);
              auto [gio, gis] = walk.row(g[i], r);
              auto [gfo, gfs] = walk.row(gf[i], r);
              auto [ggo, ggs] = walk.row(gg[i], r);
              const int64_t st[4] = {fs, gis, gfs, ggs};
              const scalar_t *gop = go[targets[i]].ptr + oo, *fp = f[i].ptr + fo, *gp = g[i].ptr + gio;
              scalar_t *gfp = gf[i].ptr + gfo, *ggp = gg[i].ptr + ggo;
              const int64_t c0 = walk.channels_last || walk.whole_images ? 0 : r % walk.C;
              const bool streamed = stream && gfs == 1 && ggs == 1;  // the staged chunks copy out densely
              if (walk.channels_last && sums)
                gate_row_backward_dispatch<true, true>(streamed, n, gop, fp, gp, gfp, ggp, st, scp, shp, ps, width);
              else if (walk.channels_last)
                gate_row_backward_dispatch<true, false>(streamed, n, gop, fp, gp, gfp, ggp, st, scp, shp, ps, width);
              else if (sums)
                gate_row_backward_dispatch<false, true>(streamed, n, gop, fp, gp, gfp, ggp, st, scp + c0, shp + c0,
                                                        ps, width);
              else
                gate_row_backward_dispatch<false, false>(streamed, n, gop, fp, gp, gfp, ggp, st, scp + c0, shp + c0,
                                                         ps, width);
            }
          }
        }
        if (stream) isa_base::stream_fence();
      });
    });
  }
  const auto empty = [&] { return at::empty({0}, f0.options().dtype(at::kFloat)); };
  if (!sums) return {empty(), empty()};
  // NCHW rows are (b, c): sum over b; channels_last chunks: sum over chunks.
  const at::Tensor total = walk.channels_last ? partial.sum(0) : partial.view({walk.B, walk.C, 2}).sum(0).t();
  // copies: the two results must not share total's storage
  const at::Tensor grad_scale = scale.has_value() ? total[1].to(scale->scalar_type(), false, true) : empty();
  const at::Tensor grad_shift = shift.has_value() ? total[0].to(shift->scalar_type(), false, true) : empty();
  return {grad_scale, grad_shift};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> gate_sum_backward_cpu(
    at::TensorList grad_outs, at::TensorList feats, at::TensorList gates, at::IntArrayRef targets,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  check(feats, gates, targets, grad_outs.size(), scale, shift);
  const at::Tensor& f0 = feats[0];
  std::vector<at::Tensor> grad_feats, grad_gates;
  for (size_t i = 0; i < feats.size(); ++i) {
    grad_feats.push_back(at::empty(f0.sizes(), f0.options().memory_format(dense_format(feats[i]))));
    grad_gates.push_back(at::empty(f0.sizes(), f0.options().memory_format(dense_format(gates[i]))));
    prefer_huge_pages(grad_feats.back());
    prefer_huge_pages(grad_gates.back());
  }
  auto [grad_scale, grad_shift] =
      gate_sum_backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates);
  return {grad_feats, grad_gates, grad_scale, grad_shift};
}

std::tuple<at::Tensor, at::Tensor> gate_sum_backward_out_cpu(at::TensorList grad_outs, at::TensorList feats,
                                                             at::TensorList gates, at::IntArrayRef targets,
                                                             const std::optional<at::Tensor>& scale,
                                                             const std::optional<at::Tensor>& shift,
                                                             at::TensorList grad_feats, at::TensorList grad_gates) {
  check(feats, gates, targets, grad_outs.size(), scale, shift);
  TORCH_CHECK(grad_feats.size() == feats.size() && grad_gates.size() == feats.size(),
              "gate_sum_backward_out: grad_feats and grad_gates must hold one tensor per pair (", feats.size(),
              "), got ", grad_feats.size(), " and ", grad_gates.size());
  for (size_t i = 0; i < feats.size(); ++i) {
    check_grad_out(grad_feats[i], feats[0], "grad_feats", i), check_grad_out(grad_gates[i], feats[0], "grad_gates", i);
    prefer_huge_pages(grad_feats[i]), prefer_huge_pages(grad_gates[i]);
  }
  return gate_sum_backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("gate_sum", &gate_sum_cpu);
  m.impl("gate_sum_backward", &gate_sum_backward_cpu);
  m.impl("gate_sum_backward_out", &gate_sum_backward_out_cpu);
}

}  // namespace mtl_kernels
