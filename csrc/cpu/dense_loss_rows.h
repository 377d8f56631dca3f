// dense_loss's per-tile loops (see cpu/dense_loss.cpp). No include guard on
// purpose: dense_loss.cpp includes this once per instruction set, inside a
// namespace and a `#pragma GCC target` region of its own (cpu/isa.h).

#include "cpu/vec_math.h"

// float math through the vectorisable polynomials, double through libm.
__attribute__((always_inline)) inline float exp_acc(float x) { return exp_vec(x); }
__attribute__((always_inline)) inline float log_acc(float x) { return log_vec(x); }
__attribute__((always_inline)) inline float log1p_acc(float x) { return log1p_vec(x); }
inline double exp_acc(double x) { return std::exp(x); }
inline double log_acc(double x) { return std::log(x); }
inline double log1p_acc(double x) { return std::log1p(x); }

// Cross-entropy over n <= kTile pixels of one image: x and g point at the
// tile's first pixel (channel c at c * sC, pixel k at k * sP, sP == 1 when
// kUnit), t at its first label. Three sweeps over the tile, channel-outer so
// the pixel loops vectorise: running max, exp and its sum, then the gradient
// softmax - onehot written once.
template <bool kUnit, typename scalar_t, typename acc_t>
Partial ce_tile(const scalar_t* __restrict x, const int64_t* __restrict t, scalar_t* __restrict g, int64_t n,
                int64_t C, int64_t sC, int64_t sP) {
  const int64_t step = kUnit ? 1 : sP;
  acc_t m[kTile], s[kTile];
  int64_t cls[kTile];
  Partial part;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t label = t[k];
    const bool valid = label != kIgnoreIndex, in_range = label >= 0 && label < C;
    part.bad += valid && !in_range;
    part.count += valid && in_range;
    cls[k] = valid && in_range ? label : -1;
    m[k] = -std::numeric_limits<acc_t>::infinity();
    s[k] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * sC;
    for (int64_t k = 0; k < n; ++k) m[k] = std::max(m[k], static_cast<acc_t>(row[k * step]));
  }
  // exp(x - max) once per element, kept in a per-thread scratch tile (cache-resident) for the
  // gradient sweep: a second exp per element cost more than the scratch traffic.
  thread_local std::vector<acc_t> scratch;
  if (int64_t(scratch.size()) < C * kTile) scratch.resize(C * kTile);
  acc_t* __restrict e = scratch.data();
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = x + c * sC;
    acc_t* erow = e + c * kTile;
    for (int64_t k = 0; k < n; ++k) {
      erow[k] = exp_acc(static_cast<acc_t>(row[k * step]) - m[k]);
      s[k] += erow[k];
    }
  }
  acc_t sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (cls[k] >= 0) sum += m[k] + log_acc(s[k]) - static_cast<acc_t>(x[cls[k] * sC + k * step]);
    s[k] = cls[k] >= 0 ? acc_t(1) / s[k] : acc_t(0);  // ignored pixels: gradient exactly 0
  }
  for (int64_t c = 0; c < C; ++c) {
    const acc_t* erow = e + c * kTile;
    scalar_t* grow = g + c * sC;
    for (int64_t k = 0; k < n; ++k) grow[k * step] = static_cast<scalar_t>(erow[k] * s[k] - acc_t(cls[k] == c));
  }
  part.sum = sum;
  return part;
}

// A flat tile of reduced-precision x (bf16, fp16): widened into a cache-resident
// acc_t copy, run through the acc_t loop, its gradient narrowed into g. GCC did
// not vectorise the one mixed-width loop (it picked 32 x 16-bit lanes, and
// found no 32-lane float vector for the target): bf16 BCE ran 7x slower than fp32.
template <typename scalar_t, typename F>
Partial widened(const scalar_t* __restrict x, scalar_t* __restrict g, int64_t n, const F& tile) {
  using acc_t = at::opmath_type<scalar_t>;
  alignas(64) acc_t xa[kFlatTile], ga[kFlatTile];
  for (int64_t k = 0; k < n; ++k) xa[k] = static_cast<acc_t>(x[k]);
  const Partial part = tile(xa, ga);
  for (int64_t k = 0; k < n; ++k) g[k] = static_cast<scalar_t>(ga[k]);
  return part;
}

// L1 over n elements laid out alike in x, t and g.
template <typename scalar_t, typename acc_t>
Partial l1_tile(const scalar_t* __restrict x, const acc_t* __restrict t, scalar_t* __restrict g, int64_t n,
                int64_t invalid) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return widened(x, g, n, [&](const acc_t* xa, acc_t* ga) { return l1_tile<acc_t, acc_t>(xa, t, ga, n, invalid); });
  } else {
    acc_t sum = 0, count = 0, bad = 0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t tv = t[k], d = x[k] - tv;
      const bool valid = l1_valid(tv, invalid);
      bad += l1_malformed(tv, invalid);
      count += valid;
      sum += valid ? std::abs(d) : acc_t(0);
      g[k] = valid ? sign_of(d) : acc_t(0);
    }
    return {double(sum), double(count), double(bad)};
  }
}

// Balanced BCE over n elements laid out alike in x, t and g; every element counts.
template <typename scalar_t, typename acc_t>
Partial bce_tile(const scalar_t* __restrict x, const acc_t* __restrict t, scalar_t* __restrict g, int64_t n,
                 acc_t w) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return widened(x, g, n, [&](const acc_t* xa, acc_t* ga) { return bce_tile<acc_t, acc_t>(xa, t, ga, n, w); });
  } else {
    acc_t sum = 0, bad = 0;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t xv = x[k], tv = t[k];
      const acc_t z = exp_acc(-std::abs(xv));
      acc_t loss, grad;
      bce_term(xv, tv, w, z, log1p_acc(z), loss, grad);
      bad += tv != tv;
      sum += loss;
      g[k] = grad;
    }
    return {double(sum), double(n), double(bad)};
  }
}

// Normals over n <= kTile pixels of one image, laid out as in ce_tile; the
// target t has x's pixel step and channel stride tsC.
template <bool kUnit, typename scalar_t, typename acc_t>
Partial normals_tile(const scalar_t* __restrict x, const acc_t* __restrict t, scalar_t* __restrict g, int64_t n,
                     int64_t sC, int64_t sP, int64_t tsC) {
  const int64_t step = kUnit ? 1 : sP;
  acc_t sum = 0, count = 0, bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    acc_t p[3], tv[3], grad[3], loss;
    for (int c = 0; c < 3; ++c) {
      p[c] = static_cast<acc_t>(x[c * sC + k * step]);
      tv[c] = t[c * tsC + k * step];
    }
    int malformed = 0;
    count += normals_pixel(p, tv, loss, grad, malformed);
    bad += malformed;
    sum += loss;
    for (int c = 0; c < 3; ++c) g[c * sC + k * step] = static_cast<scalar_t>(grad[c]);
  }
  return {double(sum), double(count), double(bad)};
}
