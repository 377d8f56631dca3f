// CUDA kernels of the cross-stitch op (schemas in csrc/ops.cpp):
//   ys[i][b,c,h,w]   = sum_j alpha[i,j,c] * xs[j][b,c,h,w]
//   grad_xs[j]       = sum_i alpha[i,j,c] * grad_ys[i]
//   grad_alpha[i,j,c] = sum_{b,h,w} grad_ys[i] * xs[j]
//
// The op is memory-bound, so every kernel reads its T inputs in place and
// writes its T outputs in a single pass; the backward computes grad_xs and
// grad_alpha from the same loads. grad_alpha is deterministic: each block
// writes its partial sums to its own slot of a buffer that at::sum reduces.
//
// Two kernel families cover the two dense layouts (csrc/common/cross_stitch.h):
//  * "rows"    NCHW with rows of at least kMinRowPixels pixels. Row r = b*C + c
//              holds P contiguous pixels of one channel, so a block works on
//              whole rows (or chunks of long rows), reads its channel's T*T
//              alphas once into shared memory (a broadcast in the loop) and
//              uses vector loads (16 bytes; 8 in the backward for T > 4)
//              where the row length and pointers allow, else scalar ones.
//  * "columns" every other case, viewing the data as N rows of Q contiguous
//              columns, column q belonging to channel q / S:
//                NHWC: N = B*P, Q = C,   S = 1
//                NCHW: N = B,   Q = C*P, S = P   (rows too short for "rows")
//              A thread owns one column and walks down the rows, so warps load
//              coalesced runs of columns; each thread reads its alpha column
//              once (into registers in the forward, shared memory otherwise).
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
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cross_stitch.h"
#include "cuda/pack.cuh"

namespace mtl_kernels {
namespace {

constexpr int kMaxTasks = 8;
constexpr int kThreads = 256;       // threads per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinRowPixels = 32;  // shorter NCHW rows would idle most of a warp
constexpr int kRedGroup = 8;         // grad_alpha entries reduced per round (columns backward)

// Kernel arguments: raw pointers to the T tensors, passed by value (kernel
// parameter space) so no device-side pointer table is needed.
template <typename scalar_t, int T>
struct FwdPtrs {
  const scalar_t* x[T];
  scalar_t* y[T];
};

template <typename scalar_t, int T>
struct BwdPtrs {
  const scalar_t* gy[T];
  const scalar_t* x[T];
  scalar_t* gx[T];
};

// Stops the compiler from hoisting the loop-invariant shared-memory alpha reads
// out of a loop into T*T registers (which, next to the T*T grad_alpha
// accumulators and the loaded data, would cut occupancy or spill); re-reading
// a broadcast or conflict-free shared value each iteration is nearly free.
__device__ __forceinline__ void keep_alpha_in_smem() { asm volatile("" ::: "memory"); }

// Hides a loop index from the compiler's strength reduction, which would
// otherwise keep one 64-bit running pointer per tensor (48 registers for the
// 3T = 24 tensors of the backward at T = 8) live across the loop; deriving
// each address from the index instead costs two integer instructions.
__device__ __forceinline__ int64_t opaque(int64_t v) {
  asm("" : "+l"(v));
  return v;
}

constexpr int next_pow2(int v) { return v <= 1 ? 1 : 2 * next_pow2((v + 1) / 2); }
constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v / 2); }

// Independent loads in flight per thread: with few tasks a thread handles
// several vectors/rows per iteration so the memory system stays busy; with
// many tasks the T (or 2T) loads per element suffice and registers are dearer.
template <int T> constexpr int rows_fwd_unroll() { return T == 1 ? 4 : (T == 2 ? 2 : 1); }
template <int T> constexpr int rows_bwd_unroll() { return T == 1 ? 2 : 1; }
template <int T> constexpr int cols_fwd_unroll() { return T == 1 ? 8 : (T <= 4 ? 4 : 2); }
// (double with T > 4: its T*T accumulators alone take 2*T*T registers)
template <typename acc_t, int T> constexpr int cols_bwd_unroll() {
  return T <= 2 ? 4 : (sizeof(acc_t) == 8 && T > 4 ? 1 : 2);
}

// Sums v[0..L) over the 32 lanes of a warp by recursive halving: at each step
// partners swap opposite halves of their array, so every shuffle moves a value
// still needed and a T*T = 64 reduction costs 62 shuffles instead of 320. Once
// one value is left the remaining offsets are a plain butterfly. Afterwards
// lane `lane` holds in v[m], m < (L >> min(5, log2 L)), the warp total of the
// entry whose index halving_index() gives.
template <int L, int OFF, typename acc_t>
__device__ __forceinline__ void warp_sum_halving(acc_t* v, int lane) {
  if constexpr (OFF > 0) {
    if constexpr (L >= 2) {
      constexpr int H = L / 2;
      const bool upper = (lane & OFF) != 0;
#pragma unroll
      for (int m = 0; m < H; ++m) {
        const acc_t send = upper ? v[m] : v[m + H];
        const acc_t keep = upper ? v[m + H] : v[m];
        v[m] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
      }
      warp_sum_halving<H, OFF / 2>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFF);
      warp_sum_halving<1, OFF / 2>(v, lane);
    }
  }
}

// Halving steps taken by warp_sum_halving<L, 16>.
template <int L> constexpr int halving_steps() { return log2_exact(L) < 5 ? log2_exact(L) : 5; }

// Index of the entry lane `lane` holds in v[0] after warp_sum_halving<L, 16>
// (v[m] holds entry index + m). A lane upper at offset 16 >> t kept the upper
// half, of size L >> (t + 1), at step t.
template <int L>
__device__ __forceinline__ int halving_index(int lane) {
  int base = 0;
#pragma unroll
  for (int t = 0; t < halving_steps<L>(); ++t)
    if (lane & (16 >> t)) base += L >> (t + 1);
  return base;
}

// After the butterfly stage, lanes differing only in its offsets hold the same
// values; the one with those bits clear writes them.
template <int L>
__device__ __forceinline__ bool halving_writer(int lane) {
  return (lane & ((32 >> halving_steps<L>()) - 1)) == 0;
}

// ---------------------------------------------------------------------------
// "rows" kernels: NCHW, block = (bx, by), by rows of bx threads each (bx >= 32,
// a power of two, so a warp never spans two rows). blockIdx.x = row group *
// nchunk + chunk; a chunk is chunk_vecs vectors of VEC pixels of its row.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, int T, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    cross_stitch_fwd_rows(FwdPtrs<scalar_t, T> p, const acc_t* __restrict__ alpha, int64_t rows, int64_t C,
                          int64_t nvec, int64_t chunk_vecs, int64_t nchunk) {
  using PackT = Pack<scalar_t, VEC>;
  __shared__ acc_t s_alpha[kWarps][T * T];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int64_t row = (blockIdx.x / nchunk) * blockDim.y + ty;
  const int64_t chunk = blockIdx.x % nchunk;
  if (row < rows) {
    const int64_t c = row % C;
    for (int k = tx; k < T * T; k += bx) s_alpha[ty][k] = alpha[k * C + c];
  }
  __syncthreads();
  if (row >= rows) return;
  const acc_t* a = s_alpha[ty];  // a[i * T + j] = alpha[i, j, c]

  const int64_t begin = chunk * chunk_vecs;
  const int64_t end = min(nvec, begin + chunk_vecs);
  const int64_t base = row * nvec;  // in vectors
  for (int64_t v0 = begin + tx; v0 < end; v0 += int64_t(bx) * U) {
    keep_alpha_in_smem();
    const int64_t idx = opaque(base + v0);
    // All loads of the iteration first, so they are in flight together.
    PackT in[U][T];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * bx < end) {
#pragma unroll
        for (int j = 0; j < T; ++j) in[u][j] = load_pack<VEC>(p.x[j], idx + u * bx);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * bx < end) {
#pragma unroll
        for (int i = 0; i < T; ++i) {
          acc_t s[VEC];
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[e] = acc_t(0);
#pragma unroll
          for (int j = 0; j < T; ++j) {
            const acc_t aij = a[i * T + j];
#pragma unroll
            for (int e = 0; e < VEC; ++e) s[e] += aij * static_cast<acc_t>(in[u][j].v[e]);
          }
          PackT out;
#pragma unroll
          for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<scalar_t>(s[e]);
          store_pack<VEC>(p.y[i], idx + u * bx, out);
        }
      }
    }
  }
}

// partial: [rows, nchunk, T*T], this block's sums over its chunk of each row.
template <typename scalar_t, typename acc_t, int T, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    cross_stitch_bwd_rows(BwdPtrs<scalar_t, T> p, const acc_t* __restrict__ alpha, acc_t* __restrict__ partial,
                          int64_t rows, int64_t C, int64_t nvec, int64_t chunk_vecs, int64_t nchunk) {
  using PackT = Pack<scalar_t, VEC>;
  constexpr int K = T * T;
  constexpr int KP = next_pow2(K);  // padded for warp_sum_halving
  __shared__ acc_t s_alpha[kWarps][K];
  __shared__ acc_t s_red[kWarps][K];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int64_t row = (blockIdx.x / nchunk) * blockDim.y + ty;
  const int64_t chunk = blockIdx.x % nchunk;
  const bool active = row < rows;  // inactive threads still join the reduction
  if (active) {
    const int64_t c = row % C;
    // Transposed, a_t[j * T + i] = alpha[i, j, c]: grad_xs[j] then reads a
    // contiguous run, so it finishes one j at a time with few live registers.
    for (int k = tx; k < K; k += bx) s_alpha[ty][(k % T) * T + k / T] = alpha[k * C + c];
  }
  __syncthreads();
  const acc_t* a_t = s_alpha[ty];

  acc_t g[KP];  // g[i * T + j]: this thread's share of grad_alpha[i, j, c]
#pragma unroll
  for (int k = 0; k < KP; ++k) g[k] = acc_t(0);

  if (active) {
    const int64_t begin = chunk * chunk_vecs;
    const int64_t end = min(nvec, begin + chunk_vecs);
    const int64_t base = row * nvec;
    for (int64_t v0 = begin + tx; v0 < end; v0 += int64_t(bx) * U) {
      keep_alpha_in_smem();
      const int64_t idx = opaque(base + v0);
      PackT gy[U][T], x[U][T];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * bx < end) {
#pragma unroll
          for (int i = 0; i < T; ++i) gy[u][i] = load_pack<VEC>(p.gy[i], idx + u * bx);
#pragma unroll
          for (int j = 0; j < T; ++j) x[u][j] = load_pack<VEC>(p.x[j], idx + u * bx);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * bx < end) {
          // grad_alpha first, so x is dead before grad_xs needs registers.
#pragma unroll
          for (int i = 0; i < T; ++i) {
#pragma unroll
            for (int j = 0; j < T; ++j) {
#pragma unroll
              for (int e = 0; e < VEC; ++e)
                g[i * T + j] += static_cast<acc_t>(gy[u][i].v[e]) * static_cast<acc_t>(x[u][j].v[e]);
            }
          }
#pragma unroll
          for (int j = 0; j < T; ++j) {
            acc_t s[VEC];
#pragma unroll
            for (int e = 0; e < VEC; ++e) s[e] = acc_t(0);
#pragma unroll
            for (int i = 0; i < T; ++i) {
              const acc_t aij = a_t[j * T + i];
#pragma unroll
              for (int e = 0; e < VEC; ++e) s[e] += aij * static_cast<acc_t>(gy[u][i].v[e]);
            }
            PackT out;
#pragma unroll
            for (int e = 0; e < VEC; ++e) out.v[e] = static_cast<scalar_t>(s[e]);
            store_pack<VEC>(p.gx[j], idx + u * bx, out);
          }
        }
      }
    }
  }

  // Block reduction in a fixed order: within each warp (all its lanes are in
  // one row), then across the bx / 32 warps of the row through shared memory.
  const int lane = tx & 31;
  warp_sum_halving<KP, 16>(g, lane);
  const int wpr = bx >> 5;               // warps per row
  const int warp = ty * wpr + (tx >> 5);  // warp index in the block
  if (halving_writer<KP>(lane)) {
    const int idx = halving_index<KP>(lane);
#pragma unroll
    for (int m = 0; m < (KP >> halving_steps<KP>()); ++m)
      if (idx + m < K) s_red[warp][idx + m] = g[m];
  }
  __syncthreads();
  if (active) {
    acc_t* out = partial + (row * nchunk + chunk) * K;
    for (int k = tx; k < K; k += bx) {
      acc_t s = acc_t(0);
      for (int w = 0; w < wpr; ++w) s += s_red[ty * wpr + w][k];
      out[k] = s;
    }
  }
}

// ---------------------------------------------------------------------------
// "columns" kernels: data as N rows of Q columns, element (n, q) at n * Q + q,
// column q in channel q / S. Block = (bx, by), bx <= 32 columns by by >= 8
// row lanes; blockIdx.x = chunk * ncolgroups + column group, a chunk being
// chunk_rows rows.
// ---------------------------------------------------------------------------
// The thread's alpha column stays in registers for its whole walk, unless
// T*T of them would take more than 64 registers (double, T > 5): then it is
// read from shared memory, laid out [k][column] so a warp's reads are
// conflict-free.
template <typename acc_t, int T>
constexpr bool cols_alpha_in_regs() {
  return T * T * sizeof(acc_t) <= 256;
}

template <typename scalar_t, typename acc_t, int T, int U>
__global__ void __launch_bounds__(kThreads)
    cross_stitch_fwd_cols(FwdPtrs<scalar_t, T> p, const acc_t* __restrict__ alpha, int64_t N, int64_t Q,
                          int64_t C, int64_t S, int64_t chunk_rows, int64_t ncolgroups) {
  constexpr bool kRegs = cols_alpha_in_regs<acc_t, T>();
  __shared__ acc_t s_alpha[T * T][32];
  const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
  const int64_t q = (blockIdx.x % ncolgroups) * blockDim.x + tx;
  const int64_t chunk = blockIdx.x / ncolgroups;
  // Staged through shared memory even when kept in registers: loading T*T
  // strided values straight from global memory made the compiler hold all
  // their addresses at once.
  if (q < Q) {
    const int64_t c = q / S;
    for (int k = ty; k < T * T; k += by) s_alpha[k][tx] = alpha[k * C + c];
  }
  __syncthreads();
  if (q >= Q) return;
  acc_t a[kRegs ? T : 1][kRegs ? T : 1];
  if constexpr (kRegs) {
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
      for (int j = 0; j < T; ++j) a[i][j] = s_alpha[i * T + j][tx];
  }

  const int64_t begin = chunk * chunk_rows;
  const int64_t end = min(N, begin + chunk_rows);
  for (int64_t n0 = begin + ty; n0 < end; n0 += int64_t(by) * U) {
    if constexpr (!kRegs) keep_alpha_in_smem();
    const int64_t n = opaque(n0);
    scalar_t in[U][T];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (n0 + u * by < end) {
        const int64_t off = (n + u * by) * Q + q;
#pragma unroll
        for (int j = 0; j < T; ++j) in[u][j] = p.x[j][off];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (n0 + u * by < end) {
        const int64_t off = (n + u * by) * Q + q;
#pragma unroll
        for (int i = 0; i < T; ++i) {
          acc_t s = acc_t(0);
#pragma unroll
          for (int j = 0; j < T; ++j) {
            acc_t aij;
            if constexpr (kRegs)
              aij = a[i][j];
            else
              aij = s_alpha[i * T + j][tx];
            s += aij * static_cast<acc_t>(in[u][j]);
          }
          p.y[i][off] = static_cast<scalar_t>(s);
        }
      }
    }
  }
}

// partial: [nchunk, T*T, Q], this block's sums over its chunk of rows.
// The alpha column lives in shared memory here (laid out [k][column], so a
// warp's reads are conflict-free): the T*T grad_alpha accumulators already
// take T*T registers, and both in registers would spill at T = 8 for double.
template <typename scalar_t, typename acc_t, int T, int U>
__global__ void __launch_bounds__(kThreads)
    cross_stitch_bwd_cols(BwdPtrs<scalar_t, T> p, const acc_t* __restrict__ alpha, acc_t* __restrict__ partial,
                          int64_t N, int64_t Q, int64_t C, int64_t S, int64_t chunk_rows, int64_t ncolgroups) {
  constexpr int K = T * T;
  __shared__ acc_t s_alpha[K][32];
  __shared__ acc_t s_red[kRedGroup][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t q = (blockIdx.x % ncolgroups) * bx + tx;
  const int64_t chunk = blockIdx.x / ncolgroups;
  const bool active = q < Q;  // inactive threads still join the reduction
  if (active) {
    const int64_t c = q / S;
    for (int k = ty; k < K; k += by) s_alpha[k][tx] = alpha[k * C + c];
  }
  __syncthreads();

  acc_t g[K];  // g[i * T + j]: this thread's share of grad_alpha[i, j, c]
#pragma unroll
  for (int k = 0; k < K; ++k) g[k] = acc_t(0);

  if (active) {
    const int64_t begin = chunk * chunk_rows;
    const int64_t end = min(N, begin + chunk_rows);
    for (int64_t n0 = begin + ty; n0 < end; n0 += int64_t(by) * U) {
      keep_alpha_in_smem();
      const int64_t n = opaque(n0);
      scalar_t gy[U][T], x[U][T];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (n0 + u * by < end) {
          const int64_t off = (n + u * by) * Q + q;
#pragma unroll
          for (int i = 0; i < T; ++i) gy[u][i] = p.gy[i][off];
#pragma unroll
          for (int j = 0; j < T; ++j) x[u][j] = p.x[j][off];
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (n0 + u * by < end) {
          const int64_t off = (n + u * by) * Q + q;
          // grad_alpha first, so x is dead before grad_xs needs registers.
#pragma unroll
          for (int i = 0; i < T; ++i)
#pragma unroll
            for (int j = 0; j < T; ++j) g[i * T + j] += static_cast<acc_t>(gy[u][i]) * static_cast<acc_t>(x[u][j]);
#pragma unroll
          for (int j = 0; j < T; ++j) {
            acc_t s = acc_t(0);
#pragma unroll
            for (int i = 0; i < T; ++i) s += s_alpha[i * T + j][tx] * static_cast<acc_t>(gy[u][i]);
            p.gx[j][off] = static_cast<scalar_t>(s);
          }
        }
      }
    }
  }

  // Reduce over the by row lanes of each column, kRedGroup entries per round
  // (by >= kRedGroup): every thread stores its entries, then row lane ty sums
  // entry ty of the round down the lanes in a fixed order.
  const int lin = ty * bx + tx;
#pragma unroll
  for (int k0 = 0; k0 < K; k0 += kRedGroup) {
#pragma unroll
    for (int r = 0; r < kRedGroup; ++r)
      if (k0 + r < K) s_red[r][lin] = g[k0 + r];
    __syncthreads();
    if (active && ty < kRedGroup && k0 + ty < K) {
      acc_t s = acc_t(0);
      for (int y = 0; y < by; ++y) s += s_red[ty][y * bx + tx];
      partial[(chunk * K + k0 + ty) * Q + q] = s;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2_host(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Loop iterations per block: enough blocks for several waves on the GPU, yet
// at least min_iters (to amortise the per-block alpha load and reduction) and
// at most max_iters (so large inputs split into many blocks, keeping the last
// wave short), never more than a whole row/column.
int64_t iters_per_chunk(int64_t iters, int64_t groups, int64_t min_iters, int64_t max_iters) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = sms * 32;
  const int64_t per = std::clamp(ceil_div(iters * groups, target_blocks), min_iters, max_iters);
  return std::max<int64_t>(1, std::min(per, iters));
}

struct RowsPlan {
  int bx, by;
  int64_t chunk_vecs, nchunk, blocks;
};

RowsPlan plan_rows(int64_t rows, int64_t nvec, int unroll, int64_t min_iters, int64_t max_iters) {
  RowsPlan pl;
  pl.bx = static_cast<int>(std::clamp<int64_t>(next_pow2_host(ceil_div(nvec, unroll)), 32, kThreads));
  pl.by = kThreads / pl.bx;
  const int64_t row_groups = ceil_div(rows, pl.by);
  const int64_t per_iter = int64_t(pl.bx) * unroll;
  const int64_t iters = ceil_div(nvec, per_iter);
  pl.chunk_vecs = iters_per_chunk(iters, row_groups, min_iters, max_iters) * per_iter;
  pl.nchunk = ceil_div(nvec, pl.chunk_vecs);
  pl.blocks = row_groups * pl.nchunk;
  TORCH_CHECK(pl.blocks <= INT_MAX, "cross_stitch: input too large for the cuda backend");
  return pl;
}

struct ColsPlan {
  int bx, by;
  int64_t ncolgroups, chunk_rows, nchunk, blocks;
};

ColsPlan plan_cols(int64_t N, int64_t Q, int unroll, int64_t min_iters, int64_t max_iters) {
  ColsPlan pl;
  pl.bx = static_cast<int>(std::min<int64_t>(32, next_pow2_host(Q)));
  pl.by = kThreads / pl.bx;
  pl.ncolgroups = ceil_div(Q, pl.bx);
  const int64_t per_iter = int64_t(pl.by) * unroll;
  const int64_t iters = ceil_div(N, per_iter);
  pl.chunk_rows = iters_per_chunk(iters, pl.ncolgroups, min_iters, max_iters) * per_iter;
  pl.nchunk = ceil_div(N, pl.chunk_rows);
  pl.blocks = pl.ncolgroups * pl.nchunk;
  TORCH_CHECK(pl.blocks <= INT_MAX, "cross_stitch: input too large for the cuda backend");
  return pl;
}

// Sizes of the [B, C, H, W] features and the kernel family that handles them.
struct Geometry {
  int64_t B, C, P;
  bool rows;  // NCHW "rows" kernels, else "columns"
  // columns view
  int64_t N, Q, S;
};

Geometry geometry(const at::Tensor& x0, at::MemoryFormat fmt) {
  Geometry g;
  g.B = x0.size(0);
  g.C = x0.size(1);
  g.P = x0.size(2) * x0.size(3);
  const bool nchw = fmt == at::MemoryFormat::Contiguous;
  g.rows = nchw && g.P >= kMinRowPixels;
  g.N = nchw ? g.B : g.B * g.P;
  g.Q = nchw ? g.C * g.P : g.C;
  g.S = nchw ? g.P : 1;
  return g;
}

// Elements per vector load in the "rows" kernels: 16 bytes, but 8 in the
// backward with more than 4 tasks, whose 2T loaded vectors would otherwise
// crowd out the T*T grad_alpha accumulators.
template <typename scalar_t>
constexpr int rows_vec(bool backward, int T) {
  const int bytes = backward && T > 4 ? 8 : 16;
  return bytes / sizeof(scalar_t) > 0 ? bytes / sizeof(scalar_t) : 1;
}

// Whether the rows can be read in vectors of `vec` elements: every row start
// of every tensor aligned, and rows long enough to keep a warp busy in vectors.
bool can_vectorise(const std::vector<at::Tensor>& tensors, int64_t P, int vec, size_t elem_size) {
  if (vec == 1 || P % vec != 0 || P / vec < 32) return false;
  for (const auto& t : tensors)
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % (vec * elem_size) != 0) return false;
  return true;
}

void check_tasks(int64_t T) {
  TORCH_CHECK(T <= kMaxTasks, "cross_stitch: the cuda backend supports up to ", kMaxTasks, " tasks, got ", T,
              "; use backend='triton' or backend='reference'");
}

// Calls fn(std::integral_constant<int, T>) for T in 1..kMaxTasks.
template <typename Fn>
void dispatch_tasks(int64_t T, Fn&& fn) {
  switch (T) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 8: fn(std::integral_constant<int, 8>{}); break;
    default: check_tasks(T);
  }
}

template <typename scalar_t, typename acc_t, int T>
void launch_forward(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ys, const at::Tensor& alpha,
                    const Geometry& geo) {
  FwdPtrs<scalar_t, T> p;
  for (int j = 0; j < T; ++j) {
    p.x[j] = xs[j].const_data_ptr<scalar_t>();
    p.y[j] = ys[j].mutable_data_ptr<scalar_t>();
  }
  const acc_t* a = alpha.const_data_ptr<acc_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (geo.rows) {
    constexpr int U = rows_fwd_unroll<T>();
    std::vector<at::Tensor> all(xs);
    all.insert(all.end(), ys.begin(), ys.end());
    const int64_t rows = geo.B * geo.C;
    auto run = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t nvec = geo.P / VEC;
      const RowsPlan pl = plan_rows(rows, nvec, U, 1, 16);
      cross_stitch_fwd_rows<scalar_t, acc_t, T, VEC, U><<<pl.blocks, dim3(pl.bx, pl.by), 0, stream>>>(
          p, a, rows, geo.C, nvec, pl.chunk_vecs, pl.nchunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = rows_vec<scalar_t>(false, T);
    if (can_vectorise(all, geo.P, kVec, sizeof(scalar_t)))
      run(std::integral_constant<int, kVec>{});
    else
      run(std::integral_constant<int, 1>{});
  } else {
    constexpr int U = cols_fwd_unroll<T>();
    const ColsPlan pl = plan_cols(geo.N, geo.Q, U, 1, 16);
    cross_stitch_fwd_cols<scalar_t, acc_t, T, U><<<pl.blocks, dim3(pl.bx, pl.by), 0, stream>>>(
        p, a, geo.N, geo.Q, geo.C, geo.S, pl.chunk_rows, pl.ncolgroups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Returns grad_alpha as [T, T, C] in acc_t.
template <typename scalar_t, typename acc_t, int T>
at::Tensor launch_backward(const std::vector<at::Tensor>& gys, const std::vector<at::Tensor>& xs,
                           const std::vector<at::Tensor>& gxs, const at::Tensor& alpha, const Geometry& geo) {
  BwdPtrs<scalar_t, T> p;
  for (int j = 0; j < T; ++j) {
    p.gy[j] = gys[j].const_data_ptr<scalar_t>();
    p.x[j] = xs[j].const_data_ptr<scalar_t>();
    p.gx[j] = gxs[j].mutable_data_ptr<scalar_t>();
  }
  const acc_t* a = alpha.const_data_ptr<acc_t>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto acc_opts = alpha.options();  // alpha is already in acc_t
  if (geo.rows) {
    constexpr int U = rows_bwd_unroll<T>();
    std::vector<at::Tensor> all(xs);
    all.insert(all.end(), gys.begin(), gys.end());
    all.insert(all.end(), gxs.begin(), gxs.end());
    const int64_t rows = geo.B * geo.C;
    at::Tensor partial;
    int64_t nchunk = 0;
    auto run = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t nvec = geo.P / VEC;
      const RowsPlan pl = plan_rows(rows, nvec, U, 2, 32);
      nchunk = pl.nchunk;
      partial = at::empty({rows * nchunk * T * T}, acc_opts);
      cross_stitch_bwd_rows<scalar_t, acc_t, T, VEC, U><<<pl.blocks, dim3(pl.bx, pl.by), 0, stream>>>(
          p, a, partial.mutable_data_ptr<acc_t>(), rows, geo.C, nvec, pl.chunk_vecs, pl.nchunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    constexpr int kVec = rows_vec<scalar_t>(true, T);
    if (can_vectorise(all, geo.P, kVec, sizeof(scalar_t)))
      run(std::integral_constant<int, kVec>{});
    else
      run(std::integral_constant<int, 1>{});
    // [B, C, nchunk, T, T] -> [C, T, T] -> [T, T, C]
    return at::sum(partial.view({geo.B, geo.C, nchunk, T, T}), at::IntArrayRef{0, 2}).permute({1, 2, 0});
  }
  constexpr int U = cols_bwd_unroll<acc_t, T>();
  const ColsPlan pl = plan_cols(geo.N, geo.Q, U, 2, 32);
  at::Tensor partial = at::empty({pl.nchunk * T * T * geo.Q}, acc_opts);
  cross_stitch_bwd_cols<scalar_t, acc_t, T, U><<<pl.blocks, dim3(pl.bx, pl.by), 0, stream>>>(
      p, a, partial.mutable_data_ptr<acc_t>(), geo.N, geo.Q, geo.C, geo.S, pl.chunk_rows, pl.ncolgroups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // [nchunk, T, T, C, S] -> [T, T, C]. IntArrayRef spelled out: a bare braced list is ambiguous
  // with DimnameList under C++17, which torch 2.11 (the GPU machines') builds extensions with.
  return at::sum(partial.view({pl.nchunk, T, T, geo.C, geo.S}), at::IntArrayRef{0, 4});
}

std::vector<at::Tensor> cross_stitch_cuda(at::TensorList xs_in, const at::Tensor& alpha) {
  check_cross_stitch_args(xs_in, alpha, "xs");
  const int64_t T = static_cast<int64_t>(xs_in.size());
  check_tasks(T);
  const at::cuda::OptionalCUDAGuard guard(xs_in[0].device());
  const at::MemoryFormat fmt = dense_format(xs_in[0]);
  const std::vector<at::Tensor> xs = in_format(xs_in, fmt);
  std::vector<at::Tensor> ys = empty_like_all(xs, fmt);
  if (xs[0].numel() == 0) return ys;
  const Geometry geo = geometry(xs[0], fmt);
  // A [T, T, C] tensor: converting it once on the host side spares the kernels
  // a second template type.
  const at::Tensor alpha_acc = alpha.to(at::toOpMathType(xs[0].scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "cross_stitch_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_tasks(T, [&](auto t) { launch_forward<scalar_t, acc_t, decltype(t)::value>(xs, ys, alpha_acc, geo); });
  });
  return ys;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> cross_stitch_backward_cuda(at::TensorList grad_ys_in,
                                                                           at::TensorList xs_in,
                                                                           const at::Tensor& alpha) {
  check_cross_stitch_args(xs_in, alpha, "xs");
  TORCH_CHECK(grad_ys_in.size() == xs_in.size(), "cross_stitch: got ", grad_ys_in.size(), " grad_ys for ",
              xs_in.size(), " xs");
  check_cross_stitch_args(grad_ys_in, alpha, "grad_ys");
  // Each list is internally consistent, so comparing the first of each suffices.
  TORCH_CHECK(grad_ys_in[0].sizes() == xs_in[0].sizes(), "cross_stitch: grad_ys have shape ", grad_ys_in[0].sizes(),
              ", expected ", xs_in[0].sizes(), " like xs");
  TORCH_CHECK(grad_ys_in[0].scalar_type() == xs_in[0].scalar_type(), "cross_stitch: grad_ys have dtype ",
              grad_ys_in[0].scalar_type(), ", expected ", xs_in[0].scalar_type(), " like xs");
  TORCH_CHECK(grad_ys_in[0].device() == xs_in[0].device(), "cross_stitch: grad_ys are on ", grad_ys_in[0].device(),
              ", expected ", xs_in[0].device(), " like xs");
  const int64_t T = static_cast<int64_t>(xs_in.size());
  check_tasks(T);
  const at::cuda::OptionalCUDAGuard guard(xs_in[0].device());
  const at::MemoryFormat fmt = dense_format(xs_in[0]);
  const std::vector<at::Tensor> xs = in_format(xs_in, fmt);
  const std::vector<at::Tensor> gys = in_format(grad_ys_in, fmt);
  std::vector<at::Tensor> gxs = empty_like_all(xs, fmt);
  if (xs[0].numel() == 0) return {gxs, at::zeros(alpha.sizes(), alpha.options())};
  const Geometry geo = geometry(xs[0], fmt);
  const at::Tensor alpha_acc = alpha.to(at::toOpMathType(xs[0].scalar_type())).contiguous();
  at::Tensor grad_alpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[0].scalar_type(), "cross_stitch_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_tasks(T, [&](auto t) {
      grad_alpha = launch_backward<scalar_t, acc_t, decltype(t)::value>(gys, xs, gxs, alpha_acc, geo);
    });
  });
  return {gxs, grad_alpha.to(alpha.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace mtl_kernels

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("cross_stitch", &mtl_kernels::cross_stitch_cuda);
  m.impl("cross_stitch_backward", &mtl_kernels::cross_stitch_backward_cuda);
}
