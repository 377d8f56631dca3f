// Device pieces shared by the CUDA dense_loss kernels (dense_loss.cu and
// dense_loss_upsampled.cu): accurate exp/log per accumulation type, the
// per-block partial (sum, count, malformed), and the cross-entropy, L1 and
// balanced BCE terms (normals use normals_pixel of common/dense_loss.h).
#pragma once
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

// The block's (sum, count, bad) into out[blockIdx.x * 3 ..]; every thread calls it.
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
    out[int64_t(blockIdx.x) * 3 + threadIdx.x] = total;
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
    s = (c == 0 ? acc_t(0) : s * exp_acc(m - m_new)) + exp_acc(v - m_new);
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

}  // namespace mtl_kernels
