// CUDA kernels of gate_sum (schemas in csrc/ops.cpp, definition in
// mtl_kernels/reference/gate_sum.py), with s_i = sigmoid(gates[i] * scale[c] + shift[c]):
//   outs[t]       = residuals[t] + sum_{i: targets[i] == t} feats[i] * s_i
//   grad_feats[i] = g * s_i,  grad_gates[i] = d_i * scale[c],  d_i = g * feats[i] * s_i * (1 - s_i)
//   grad_scale[c] = sum_{i,b,p} d_i * gates[i],  grad_shift[c] = sum_{i,b,p} d_i   (g = grad_outs[targets[i]])
//
// Elementwise and memory-bound, so each direction is one pass. Every tensor is
// addressed as element (b, c, p) at b*sB + c*sC + p*sP (H and W merged into
// p), so feats and gates are read in place, channel slices included.
//
// Threads follow the iteration layout (the outputs' in the forward, the
// grad_outs' in the backward) in blocks of bx * by = 256, lanes (x) along its
// contiguous axis:
//   NCHW  x along p, y along rows (b, c); a thread walks p in steps of bx
//   NHWC  x along c, y along p;           a thread walks p in steps of by
// Either way a thread keeps one (b, c), so one channel's scale and shift, and
// the backward's per-channel sums accumulate in registers. Each block then
// reduces them (warp shuffles along p for NCHW, a shared-memory tree along p
// for NHWC) into its own slot of a buffer that at::sum reduces: deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cross_stitch.h"

namespace mtl_kernels {
namespace {

constexpr int kThreads = 256;         // threads per block
constexpr int kUnroll = 4;            // pixels per thread whose loads are issued together
constexpr int kMaxPairs = 16;         // (feat, gate) pairs per launch
constexpr int kMaxOuts = 8;           // outputs per forward launch
constexpr int64_t kMaxGridY = 65535;

struct Strides {
  int64_t b, c, p;
};

// Kernel-side geometry; blockDim gives bx, by.
struct Geo {
  int64_t B, C, P;
  int64_t steps;    // pixels per thread
  int64_t pchunks;  // NHWC: pixel chunks per image (blockIdx.x = b * pchunks + chunk)
  int64_t slots;    // backward: partial-sum slots per channel
  bool cl;          // NHWC iteration
};

// Forward arguments, passed by value. Pairs are grouped by output:
// first[j] .. first[j + 1] - 1 add into out[j].
template <typename scalar_t>
struct FwdArgs {
  const scalar_t* feat[kMaxPairs];
  const scalar_t* gate[kMaxPairs];
  Strides fs[kMaxPairs], gs[kMaxPairs];
  const scalar_t* res[kMaxOuts];  // nullptr: start from zero; == out[j] when continuing a sum
  scalar_t* out[kMaxOuts];
  int first[kMaxOuts + 1];
  int num_outs;
  Strides os;  // outputs and residuals (all dense in the iteration layout)
};

template <typename scalar_t>
struct BwdArgs {
  const scalar_t* gout[kMaxPairs];  // grad_outs[targets[i]]
  const scalar_t* feat[kMaxPairs];
  const scalar_t* gate[kMaxPairs];
  scalar_t* gfeat[kMaxPairs];
  scalar_t* ggate[kMaxPairs];
  Strides fs[kMaxPairs], gs[kMaxPairs], gfs[kMaxPairs], ggs[kMaxPairs];
  int num_pairs;
  Strides os;  // grad_outs
};

__device__ __forceinline__ int64_t base_of(const Strides& s, int64_t b, int64_t c) { return b * s.b + c * s.c; }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  // exp(-x) = inf for very negative x gives 0, not NaN.
  if constexpr (std::is_same_v<acc_t, double>) {
    return 1.0 / (1.0 + exp(-x));
  } else {
    return 1.0f / (1.0f + expf(-x));
  }
}

// A thread's (b, c) and its pixels p0 + k * dp, k < steps (those < P).
struct Pos {
  int64_t b, c, p0, dp;
};

__device__ __forceinline__ Pos thread_pos(const Geo& g) {
  Pos t;
  bool valid;
  if (g.cl) {
    t.b = blockIdx.x / g.pchunks;
    t.c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
    t.dp = blockDim.y;
    t.p0 = int64_t(blockIdx.x % g.pchunks) * g.steps * t.dp + threadIdx.y;
    valid = t.c < g.C;
  } else {
    const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
    t.b = row / g.C;
    t.c = row % g.C;
    t.dp = blockDim.x;
    t.p0 = int64_t(blockIdx.y) * g.steps * t.dp + threadIdx.x;
    valid = row < g.B * g.C;
  }
  if (!valid) t.c = 0, t.p0 = g.P;  // no pixels; still takes part in block reductions
  return t;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gate_sum_fwd_kernel(FwdArgs<scalar_t> a, Geo g, const acc_t* scale, const acc_t* shift) {
  const Pos t = thread_pos(g);
  const acc_t sc = scale ? scale[t.c] : acc_t(1), sh = shift ? shift[t.c] : acc_t(0);
  const int64_t ob = base_of(a.os, t.b, t.c);
  for (int64_t k0 = 0; k0 < g.steps; k0 += kUnroll) {
    const int64_t p0 = t.p0 + k0 * t.dp;
    const int64_t n = min(int64_t(kUnroll), g.steps - k0);
    for (int j = 0; j < a.num_outs; ++j) {
      acc_t acc[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t p = p0 + k * t.dp;
        acc[k] = a.res[j] && k < n && p < g.P ? static_cast<acc_t>(a.res[j][ob + p * a.os.p]) : acc_t(0);
      }
      for (int i = a.first[j]; i < a.first[j + 1]; ++i) {
        const scalar_t* f = a.feat[i] + base_of(a.fs[i], t.b, t.c);
        const scalar_t* x = a.gate[i] + base_of(a.gs[i], t.b, t.c);
        const int64_t fsp = a.fs[i].p, gsp = a.gs[i].p;
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          const int64_t p = p0 + k * t.dp;
          if (k < n && p < g.P)
            acc[k] += static_cast<acc_t>(f[p * fsp]) * sigmoid(static_cast<acc_t>(x[p * gsp]) * sc + sh);
        }
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t p = p0 + k * t.dp;
        if (k < n && p < g.P) a.out[j][ob + p * a.os.p] = static_cast<scalar_t>(acc[k]);
      }
    }
  }
}

// Adds v[0..1] over the threads sharing this thread's channel in the block and
// writes the totals to partial[q][slot][c] (q = 0: grad_shift, 1: grad_scale).
template <typename acc_t>
__device__ __forceinline__ void block_channel_sums(acc_t (&v)[2], const Geo& g, acc_t* partial) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t plane = g.slots * g.C;
  if (!g.cl) {
    // NCHW: the bx (a power of two <= 32) lanes of a row share a warp and a channel.
    for (int off = bx / 2; off > 0; off /= 2) {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
      v[1] += __shfl_xor_sync(0xffffffffu, v[1], off);
    }
    const int64_t row = int64_t(blockIdx.x) * by + ty;  // = b * C + c; slot = blockIdx.y * B + b
    if (tx == 0 && row < g.B * g.C) {
      partial[int64_t(blockIdx.y) * g.B * g.C + row] = v[0];
      partial[plane + int64_t(blockIdx.y) * g.B * g.C + row] = v[1];
    }
  } else {
    // NHWC: a column tx shares a channel; a tree over the (power of two) by rows.
    __shared__ acc_t s[2][kThreads];
    const int id = ty * bx + tx;
    s[0][id] = v[0];
    s[1][id] = v[1];
    __syncthreads();
    for (int half = by / 2; half > 0; half /= 2) {
      if (ty < half) {
        s[0][id] += s[0][id + half * bx];
        s[1][id] += s[1][id + half * bx];
      }
      __syncthreads();
    }
    const int64_t c = int64_t(blockIdx.y) * bx + tx;  // slot = blockIdx.x
    if (ty == 0 && c < g.C) {
      partial[int64_t(blockIdx.x) * g.C + c] = s[0][tx];
      partial[plane + int64_t(blockIdx.x) * g.C + c] = s[1][tx];
    }
  }
}

// partial: [2, slots, C], or nullptr when neither scale nor shift is given.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gate_sum_bwd_kernel(BwdArgs<scalar_t> a, Geo g, const acc_t* scale, const acc_t* shift, acc_t* partial) {
  const Pos t = thread_pos(g);
  const acc_t sc = scale ? scale[t.c] : acc_t(1), sh = shift ? shift[t.c] : acc_t(0);
  acc_t sums[2] = {acc_t(0), acc_t(0)};  // d, d * gate
  for (int64_t k0 = 0; k0 < g.steps; k0 += kUnroll) {
    const int64_t p0 = t.p0 + k0 * t.dp;
    const int64_t n = min(int64_t(kUnroll), g.steps - k0);
    for (int i = 0; i < a.num_pairs; ++i) {
      const scalar_t* go = a.gout[i] + base_of(a.os, t.b, t.c);
      const scalar_t* f = a.feat[i] + base_of(a.fs[i], t.b, t.c);
      const scalar_t* x = a.gate[i] + base_of(a.gs[i], t.b, t.c);
      scalar_t* gf = a.gfeat[i] + base_of(a.gfs[i], t.b, t.c);
      scalar_t* gx = a.ggate[i] + base_of(a.ggs[i], t.b, t.c);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        const int64_t p = p0 + k * t.dp;
        if (k < n && p < g.P) {
          const acc_t gv = static_cast<acc_t>(go[p * a.os.p]);
          const acc_t xv = static_cast<acc_t>(x[p * a.gs[i].p]);
          const acc_t s = sigmoid(xv * sc + sh);
          const acc_t d = gv * static_cast<acc_t>(f[p * a.fs[i].p]) * s * (acc_t(1) - s);
          gf[p * a.gfs[i].p] = static_cast<scalar_t>(gv * s);
          gx[p * a.ggs[i].p] = static_cast<scalar_t>(d * sc);
          sums[0] += d;
          sums[1] += d * xv;
        }
      }
    }
  }
  if (partial != nullptr) block_channel_sums(sums, g, partial);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int next_pow2(int64_t v) {
  int r = 1;
  while (r < v) r *= 2;
  return r;
}

// H and W merged: the pixel stride.
Strides strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.size(3) > 1 ? x.stride(3) : x.stride(2)};
}

// x itself when its H and W merge into one pixel axis, else a copy (mirrors
// readable() in mtl_kernels/ops/gate_sum.py, which sends only such layouts).
std::vector<at::Tensor> readable(at::TensorList xs) {
  std::vector<at::Tensor> out;
  for (const auto& x : xs) {
    const bool merges = x.size(2) == 1 || x.size(3) == 1 || x.stride(2) == x.size(3) * x.stride(3);
    out.push_back(merges ? x : x.contiguous());
  }
  return out;
}

struct Launch {
  Geo geo;
  dim3 grid, block;
};

// Blocks over a [B, C, H, W] tensor iterated in `fmt` (see the top comment).
Launch plan(const at::Tensor& x, at::MemoryFormat fmt) {
  Launch l;
  Geo& g = l.geo;
  g.B = x.size(0), g.C = x.size(1), g.P = x.size(2) * x.size(3);
  g.cl = fmt == at::MemoryFormat::ChannelsLast;
  const int bx = (g.cl ? g.C : g.P) >= 32 ? 32 : next_pow2(g.cl ? g.C : g.P);
  const int by = kThreads / bx;
  const int64_t dp = g.cl ? by : bx;
  g.steps = std::min<int64_t>(kUnroll, ceil_div(g.P, dp));
  int64_t gx, gy;
  if (g.cl) {
    g.pchunks = ceil_div(g.P, dp * g.steps);
    gx = g.B * g.pchunks, gy = ceil_div(g.C, bx);
    g.slots = gx;
  } else {
    g.steps = std::max(g.steps, ceil_div(g.P, dp * kMaxGridY));  // keeps gy in range
    g.pchunks = 0;
    gx = ceil_div(g.B * g.C, by), gy = ceil_div(g.P, dp * g.steps);
    g.slots = gy * g.B;
  }
  TORCH_CHECK(gx <= INT_MAX && gy <= kMaxGridY, "gate_sum: a tensor of shape ", x.sizes(),
              " is too large for the cuda backend");
  l.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  l.block = dim3(bx, by);
  return l;
}

void check_like(const at::Tensor& x, const at::Tensor& f0, const char* name, size_t i) {
  TORCH_CHECK(x.sizes() == f0.sizes(), "gate_sum: ", name, "[", i, "] has shape ", x.sizes(), ", expected ",
              f0.sizes());
  TORCH_CHECK(x.scalar_type() == f0.scalar_type(), "gate_sum: ", name, "[", i, "] has dtype ", x.scalar_type(),
              ", expected ", f0.scalar_type());
  TORCH_CHECK(x.device() == f0.device(), "gate_sum: ", name, "[", i, "] is on ", x.device(), ", expected ",
              f0.device());
}

void check_args(at::TensorList feats, at::TensorList gates, at::IntArrayRef targets, int64_t num_outputs,
                const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(!feats.empty(), "gate_sum: feats must hold at least one tensor");
  TORCH_CHECK(gates.size() == feats.size() && targets.size() == feats.size(),
              "gate_sum: feats, gates and targets must have the same length, got ", feats.size(), ", ",
              gates.size(), ", ", targets.size());
  const at::Tensor& f0 = feats[0];
  TORCH_CHECK(f0.dim() == 4, "gate_sum: feats[0] must be 4-D [B, C, H, W], got ", f0.sizes());
  TORCH_CHECK(f0.is_cuda(), "gate_sum: the cuda kernels need cuda tensors, got ", f0.device());
  const auto dt = f0.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              "gate_sum: feats must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(num_outputs >= 1, "gate_sum: num_outputs must be at least 1, got ", num_outputs);
  for (size_t i = 0; i < feats.size(); ++i) {
    check_like(feats[i], f0, "feats", i);
    check_like(gates[i], f0, "gates", i);
    TORCH_CHECK(0 <= targets[i] && targets[i] < num_outputs, "gate_sum: targets[", i, "] = ", targets[i],
                " is not an output index in [0, ", num_outputs, ")");
  }
  for (const auto* v : {&scale, &shift}) {
    if (!v->has_value()) continue;
    const at::Tensor& t = **v;
    const char* name = v == &scale ? "scale" : "shift";
    TORCH_CHECK(t.dim() == 1 && t.size(0) == f0.size(1), "gate_sum: ", name, " must have shape [C] = [",
                f0.size(1), "], got ", t.sizes());
    TORCH_CHECK(t.device() == f0.device(), "gate_sum: ", name, " is on ", t.device(), ", expected ", f0.device());
    TORCH_CHECK(t.scalar_type() == dt || t.scalar_type() == at::kFloat, "gate_sum: ", name,
                " must have the features' dtype (", dt, ") or float32, got ", t.scalar_type());
  }
}

// scale / shift in the accumulation type (a tiny [C] copy), or undefined.
at::Tensor acc_vector(const std::optional<at::Tensor>& v, at::ScalarType acc) {
  return v.has_value() ? v->to(acc).contiguous() : at::Tensor();
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

std::vector<at::Tensor> gate_sum_cuda(at::TensorList residuals_in, at::TensorList feats_in, at::TensorList gates_in,
                                      at::IntArrayRef targets, int64_t num_outputs,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift) {
  check_args(feats_in, gates_in, targets, num_outputs, scale, shift);
  const at::Tensor& f0 = feats_in[0];
  TORCH_CHECK(residuals_in.empty() || static_cast<int64_t>(residuals_in.size()) == num_outputs,
              "gate_sum: residuals must hold num_outputs=", num_outputs, " tensors or none, got ",
              residuals_in.size());
  for (size_t t = 0; t < residuals_in.size(); ++t) check_like(residuals_in[t], f0, "residuals", t);
  const at::cuda::OptionalCUDAGuard guard(f0.device());

  const at::MemoryFormat fmt = dense_format(residuals_in.empty() ? f0 : residuals_in[0]);
  const std::vector<at::Tensor> residuals = in_format(residuals_in, fmt);
  std::vector<at::Tensor> outs;
  for (int64_t t = 0; t < num_outputs; ++t) outs.push_back(at::empty(f0.sizes(), f0.options().memory_format(fmt)));
  if (f0.numel() == 0) return outs;

  const std::vector<at::Tensor> feats = readable(feats_in), gates = readable(gates_in);
  const auto acc_type = at::toOpMathType(f0.scalar_type());
  const at::Tensor sc = acc_vector(scale, acc_type), sh = acc_vector(shift, acc_type);
  const Launch l = plan(f0, fmt);

  // Segments (output, up to kMaxPairs of its pairs), packed in order into
  // launches of at most kMaxOuts segments and kMaxPairs pairs. An output with
  // more pairs continues in later launches, reading its partial result back.
  struct Segment {
    int64_t t;
    std::vector<int64_t> pairs;
    bool cont;
  };
  std::vector<Segment> segs;
  for (int64_t t = 0; t < num_outputs; ++t) {
    std::vector<int64_t> mine;
    for (size_t i = 0; i < targets.size(); ++i)
      if (targets[i] == t) mine.push_back(static_cast<int64_t>(i));
    size_t k = 0;
    do {
      const size_t end = std::min(mine.size(), k + kMaxPairs);
      segs.push_back({t, std::vector<int64_t>(mine.begin() + k, mine.begin() + end), k > 0});
      k = end;
    } while (k < mine.size());
  }
  std::vector<std::vector<const Segment*>> launches(1);
  int pairs_in_launch = 0;
  for (const auto& s : segs) {
    if (launches.back().size() == static_cast<size_t>(kMaxOuts) || s.cont ||
        pairs_in_launch + static_cast<int>(s.pairs.size()) > kMaxPairs) {
      if (!launches.back().empty()) launches.emplace_back();
      pairs_in_launch = 0;
    }
    launches.back().push_back(&s);
    pairs_in_launch += static_cast<int>(s.pairs.size());
  }

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gate_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const auto& launch : launches) {
      FwdArgs<scalar_t> a;
      a.num_outs = static_cast<int>(launch.size());
      a.os = strides_of(outs[0]);
      int np = 0;
      for (int j = 0; j < a.num_outs; ++j) {
        const Segment& s = *launch[j];
        a.out[j] = outs[s.t].mutable_data_ptr<scalar_t>();
        a.res[j] = s.cont ? a.out[j] : residuals.empty() ? nullptr : residuals[s.t].const_data_ptr<scalar_t>();
        a.first[j] = np;
        for (int64_t i : s.pairs) {
          a.feat[np] = feats[i].const_data_ptr<scalar_t>();
          a.gate[np] = gates[i].const_data_ptr<scalar_t>();
          a.fs[np] = strides_of(feats[i]);
          a.gs[np] = strides_of(gates[i]);
          ++np;
        }
      }
      a.first[a.num_outs] = np;
      gate_sum_fwd_kernel<scalar_t, acc_t>
          <<<l.grid, l.block, 0, stream>>>(a, l.geo, ptr_or_null<acc_t>(sc), ptr_or_null<acc_t>(sh));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return outs;
}

// Writes grad_feats and grad_gates (allocated by the caller, any layout whose
// H and W merge) and returns (grad_scale, grad_shift).
std::tuple<at::Tensor, at::Tensor> gate_sum_backward_into(at::TensorList grad_outs_in, at::TensorList feats_in,
                                                          at::TensorList gates_in, at::IntArrayRef targets,
                                                          const std::optional<at::Tensor>& scale,
                                                          const std::optional<at::Tensor>& shift,
                                                          at::TensorList grad_feats, at::TensorList grad_gates) {
  TORCH_CHECK(!grad_outs_in.empty(), "gate_sum_backward: grad_outs must hold at least one tensor");
  check_args(feats_in, gates_in, targets, static_cast<int64_t>(grad_outs_in.size()), scale, shift);
  const at::Tensor& f0 = feats_in[0];
  for (size_t t = 0; t < grad_outs_in.size(); ++t) check_like(grad_outs_in[t], f0, "grad_outs", t);
  const at::cuda::OptionalCUDAGuard guard(f0.device());

  // walk the features' layout: they and their gradients are 4 of the 5 streams
  const at::MemoryFormat fmt = dense_format(f0);
  const std::vector<at::Tensor> grad_outs = in_format(grad_outs_in, fmt);
  auto none = [&] { return at::empty({0}, f0.options().dtype(at::kFloat)); };
  const bool sums = scale.has_value() || shift.has_value();
  if (f0.numel() == 0) {
    auto zeros = [&](const std::optional<at::Tensor>& v) { return v ? at::zeros({f0.size(1)}, v->options()) : none(); };
    return {zeros(scale), zeros(shift)};
  }

  const std::vector<at::Tensor> feats = readable(feats_in), gates = readable(gates_in);
  const auto acc_type = at::toOpMathType(f0.scalar_type());
  const at::Tensor sc = acc_vector(scale, acc_type), sh = acc_vector(shift, acc_type);
  const Launch l = plan(f0, fmt);
  const int64_t N = static_cast<int64_t>(feats.size());
  const int64_t num_launches = ceil_div(N, kMaxPairs);
  // [launch, (d, d * gate), slot, C]
  const at::Tensor partial =
      sums ? at::empty({num_launches, 2, l.geo.slots, l.geo.C}, f0.options().dtype(acc_type)) : at::Tensor();

  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(), "gate_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t k = 0; k < num_launches; ++k) {
      BwdArgs<scalar_t> a;
      a.num_pairs = static_cast<int>(std::min<int64_t>(kMaxPairs, N - k * kMaxPairs));
      a.os = strides_of(grad_outs[0]);
      for (int j = 0; j < a.num_pairs; ++j) {
        const int64_t i = k * kMaxPairs + j;
        a.gout[j] = grad_outs[targets[i]].const_data_ptr<scalar_t>();
        a.feat[j] = feats[i].const_data_ptr<scalar_t>();
        a.gate[j] = gates[i].const_data_ptr<scalar_t>();
        a.gfeat[j] = grad_feats[i].mutable_data_ptr<scalar_t>();
        a.ggate[j] = grad_gates[i].mutable_data_ptr<scalar_t>();
        a.fs[j] = strides_of(feats[i]);
        a.gs[j] = strides_of(gates[i]);
        a.gfs[j] = strides_of(grad_feats[i]);
        a.ggs[j] = strides_of(grad_gates[i]);
      }
      acc_t* part = sums ? partial.mutable_data_ptr<acc_t>() + k * 2 * l.geo.slots * l.geo.C : nullptr;
      gate_sum_bwd_kernel<scalar_t, acc_t>
          <<<l.grid, l.block, 0, stream>>>(a, l.geo, ptr_or_null<acc_t>(sc), ptr_or_null<acc_t>(sh), part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // Each total reduced on its own, so the two results never share storage.
  auto total = [&](const std::optional<at::Tensor>& v, int64_t q) {
    return v ? at::sum(partial.select(1, q), at::IntArrayRef{0, 1}).to(v->scalar_type()) : none();
  };
  return {total(scale, 1), total(shift, 0)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> gate_sum_backward_cuda(
    at::TensorList grad_outs, at::TensorList feats, at::TensorList gates, at::IntArrayRef targets,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(!feats.empty(), "gate_sum_backward: feats must hold at least one tensor");
  const at::Tensor& f0 = feats[0];
  std::vector<at::Tensor> grad_feats, grad_gates;
  for (size_t i = 0; i < feats.size(); ++i) {
    grad_feats.push_back(at::empty(f0.sizes(), f0.options().memory_format(dense_format(feats[i]))));
    grad_gates.push_back(at::empty(f0.sizes(), f0.options().memory_format(dense_format(gates[i]))));
  }
  auto [grad_scale, grad_shift] =
      gate_sum_backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates);
  return {grad_feats, grad_gates, grad_scale, grad_shift};
}

std::tuple<at::Tensor, at::Tensor> gate_sum_backward_out_cuda(at::TensorList grad_outs, at::TensorList feats,
                                                              at::TensorList gates, at::IntArrayRef targets,
                                                              const std::optional<at::Tensor>& scale,
                                                              const std::optional<at::Tensor>& shift,
                                                              at::TensorList grad_feats,
                                                              at::TensorList grad_gates) {
  TORCH_CHECK(!feats.empty(), "gate_sum_backward_out: feats must hold at least one tensor");
  TORCH_CHECK(grad_feats.size() == feats.size() && grad_gates.size() == feats.size(),
              "gate_sum_backward_out: grad_feats and grad_gates must hold one tensor per pair (", feats.size(),
              "), got ", grad_feats.size(), " and ", grad_gates.size());
  for (size_t i = 0; i < feats.size(); ++i)
    for (const auto* g : {&grad_feats[i], &grad_gates[i]}) {
      check_like(*g, feats[0], "grad_feats/grad_gates", i);
      TORCH_CHECK(g->size(2) == 1 || g->size(3) == 1 || g->stride(2) == g->size(3) * g->stride(3),
                  "gate_sum_backward_out: grad_feats/grad_gates[", i, "] must have H and W mergeable into one");
    }
  return gate_sum_backward_into(grad_outs, feats, gates, targets, scale, shift, grad_feats, grad_gates);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("gate_sum", &gate_sum_cuda);
  m.impl("gate_sum_backward", &gate_sum_backward_cuda);
  m.impl("gate_sum_backward_out", &gate_sum_backward_out_cuda);
}

}  // namespace mtl_kernels
