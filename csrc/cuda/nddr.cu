// CUDA kernels of the NDDR fusion op: the memory-bound part around the
// convolution GEMMs, which common/nddr.h composes (its header comment gives the
// contract of each of the five kernels below). Every kernel is one pass over z
// (or dz), [B, T*C, H, W], and the T task tensors, [B, C, H, W], in place.
//
// All five share one driver kernel (nddr_kernel) and differ only in an "op"
// struct: what to load per vector, what to compute and store, and, for the two
// reductions (channel_stats, relu_sums), what to accumulate per channel. The
// driver walks the data in one of two ways (as the cross-stitch kernels do):
//  * "rows"    NCHW with at least kMinRowPixels pixels per row. Row b*TC + k of
//              z holds the P pixels of one channel k = t*C + c, so every thread
//              stays on one row: it picks its task pointer and reads its
//              channel's scalars once, then walks the row in 16-byte vectors.
//              Block = (bx, by): by rows of bx >= 32 threads (a warp never spans
//              two rows), blockIdx.x = row group * nchunk + chunk of the row.
//  * "columns" channels_last, and NCHW with short rows: z seen as N rows of
//              Q = TC*S contiguous columns, column q in channel q / S:
//                channels_last: N = B*P, S = 1
//                NCHW:          N = B,   S = P
//              A thread owns one column vector (so its task and its VEC
//              channels' scalars are fixed, read once into registers) and
//              walks down the rows; consecutive threads read consecutive
//              vectors, so loads are coalesced. Block = (bx, by): bx column
//              vectors by by row lanes, blockIdx.x = column group * nchunk +
//              chunk of rows.
// The task tensors are addressed like z with T*C replaced by C: a z row of the
// columns walk holds the same row of all T task tensors one after the other.
//
// The reductions are deterministic: no atomics. Each block reduces its threads
// in a fixed order and writes its own slot of a partial buffer, which at::sum
// (or, for the statistics, a few fixed-order ATen ops) then reduces.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/nddr.h"
#include "cuda/pack.cuh"

namespace mtl_kernels {
namespace {

constexpr int kThreads = 256;  // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTasks = 16;           // task pointers a kernel argument holds
constexpr int64_t kMinRowPixels = 32;   // shorter NCHW rows would idle most of a warp

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// The T task tensors' data pointers, passed by value (kernel parameter space),
// so no device-side pointer table is needed.
template <typename T>
struct TaskPtrs {
  T* p[kMaxTasks];
};

// p[t] with constant indices only: a runtime index into a kernel parameter
// array would make the compiler copy the whole array to local memory. Done
// once per thread, as a thread never changes task.
template <typename T>
__device__ __forceinline__ T* pick(const TaskPtrs<T>& ps, int t) {
  T* r = ps.p[0];
#pragma unroll
  for (int j = 1; j < kMaxTasks; ++j)
    if (t == j) r = ps.p[j];
  return r;
}

// Per-channel accumulators of the reductions. Plain aggregates (zeroed by {}),
// so they can live in shared memory; fields are shuffled and stored generically.
struct NoAcc {};

template <typename acc_t>
struct SumAcc {  // two plain sums
  static constexpr int kFields = 2;
  acc_t s[kFields];
  __device__ __forceinline__ void merge(const SumAcc& o) {
    s[0] += o.s[0];
    s[1] += o.s[1];
  }
};

template <typename acc_t>
struct WelfordAcc {  // count, mean, sum of squared deviations from the mean
  static constexpr int kFields = 3;
  acc_t s[kFields];
  // Chan et al.'s pairwise update; either side may be empty.
  __device__ __forceinline__ void merge(const WelfordAcc& o) {
    if (o.s[0] == acc_t(0)) return;
    const acc_t n = s[0] + o.s[0], f = o.s[0] / n, d = o.s[1] - s[1];
    s[1] += d * f;
    s[2] += o.s[2] + d * d * s[0] * f;
    s[0] = n;
  }
};

template <typename Acc>
__device__ __forceinline__ Acc shfl_down(const Acc& a, int offset) {
  Acc r;
#pragma unroll
  for (int f = 0; f < Acc::kFields; ++f) r.s[f] = __shfl_down_sync(0xffffffffu, a.s[f], offset);
  return r;
}

// ---------------------------------------------------------------------------
// Walks
// ---------------------------------------------------------------------------

// What a launch covers, in vectors of VEC elements (see the file comment).
struct Grid {
  int64_t rows;       // rows: B*TC rows of z; columns: N rows
  int64_t row_vecs;   // vectors per z row: P/VEC (rows), TC*S/VEC (columns)
  int64_t task_vecs;  // columns: vectors per task-tensor row, C*S/VEC
  int64_t TC, C, S;   // S: columns only, consecutive elements of one channel in a z row
  int64_t chunk;      // rows: vectors per chunk of a row; columns: rows per chunk
  int64_t nchunk;
};

// One thread's share: `steps` vectors at z (or dz) index z0 + j * zstep and
// task-tensor index y0 + j * ystep, all in task t.
struct Walk {
  int64_t line;   // rows: z row b*TC + k; columns: column vector (may be out of range)
  int64_t chunk;
  int t;
  int64_t k0;     // rows: the channel; columns: the element column of lane 0
  int64_t z0, zstep, y0, ystep, steps;
};

template <bool ROWS, int VEC>
__device__ __forceinline__ Walk make_walk(const Grid& g) {
  Walk w;
  const int64_t bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t group = blockIdx.x / g.nchunk;
  w.chunk = blockIdx.x - group * g.nchunk;
  if constexpr (ROWS) {
    w.line = group * by + ty;
    // Idle threads (past the last row) take the last row's geometry with no
    // steps: their pointers and scalars stay in range, and they still join
    // the block reduction.
    const int64_t row = min(w.line, g.rows - 1);
    const int64_t b = row / g.TC, k = row - b * g.TC;
    w.t = static_cast<int>(k / g.C);
    const int64_t c = k - w.t * g.C;
    w.k0 = k;
    const int64_t begin = w.chunk * g.chunk + tx, end = min(g.row_vecs, (w.chunk + 1) * g.chunk);
    w.steps = (w.line < g.rows && begin < end) ? ceil_div(end - begin, bx) : 0;
    w.z0 = row * g.row_vecs + begin;
    w.y0 = (b * g.C + c) * g.row_vecs + begin;
    w.zstep = w.ystep = bx;
  } else {
    w.line = group * bx + tx;
    const int64_t q = min(w.line, g.row_vecs - 1);
    w.t = static_cast<int>(q / g.task_vecs);
    w.k0 = q * VEC;
    const int64_t begin = w.chunk * g.chunk + ty, end = min(g.rows, (w.chunk + 1) * g.chunk);
    w.steps = (w.line < g.row_vecs && begin < end) ? ceil_div(end - begin, by) : 0;
    w.z0 = begin * g.row_vecs + q;
    w.y0 = begin * g.task_vecs + (q - w.t * g.task_vecs);
    w.zstep = by * g.row_vecs;
    w.ystep = by * g.task_vecs;
  }
  return w;
}

// ---------------------------------------------------------------------------
// Ops. Each has: kVec, kUnroll (vectors loaded before any is used, to keep
// enough loads in flight), kReduce, Acc, a per-thread State set up by init()
// from the thread's task and its lanes' channels, an In loaded by load(), and
// apply(), which consumes one loaded vector (step j of the thread's walk).
// ---------------------------------------------------------------------------

template <typename scalar_t, int VEC>
struct ChannelStatsOp {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  using Acc = WelfordAcc<acc_t>;
  static constexpr int kVec = VEC, kUnroll = 4;
  static constexpr bool kReduce = true;
  const scalar_t* z;

  struct State {};
  struct In {
    PackT z;
  };
  __device__ void init(State&, int, const int64_t (&)[VEC]) const {}
  __device__ In load(const State&, int64_t zi, int64_t) const { return {load_pack<VEC>(z, zi)}; }
  // Welford per lane; all lanes have seen j values so far, so they share 1/n.
  __device__ void apply(const State&, const In& in, int64_t, int64_t, int64_t j, Acc (&acc)[VEC]) const {
    const acc_t n = static_cast<acc_t>(j + 1), inv = acc_t(1) / n;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t x = static_cast<acc_t>(in.z.v[i]);
      const acc_t d = x - acc[i].s[1];
      acc[i].s[0] = n;
      acc[i].s[1] += d * inv;
      acc[i].s[2] += d * (x - acc[i].s[1]);
    }
  }
};

template <typename scalar_t, int VEC>
struct AffineReluOp {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  using Acc = NoAcc;
  static constexpr int kVec = VEC, kUnroll = 4;
  static constexpr bool kReduce = false;
  const scalar_t* z;
  TaskPtrs<scalar_t> ys;
  const acc_t* scale;
  const acc_t* shift;

  struct State {
    scalar_t* y;
    acc_t sc[VEC], sh[VEC];
  };
  struct In {
    PackT z;
  };
  __device__ void init(State& st, int t, const int64_t (&k)[VEC]) const {
    st.y = pick(ys, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) st.sc[i] = scale[k[i]], st.sh[i] = shift[k[i]];
  }
  __device__ In load(const State&, int64_t zi, int64_t) const { return {load_pack<VEC>(z, zi)}; }
  __device__ void apply(const State& st, const In& in, int64_t, int64_t yi, int64_t, Acc (&)[VEC]) const {
    PackT out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t v = static_cast<acc_t>(in.z.v[i]) * st.sc[i] + st.sh[i];
      out.v[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);  // NaN stays NaN, as F.relu
    }
    store_pack<VEC>(st.y, yi, out);
  }
};

// dy' = 0 where the forward's z * scale + shift <= 0, else dy (NaN passes dy, as
// F.relu's backward; a select, so an
// inf/NaN gradient under a closed mask gives 0, as in the reference). The mask
// is computed by the same expression as in AffineReluOp, so it matches ys.
template <typename acc_t>
__device__ __forceinline__ acc_t masked(acc_t g, acc_t z, acc_t scale, acc_t shift) {
  return z * scale + shift <= acc_t(0) ? acc_t(0) : g;
}

template <typename scalar_t, int VEC>
struct ReluSumsOp {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  using Acc = SumAcc<acc_t>;
  static constexpr int kVec = VEC, kUnroll = 2;
  static constexpr bool kReduce = true;
  const scalar_t* z;
  TaskPtrs<const scalar_t> gys;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;

  struct State {
    const scalar_t* gy;
    acc_t sc[VEC], sh[VEC], mu[VEC];
  };
  struct In {
    PackT z, g;
  };
  __device__ void init(State& st, int t, const int64_t (&k)[VEC]) const {
    st.gy = pick(gys, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) st.sc[i] = scale[k[i]], st.sh[i] = shift[k[i]], st.mu[i] = mean[k[i]];
  }
  __device__ In load(const State& st, int64_t zi, int64_t yi) const {
    return {load_pack<VEC>(z, zi), load_pack<VEC>(st.gy, yi)};
  }
  __device__ void apply(const State& st, const In& in, int64_t, int64_t, int64_t, Acc (&acc)[VEC]) const {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t x = static_cast<acc_t>(in.z.v[i]);
      const acc_t d = masked(static_cast<acc_t>(in.g.v[i]), x, st.sc[i], st.sh[i]);
      acc[i].s[0] += d;
      acc[i].s[1] += d * (x - st.mu[i]);
    }
  }
};

template <typename scalar_t, int VEC>
struct BnReluGradOp {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  using Acc = NoAcc;
  static constexpr int kVec = VEC, kUnroll = 2;
  static constexpr bool kReduce = false;
  const scalar_t* z;
  scalar_t* dz;
  TaskPtrs<const scalar_t> gys;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* a;
  const acc_t* b;

  struct State {
    const scalar_t* gy;
    acc_t sc[VEC], sh[VEC], a[VEC], b[VEC];
  };
  struct In {
    PackT z, g;
  };
  __device__ void init(State& st, int t, const int64_t (&k)[VEC]) const {
    st.gy = pick(gys, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) st.sc[i] = scale[k[i]], st.sh[i] = shift[k[i]], st.a[i] = a[k[i]], st.b[i] = b[k[i]];
  }
  __device__ In load(const State& st, int64_t zi, int64_t yi) const {
    return {load_pack<VEC>(z, zi), load_pack<VEC>(st.gy, yi)};
  }
  __device__ void apply(const State& st, const In& in, int64_t zi, int64_t, int64_t, Acc (&)[VEC]) const {
    PackT out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t x = static_cast<acc_t>(in.z.v[i]);
      const acc_t d = masked(static_cast<acc_t>(in.g.v[i]), x, st.sc[i], st.sh[i]);
      out.v[i] = static_cast<scalar_t>(d * st.sc[i] + x * st.a[i] + st.b[i]);
    }
    store_pack<VEC>(dz, zi, out);
  }
};

template <typename scalar_t, int VEC>
struct ReluGradOp {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  using Acc = NoAcc;
  static constexpr int kVec = VEC, kUnroll = 2;
  static constexpr bool kReduce = false;
  scalar_t* dz;
  TaskPtrs<const scalar_t> gys, ys;

  struct State {
    const scalar_t *gy, *y;
  };
  struct In {
    PackT g, y;
  };
  __device__ void init(State& st, int t, const int64_t (&)[VEC]) const {
    st.gy = pick(gys, t);
    st.y = pick(ys, t);
  }
  __device__ In load(const State& st, int64_t, int64_t yi) const {
    return {load_pack<VEC>(st.gy, yi), load_pack<VEC>(st.y, yi)};
  }
  __device__ void apply(const State&, const In& in, int64_t zi, int64_t, int64_t, Acc (&)[VEC]) const {
    PackT out;
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      out.v[i] = static_cast<acc_t>(in.y.v[i]) <= acc_t(0) ? static_cast<scalar_t>(0) : in.g.v[i];
    store_pack<VEC>(dz, zi, out);
  }
};

// ---------------------------------------------------------------------------
// Block reductions, fixed order. The partial buffer is laid out so the caller
// sees it as [X, TC, Y, kFields] and reduces dims 0 and 2:
//   rows:    [B, TC, nchunk] (slot (row, chunk) per block row)
//   columns: [nchunk, TC, S] (slot (chunk, element column) per block column)
// ---------------------------------------------------------------------------

// Rows walk: every lane of a thread is in the thread's channel; the bx threads
// of a row (whole warps) reduce through shuffles, then shared memory.
template <typename Acc, int VEC, typename acc_t>
__device__ __forceinline__ void reduce_rows(Acc (&acc)[VEC], const Walk& w, const Grid& g, acc_t* partial) {
  __shared__ Acc s_warp[kWarps];
#pragma unroll
  for (int i = 1; i < VEC; ++i) acc[0].merge(acc[i]);
  Acc r = acc[0];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) r.merge(shfl_down(r, off));
  const int wpr = blockDim.x / 32;  // warps per row
  const int warp = threadIdx.y * wpr + threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) s_warp[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0 && w.line < g.rows) {
    Acc tot = s_warp[threadIdx.y * wpr];
    for (int v = 1; v < wpr; ++v) tot.merge(s_warp[threadIdx.y * wpr + v]);
    acc_t* out = partial + (w.line * g.nchunk + w.chunk) * Acc::kFields;
#pragma unroll
    for (int f = 0; f < Acc::kFields; ++f) out[f] = tot.s[f];
  }
}

// Columns walk: each lane is its own element column; the by row lanes of a
// column reduce through shared memory, one lane index at a time.
template <typename Acc, int VEC, typename acc_t>
__device__ __forceinline__ void reduce_columns(Acc (&acc)[VEC], const Walk& w, const Grid& g, acc_t* partial) {
  __shared__ Acc s_acc[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_acc[tid] = acc[i];
    __syncthreads();
    if (threadIdx.y == 0 && w.line < g.row_vecs) {
      Acc tot = s_acc[threadIdx.x];
      for (int y = 1; y < static_cast<int>(blockDim.y); ++y) tot.merge(s_acc[y * blockDim.x + threadIdx.x]);
      acc_t* out = partial + ((w.chunk * g.row_vecs + w.line) * VEC + i) * Acc::kFields;
#pragma unroll
      for (int f = 0; f < Acc::kFields; ++f) out[f] = tot.s[f];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------
template <class Op, bool ROWS>
__global__ void __launch_bounds__(kThreads)
    nddr_kernel(const Op op, const Grid g, typename Op::acc_t* __restrict__ partial) {
  constexpr int VEC = Op::kVec, U = Op::kUnroll;
  const Walk w = make_walk<ROWS, VEC>(g);
  int64_t k[VEC];  // each lane's channel
#pragma unroll
  for (int i = 0; i < VEC; ++i) k[i] = ROWS ? w.k0 : (w.k0 + i) / g.S;
  typename Op::State st;
  op.init(st, w.t, k);
  typename Op::Acc acc[VEC] = {};

  for (int64_t j = 0; j < w.steps; j += U) {
    // All loads of the iteration first, so they are in flight together.
    typename Op::In in[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (j + u < w.steps) in[u] = op.load(st, w.z0 + (j + u) * w.zstep, w.y0 + (j + u) * w.ystep);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (j + u < w.steps) op.apply(st, in[u], w.z0 + (j + u) * w.zstep, w.y0 + (j + u) * w.ystep, j + u, acc);
  }

  if constexpr (Op::kReduce) {
    if constexpr (ROWS) reduce_rows(acc, w, g, partial);
    else reduce_columns(acc, w, g, partial);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// z's sizes, T and layout.
struct Shape {
  bool channels_last;
  int64_t B, T, C, P, TC;
  bool rows() const { return !channels_last && P >= kMinRowPixels; }
};

Shape shape_of(const at::Tensor& z, int64_t T) {
  Shape s;
  // Both formats at once (C == 1 or H*W == 1, say): NCHW, as dense_format says.
  s.channels_last = z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous();
  s.B = z.size(0);
  s.T = T;
  s.TC = z.size(1);
  s.C = s.TC / T;
  s.P = z.size(2) * z.size(3);
  return s;
}

void check_tasks(int64_t T) {
  TORCH_CHECK(T >= 1 && T <= kMaxTasks, "nddr: the cuda backend supports 1 to ", kMaxTasks, " tasks, got ", T,
              "; use backend='reference' for more");
}

// Loop iterations per block: enough blocks for several waves on the GPU, yet at
// least min_iters (to amortise the per-thread setup and the block reduction)
// and at most max_iters (so large inputs split into many blocks, keeping the
// last wave short), never more than the whole row/column.
int64_t iters_per_chunk(int64_t iters, int64_t groups, int64_t min_iters, int64_t max_iters) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per = std::clamp(ceil_div(iters * groups, sms * 32), min_iters, max_iters);
  return std::max<int64_t>(1, std::min(per, iters));
}

struct Plan {
  Grid g;
  bool rows;
  int bx, by;
  int64_t blocks;
  int64_t X, Y;  // the partial buffer is [X, TC, Y, fields]
};

Plan make_plan(const Shape& s, int vec, int unroll, bool reduce) {
  Plan pl;
  Grid& g = pl.g;
  g.TC = s.TC;
  g.C = s.C;
  pl.rows = s.rows();
  // Reductions take longer chunks: fewer partial sums to write and reduce.
  const int64_t min_iters = reduce ? 4 : 1, max_iters = reduce ? 64 : 16;
  if (pl.rows) {
    g.rows = s.B * s.TC;
    g.row_vecs = s.P / vec;
    g.task_vecs = 0;
    g.S = s.P;
    pl.bx = static_cast<int>(std::clamp<int64_t>(next_pow2(ceil_div(g.row_vecs, unroll)), 32, kThreads));
    pl.by = kThreads / pl.bx;
    const int64_t groups = ceil_div(g.rows, pl.by), per_iter = int64_t(pl.bx) * unroll;
    g.chunk = iters_per_chunk(ceil_div(g.row_vecs, per_iter), groups, min_iters, max_iters) * per_iter;
    g.nchunk = ceil_div(g.row_vecs, g.chunk);
    pl.blocks = groups * g.nchunk;
    pl.X = s.B;
    pl.Y = g.nchunk;
  } else {
    g.S = s.channels_last ? 1 : s.P;
    g.rows = s.channels_last ? s.B * s.P : s.B;
    g.row_vecs = s.TC * g.S / vec;
    g.task_vecs = s.C * g.S / vec;
    // A block spans whole z rows where they fit (no idle threads, one contiguous
    // run of memory); wider rows are split into equal groups of whole warps.
    if (g.row_vecs <= kThreads) {
      pl.bx = static_cast<int>(g.row_vecs);
    } else {
      const int64_t ngroups = ceil_div(g.row_vecs, kThreads);
      pl.bx = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(ceil_div(g.row_vecs, ngroups), 32) * 32));
    }
    pl.by = kThreads / pl.bx;
    const int64_t groups = ceil_div(g.row_vecs, pl.bx), per_iter = int64_t(pl.by) * unroll;
    g.chunk = iters_per_chunk(ceil_div(g.rows, per_iter), groups, min_iters, max_iters) * per_iter;
    g.nchunk = ceil_div(g.rows, g.chunk);
    pl.blocks = groups * g.nchunk;
    pl.X = g.nchunk;
    pl.Y = g.S;
  }
  TORCH_CHECK(pl.blocks <= INT_MAX, "nddr: input too large for the cuda backend");
  return pl;
}

// Whether every tensor can be read in vectors of `vec` elements: vectors must
// not straddle a row (rows walk) or a task (columns walk), and every base
// pointer must be aligned. Rows also need enough vectors to keep a warp busy.
bool can_vectorise(const Shape& s, int vec, size_t elem_size, const std::vector<const void*>& ptrs) {
  if (vec == 1) return false;
  if (s.rows()) {
    if (s.P % vec != 0 || s.P / vec < 32) return false;
  } else if ((s.C * (s.channels_last ? 1 : s.P)) % vec != 0) {
    return false;
  }
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % (vec * elem_size) != 0) return false;
  return true;
}

template <typename T>
TaskPtrs<T> task_ptrs(const std::vector<at::Tensor>& ts) {
  TaskPtrs<T> p{};
  for (size_t j = 0; j < ts.size(); ++j) {
    if constexpr (std::is_const_v<T>) p.p[j] = ts[j].const_data_ptr<std::remove_const_t<T>>();
    else p.p[j] = ts[j].mutable_data_ptr<T>();
  }
  return p;
}

void add_ptrs(std::vector<const void*>& out, const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) out.push_back(t.const_data_ptr());
}

// Runs OpT<scalar_t, VEC> over the shape, vectorised when `ptrs` allow it;
// fill(op) sets the op's pointers. Returns a reducing op's partial buffer as
// [X, TC, Y, fields], else an undefined tensor.
template <template <typename, int> class OpT, typename scalar_t, typename Fill>
at::Tensor run(const Shape& s, const std::vector<const void*>& ptrs, const at::TensorOptions& acc_opts,
               const Fill& fill) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  auto go = [&](auto vec) -> at::Tensor {
    constexpr int V = decltype(vec)::value;
    using Op = OpT<scalar_t, V>;
    Op op;
    fill(op);
    const Plan pl = make_plan(s, V, Op::kUnroll, Op::kReduce);
    at::Tensor partial;
    acc_t* part = nullptr;
    if constexpr (Op::kReduce) {
      partial = at::empty({pl.X, s.TC, pl.Y, Op::Acc::kFields}, acc_opts);
      part = partial.mutable_data_ptr<acc_t>();
    }
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 block(pl.bx, pl.by);
    if (pl.rows) nddr_kernel<Op, true><<<pl.blocks, block, 0, stream>>>(op, pl.g, part);
    else nddr_kernel<Op, false><<<pl.blocks, block, 0, stream>>>(op, pl.g, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return partial;
  };
  if (can_vectorise(s, kVec, sizeof(scalar_t), ptrs)) return go(std::integral_constant<int, kVec>{});
  return go(std::integral_constant<int, 1>{});
}

// A per-channel vector argument: [T*C] in the accumulation type.
at::Tensor channel_vector(const at::Tensor& v, const at::Tensor& z, const char* name) {
  TORCH_CHECK(v.numel() == z.size(1) && v.scalar_type() == nddr::acc_type(z) && v.device() == z.device(), "nddr: ",
              name, " must be a [T*C] ", nddr::acc_type(z), " tensor on ", z.device(), ", got ", v.sizes(), " ",
              v.scalar_type(), " on ", v.device());
  return v.contiguous();
}

struct CudaKernels {
  static std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z, int64_t T) {
    check_tasks(T);
    const at::cuda::OptionalCUDAGuard guard(z.device());
    const Shape s = shape_of(z, T);
    const auto acc_opts = z.options().dtype(nddr::acc_type(z));
    if (z.numel() == 0) {  // no values: NaN, as torch's mean of nothing
      const at::Tensor nan = at::full({s.TC}, std::numeric_limits<double>::quiet_NaN(), acc_opts);
      return {nan, nan.clone()};
    }
    at::Tensor partial;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_channel_stats_cuda", [&] {
      partial = run<ChannelStatsOp, scalar_t>(s, {z.const_data_ptr()}, acc_opts,
                                              [&](auto& op) { op.z = z.const_data_ptr<scalar_t>(); });
    });
    // Merge the parts of each channel (Chan et al.) in fp64: a few ATen ops
    // over a buffer much smaller than z, in a fixed order.
    const at::Tensor p = partial.to(at::kDouble);
    const at::Tensor cnt = p.select(3, 0), mu = p.select(3, 1), m2 = p.select(3, 2);  // [X, TC, Y]
    const at::Tensor n = cnt.sum(at::IntArrayRef{0, 2});
    const at::Tensor mean = (cnt * mu).sum(at::IntArrayRef{0, 2}) / n;
    const at::Tensor var = (m2.sum(at::IntArrayRef{0, 2}) + (cnt * (mu - mean.view({1, -1, 1})).square()).sum(at::IntArrayRef{0, 2})) / n;
    return {mean.to(nddr::acc_type(z)), var.to(nddr::acc_type(z))};
  }

  static void affine_relu(const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                          std::vector<at::Tensor>& ys) {
    const int64_t T = static_cast<int64_t>(ys.size());
    check_tasks(T);
    const at::cuda::OptionalCUDAGuard guard(z.device());
    if (z.numel() == 0) return;
    const Shape s = shape_of(z, T);
    const at::Tensor sc = channel_vector(scale, z, "scale"), sh = channel_vector(shift, z, "shift");
    std::vector<const void*> ptrs{z.const_data_ptr()};
    add_ptrs(ptrs, ys);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_affine_relu_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      run<AffineReluOp, scalar_t>(s, ptrs, sc.options(), [&](auto& op) {
        op.z = z.const_data_ptr<scalar_t>();
        op.ys = task_ptrs<scalar_t>(ys);
        op.scale = sc.const_data_ptr<acc_t>();
        op.shift = sh.const_data_ptr<acc_t>();
      });
    });
  }

  static std::tuple<at::Tensor, at::Tensor> relu_sums(const std::vector<at::Tensor>& grad_ys, const at::Tensor& z,
                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                      const at::Tensor& mean) {
    const int64_t T = static_cast<int64_t>(grad_ys.size());
    check_tasks(T);
    const at::cuda::OptionalCUDAGuard guard(z.device());
    const at::Tensor sc = channel_vector(scale, z, "scale"), sh = channel_vector(shift, z, "shift"),
                     mu = channel_vector(mean, z, "mean");
    if (z.numel() == 0) return {at::zeros_like(sc), at::zeros_like(sc)};
    const Shape s = shape_of(z, T);
    std::vector<const void*> ptrs{z.const_data_ptr()};
    add_ptrs(ptrs, grad_ys);
    at::Tensor partial;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_relu_sums_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      partial = run<ReluSumsOp, scalar_t>(s, ptrs, sc.options(), [&](auto& op) {
        op.z = z.const_data_ptr<scalar_t>();
        op.gys = task_ptrs<const scalar_t>(grad_ys);
        op.scale = sc.const_data_ptr<acc_t>();
        op.shift = sh.const_data_ptr<acc_t>();
        op.mean = mu.const_data_ptr<acc_t>();
      });
    });
    const at::Tensor sums = partial.sum(at::IntArrayRef{0, 2});  // [TC, 2]
    return {sums.select(1, 0).contiguous(), sums.select(1, 1).contiguous()};
  }

  static void bn_relu_grad(const std::vector<at::Tensor>& grad_ys, const at::Tensor& z, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& a, const at::Tensor& b, at::Tensor& dz) {
    const int64_t T = static_cast<int64_t>(grad_ys.size());
    check_tasks(T);
    const at::cuda::OptionalCUDAGuard guard(z.device());
    if (z.numel() == 0) return;
    const Shape s = shape_of(z, T);
    TORCH_CHECK(dz.sizes() == z.sizes() && shape_of(dz, T).channels_last == s.channels_last,
                "nddr: dz must be laid out like z");
    const at::Tensor sc = channel_vector(scale, z, "scale"), sh = channel_vector(shift, z, "shift"),
                     av = channel_vector(a, z, "a"), bv = channel_vector(b, z, "b");
    std::vector<const void*> ptrs{z.const_data_ptr(), dz.const_data_ptr()};
    add_ptrs(ptrs, grad_ys);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nddr_bn_relu_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      run<BnReluGradOp, scalar_t>(s, ptrs, sc.options(), [&](auto& op) {
        op.z = z.const_data_ptr<scalar_t>();
        op.dz = dz.mutable_data_ptr<scalar_t>();
        op.gys = task_ptrs<const scalar_t>(grad_ys);
        op.scale = sc.const_data_ptr<acc_t>();
        op.shift = sh.const_data_ptr<acc_t>();
        op.a = av.const_data_ptr<acc_t>();
        op.b = bv.const_data_ptr<acc_t>();
      });
    });
  }

  static void relu_grad(const std::vector<at::Tensor>& grad_ys, const std::vector<at::Tensor>& ys, at::Tensor& dz) {
    const int64_t T = static_cast<int64_t>(grad_ys.size());
    check_tasks(T);
    const at::cuda::OptionalCUDAGuard guard(dz.device());
    if (dz.numel() == 0) return;
    const Shape s = shape_of(dz, T);
    std::vector<const void*> ptrs{dz.const_data_ptr()};
    add_ptrs(ptrs, grad_ys);
    add_ptrs(ptrs, ys);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dz.scalar_type(), "nddr_relu_grad_cuda", [&] {
      run<ReluGradOp, scalar_t>(s, ptrs, dz.options(), [&](auto& op) {
        op.dz = dz.mutable_data_ptr<scalar_t>();
        op.gys = task_ptrs<const scalar_t>(grad_ys);
        op.ys = task_ptrs<const scalar_t>(ys);
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("nddr_train", &nddr::train<CudaKernels>);
  m.impl("nddr_train_backward", &nddr::train_backward<CudaKernels>);
  m.impl("nddr_eval", &nddr::eval<CudaKernels>);
  m.impl("nddr_eval_backward", &nddr::eval_backward<CudaKernels>);
}

}  // namespace mtl_kernels
