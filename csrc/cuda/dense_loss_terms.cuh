// Device pieces shared by the CUDA dense_loss kernels (dense_loss.cu,
// dense_loss_group.cu and dense_loss_upsampled.cu): accurate exp/log per
// accumulation type, the per-block partial (sum, count, malformed), the
// cross-entropy, L1 and balanced BCE terms (normals use normals_pixel of
// common/dense_loss.h), and the full-size per-thread items built on them.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "common/dense_loss.h"

namespace mtl_kernels {

constexpr int kLossThreads = 256;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

// The block's (sum, count, bad) into out[0 .. 2]; every thread calls it.
template <typename acc_t>
__device__ void block_partial(acc_t sum, acc_t count, acc_t bad, double* __restrict out) {
  __shared__ double smem[3][kLossThreads / 32];
  double v[3] = {double(sum), double(count), double(bad)};
  for (int k = 0; k < 3; ++k)
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0)
    for (int k = 0; k < 3; ++k) smem[k][warp] = v[k];
  __syncthreads();
  if (threadIdx.x < 3) {
    double total = 0;
    for (int w = 0; w < kLossThreads / 32; ++w) total += smem[threadIdx.x][w];
    out[threadIdx.x] = total;
  }
}

// Cross-entropy, one pixel: the online max m and sum of exp s over its C logits (and the
// target's logit xt), then per channel the gradient softmax - onehot. logit(c) reads channel c.
template <typename acc_t, typename Logit>
__device__ __forceinline__ void ce_softmax_stats(const Logit& logit, int64_t C, int64_t label, acc_t& m, acc_t& s,
                                                 acc_t& xt) {
  m = -INFINITY, s = 0, xt = 0;  // as the CPU: any finite logits, however negative
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = logit(c);
    const acc_t m_new = v > m ? v : m;
    const acc_t m_ref = m_new == -INFINITY ? acc_t(0) : m_new;  // only -inf so far: exps of 0, not NaN
    s = (c == 0 ? acc_t(0) : s * exp_acc(m - m_ref)) + exp_acc(v - m_ref);
    m = m_new;
    xt = c == label ? v : xt;
  }
}

// L1 (kKind == kL1) or balanced BCE, one element: its term, gradient, count and malformed flag.
template <int64_t kKind, typename acc_t>
__device__ __forceinline__ void flat_term(acc_t v, acc_t t, acc_t w, int64_t invalid, acc_t& sum, acc_t& g,
                                          acc_t& count, acc_t& bad) {
  if constexpr (kKind == kL1) {
    const bool valid = l1_valid(t, invalid);
    bad = l1_malformed(t, invalid);
    count = valid;
    const acc_t d = v - t;
    sum = valid ? fabs(d) : acc_t(0);
    g = valid ? sign_of(d) : acc_t(0);
  } else {
    const acc_t z = exp_acc(-fabs(v));
    bce_term(v, t, w, z, log1p_acc(z), sum, g);
    count = 1;
    bad = t != t;
  }
}

// ---- Full-size predictions (dense_loss.cu, dense_loss_group.cu): one thread's item. Each
// adds its term, count and malformed flag to sum / count / bad and writes its gradient.

struct Pixels {  // [B, C, P] by strides; pixel q = b * P + p
  int64_t P, sB, sC, sP;
  __device__ int64_t offset(int64_t q) const { return (q / P) * sB + (q % P) * sP; }
};

inline Pixels pixels_of(const at::Tensor& pred) {
  const int64_t W = pred.size(3);
  return {pred.size(2) * W, pred.stride(0), pred.stride(1), W > 1 ? pred.stride(3) : pred.stride(2)};
}

// Cross-entropy of pixel q: its C logits walked twice, an online max / sum of exp, then the
// gradient softmax - onehot (the second walk re-reads what the block just read, from L2).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void ce_item(const scalar_t* __restrict x, const int64_t* __restrict target,
                                        scalar_t* __restrict grad, int64_t q, int64_t C, const Pixels& px,
                                        acc_t& sum, acc_t& count, acc_t& bad) {
  const int64_t label = target[q], off = px.offset(q);
  const bool valid = label != kIgnoreIndex, in_range = label >= 0 && label < C, ok = valid && in_range;
  bad = valid && !in_range;
  acc_t m, s, xt;  // online max and sum of exp, the target's logit
  ce_softmax_stats([&](int64_t c) { return static_cast<acc_t>(x[off + c * px.sC]); }, C, label, m, s, xt);
  if (ok) sum = m + log_acc(s) - xt, count = 1;
  const acc_t inv = ok ? acc_t(1) / s : acc_t(0);  // ignored pixels: gradient exactly 0
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(x[off + c * px.sC]);
    grad[off + c * px.sC] = static_cast<scalar_t>(exp_acc(v - m) * inv - acc_t(ok && c == label));
  }
}

// Normals L1 of pixel q (3 channels).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void normals_item(const scalar_t* __restrict x, const acc_t* __restrict target,
                                             scalar_t* __restrict grad, int64_t q, const Pixels& px, acc_t& sum,
                                             acc_t& count, acc_t& bad) {
  const int64_t off = px.offset(q);
  acc_t p[3], t[3], g[3];
  for (int c = 0; c < 3; ++c) {
    p[c] = static_cast<acc_t>(x[off + c * px.sC]);
    t[c] = target[off + c * px.sC];
  }
  int malformed = 0;
  count = normals_pixel(p, t, sum, g, malformed);
  bad = malformed;
  for (int c = 0; c < 3; ++c) grad[off + c * px.sC] = static_cast<scalar_t>(g[c]);
}

// L1 (kKind == kL1) or balanced BCE of element i; x, target and grad share one dense layout.
template <int64_t kKind, typename scalar_t, typename acc_t>
__device__ __forceinline__ void flat_item(const scalar_t* __restrict x, const acc_t* __restrict target,
                                          scalar_t* __restrict grad, int64_t i, acc_t w, int64_t invalid, acc_t& sum,
                                          acc_t& count, acc_t& bad) {
  acc_t g;
  flat_term<kKind>(static_cast<acc_t>(x[i]), target[i], w, invalid, sum, g, count, bad);
  grad[i] = static_cast<scalar_t>(g);
}

}  // namespace mtl_kernels
