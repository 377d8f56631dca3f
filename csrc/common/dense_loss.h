// Per-element math of the dense losses, shared by the CPU and CUDA kernels
// (see csrc/ops.cpp for the op and mtl_kernels/reference/dense_loss.py for
// the definition). Each function gives a term of the loss sum and its
// gradient; the callers bring their own fast exp/log.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MTL_HD __host__ __device__ __forceinline__
#else
#define MTL_HD inline
#endif

namespace mtl_kernels {

enum DenseLossKind : int64_t { kCrossEntropy = 0, kL1 = 1, kNormalsL1 = 2, kBalancedBce = 3 };
// Which L1 targets are holes: 255 (the survey's convention), or anything not > 0 (0, negative, NaN).
enum DenseLossInvalid : int64_t { kInvalid255 = 0, kInvalidNonpositive = 1 };
constexpr int64_t kIgnoreIndex = 255;

MTL_HD float sqrt_acc(float x) { return sqrtf(x); }
MTL_HD double sqrt_acc(double x) { return sqrt(x); }

// d|d|/dd as torch.abs has it: 0 at 0.
template <typename acc_t>
MTL_HD acc_t sign_of(acc_t d) {
  return acc_t(d > 0) - acc_t(d < 0);
}

// L1 target: counted, or a hole; NaN is malformed under the 255 convention.
template <typename acc_t>
MTL_HD bool l1_valid(acc_t t, int64_t invalid) {
  return invalid == kInvalidNonpositive ? t > acc_t(0) : (t != acc_t(kIgnoreIndex) && t == t);
}
template <typename acc_t>
MTL_HD bool l1_malformed(acc_t t, int64_t invalid) {
  return invalid == kInvalid255 && t != t;
}

// Balanced BCE with logits, one term: label = t >= 0.5, weight w on positives
// and 1 - w on negatives; z = exp(-|x|) and l = log1p(z) from the caller.
// -log p(label | x) = max(x, 0) - x * label + log1p(exp(-|x|)) never
// overflows; its gradient is sigmoid(x) - label.
template <typename acc_t>
MTL_HD void bce_term(acc_t x, acc_t t, acc_t w, acc_t z, acc_t l, acc_t& loss, acc_t& grad) {
  const bool pos = t >= acc_t(0.5);
  const acc_t y = pos ? acc_t(1) : acc_t(0);
  const acc_t wt = pos ? w : acc_t(1) - w;
  const acc_t inv = acc_t(1) / (acc_t(1) + z);
  const acc_t sigmoid = x >= acc_t(0) ? inv : z * inv;
  loss = wt * ((x > acc_t(0) ? x : acc_t(0)) - x * y + l);
  grad = wt * (sigmoid - y);
}

// Normals, one pixel: q = p / (|p| + 1e-12) (the survey's normalisation),
// terms |q_k - t_k| over the entries whose target is not 255. Gradient with
// g_k = sign(q_k - t_k) on valid entries: dL/dp_j = g_j / n - p_j (g . p) / (|p| n^2),
// n = |p| + 1e-12; at p = 0 the second term is 0 (as torch's norm gradient).
// Returns the number of valid entries; NaN targets count in `malformed`.
template <typename acc_t>
MTL_HD int normals_pixel(const acc_t (&p)[3], const acc_t (&t)[3], acc_t& loss, acc_t (&grad)[3], int& malformed) {
  const acc_t norm = sqrt_acc(p[0] * p[0] + p[1] * p[1] + p[2] * p[2]);
  const acc_t n = norm + acc_t(1e-12);
  acc_t g[3], dot = 0;
  int count = 0;
  loss = 0;
  for (int k = 0; k < 3; ++k) {
    const bool valid = t[k] != acc_t(kIgnoreIndex) && t[k] == t[k];
    malformed += t[k] != t[k];
    const acc_t d = p[k] / n - t[k];
    g[k] = valid ? sign_of(d) : acc_t(0);
    loss += valid ? (d < acc_t(0) ? -d : d) : acc_t(0);
    count += valid;
    dot += g[k] * p[k];
  }
  // (dot / norm first: norm * n * n underflows to 0 for |p| below about 1e-21 in float)
  const acc_t c = norm > acc_t(0) ? dot / norm / (n * n) : acc_t(0);
  for (int k = 0; k < 3; ++k) grad[k] = g[k] / n - p[k] * c;
  return count;
}

}  // namespace mtl_kernels
