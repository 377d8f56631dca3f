// gate_sum's per-row loops (see cpu/gate_sum.cpp). No include guard on
// purpose: gate_sum.cpp includes this once per instruction set, inside a
// namespace and a `#pragma GCC target` region of its own.

#include "cpu/vec_math.h"
#include "cpu/stream_store.h"

__attribute__((always_inline)) inline float sigmoid(float x) { return 1.0f / (1.0f + exp_vec(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }  // exp(-x) = inf gives 0, no NaN

// One row of one pair, forward: dst[k] = src[k] + f[k] * sigmoid(g[k] * scale + shift),
// src = nullptr adding nothing. dst and src are the running sum (acc_t) or the
// residual and output rows (scalar_t), and may be the same array. kVec:
// scale/shift vary along the row (channels_last) or not (NCHW); the
// unit-stride case is its own loop so that it vectorises.
template <bool kVec, typename D, typename S, typename scalar_t, typename acc_t>
inline void gate_row(D* dst, const S* src, int64_t n, const scalar_t* __restrict f, int64_t fs,
                     const scalar_t* __restrict g, int64_t gs, const acc_t* sc, const acc_t* sh) {
  // always_inline: a lambda left out of line is a call per element (seen once a second
  // instantiation of the callers made GCC stop inlining it: the forward ran 8x slower)
  auto term = [&](int64_t k, int64_t fk, int64_t gk) __attribute__((always_inline)) {
    const acc_t a = kVec ? sc[k] : sc[0], b = kVec ? sh[k] : sh[0];
    return static_cast<acc_t>(f[fk]) * sigmoid(static_cast<acc_t>(g[gk]) * a + b);
  };
  auto base = [&](int64_t k) __attribute__((always_inline)) { return src ? static_cast<acc_t>(src[k]) : acc_t(0); };
  if (fs == 1 && gs == 1 && src)
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(static_cast<acc_t>(src[k]) + term(k, k, k));
  else if (fs == 1 && gs == 1)
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(term(k, k, k));
  else
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(base(k) + term(k, k * fs, k * gs));
}

// bf16 and fp16 rows run through float copies of a chunk (the *_widened
// functions): GCC does not vectorise a loop that mixes 16- and 32-bit lanes
// with the sigmoid (single-threaded, the fp16 forward ran 10x slower than
// fp32's, bf16 1.2x), but it does vectorise plain conversion loops.
template <typename D, typename S>
inline void convert_row(D* __restrict dst, int64_t dst_step, const S* __restrict src, int64_t src_step, int64_t n) {
  if (dst_step == 1 && src_step == 1)
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<D>(src[k]);
  else
    for (int64_t k = 0; k < n; ++k) dst[k * dst_step] = static_cast<D>(src[k * src_step]);
}

// bf16 <-> float by bits, branch-free so the loops vectorise: float to bf16
// rounds to nearest even, NaN to 0x7FC0, as c10::BFloat16 does.
inline void convert_row(float* __restrict dst, int64_t dst_step, const c10::BFloat16* __restrict src,
                        int64_t src_step, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = uint32_t(src[k * src_step].x) << 16;
    std::memcpy(dst + k * dst_step, &bits, sizeof bits);
  }
}
inline void convert_row(c10::BFloat16* __restrict dst, int64_t dst_step, const float* __restrict src,
                        int64_t src_step, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float v = src[k * src_step];
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    dst[k * dst_step].x = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
}
#if MTL_ISA > 0
// fp16 <-> float with F16C's conversions (c10::Half's own use them only when
// the whole build has -mf16c); both round to nearest even.
inline void convert_row(float* __restrict dst, int64_t dst_step, const c10::Half* __restrict src, int64_t src_step,
                        int64_t n) {
  int64_t k = 0;
  if (dst_step == 1 && src_step == 1)
    for (; k + 8 <= n; k += 8)
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  for (; k < n; ++k) dst[k * dst_step] = static_cast<float>(src[k * src_step]);
}
inline void convert_row(c10::Half* __restrict dst, int64_t dst_step, const float* __restrict src, int64_t src_step,
                        int64_t n) {
  int64_t k = 0;
  if (dst_step == 1 && src_step == 1)
    for (; k + 8 <= n; k += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
  for (; k < n; ++k) dst[k * dst_step] = static_cast<c10::Half>(src[k * src_step]);
}
#endif

template <bool kVec, bool kStream, typename scalar_t, typename acc_t>
inline void output_row_widened(scalar_t* __restrict out, const scalar_t* __restrict res, int64_t n, int64_t pairs,
                               const scalar_t* const* f, const int64_t* fs, const scalar_t* const* g,
                               const int64_t* gs, const acc_t* sc, const acc_t* sh) {
  constexpr int64_t kChunk = kStream ? kStreamChunk : 512;
  acc_t acc[kChunk], wide_f[kChunk], wide_g[kChunk];
  scalar_t narrow[kChunk];
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t m = std::min(kChunk, n - k0);
    if (res)
      convert_row(acc, 1, res + k0, 1, m);
    else
      std::fill(acc, acc + m, acc_t(0));
    for (int64_t p = 0; p < pairs; ++p) {
      convert_row(wide_f, 1, f[p] + k0 * fs[p], fs[p], m);
      convert_row(wide_g, 1, g[p] + k0 * gs[p], gs[p], m);
      gate_row<kVec>(acc, static_cast<const acc_t*>(acc), m, static_cast<const acc_t*>(wide_f), 1,
                     static_cast<const acc_t*>(wide_g), 1, kVec ? sc + k0 : sc, kVec ? sh + k0 : sh);
    }
    if constexpr (kStream) {
      convert_row(narrow, 1, acc, 1, m);
      stream_bytes(out + k0, narrow, m * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      convert_row(out + k0, 1, acc, 1, m);
    }
  }
}

// One output row, forward: out[k] = res[k] (0 without residual) + sum over its
// pairs p of f[p][k] * sigmoid(g[p][k] * scale + shift). out and res are dense
// along the row. The row goes in chunks so that the running sum stays in L1;
// the first pair reads the residual and the last writes the output, so each
// element of memory is touched once. kStream: the last pair writes a staging
// chunk that streaming stores copy out (see cpu/stream_store.h).
template <bool kVec, bool kStream, typename scalar_t, typename acc_t>
inline void output_row(scalar_t* __restrict out, const scalar_t* __restrict res, int64_t n, int64_t pairs,
                       const scalar_t* const* f, const int64_t* fs, const scalar_t* const* g, const int64_t* gs,
                       const acc_t* sc, const acc_t* sh) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return output_row_widened<kVec, kStream>(out, res, n, pairs, f, fs, g, gs, sc, sh);
  }
  constexpr int64_t kChunk = kStream ? kStreamChunk : 512;
  acc_t acc[kChunk];
  scalar_t staged[kStream ? kChunk : 1];
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t m = std::min(kChunk, n - k0);
    const scalar_t* r = res ? res + k0 : nullptr;
    scalar_t* o = kStream ? staged : out + k0;
    if (pairs == 0)
      for (int64_t k = 0; k < m; ++k) o[k] = r ? r[k] : scalar_t(0);
    for (int64_t p = 0; p < pairs; ++p) {
      const scalar_t *fp = f[p] + k0 * fs[p], *gp = g[p] + k0 * gs[p];
      const acc_t *a = kVec ? sc + k0 : sc, *b = kVec ? sh + k0 : sh;
      const bool first = p == 0, last = p == pairs - 1;
      if (first && last)
        gate_row<kVec>(o, r, m, fp, fs[p], gp, gs[p], a, b);
      else if (first)
        gate_row<kVec>(acc, r, m, fp, fs[p], gp, gs[p], a, b);
      else if (last)
        gate_row<kVec>(o, static_cast<const acc_t*>(acc), m, fp, fs[p], gp, gs[p], a, b);
      else
        gate_row<kVec>(acc, static_cast<const acc_t*>(acc), m, fp, fs[p], gp, gs[p], a, b);
    }
    if constexpr (kStream) stream_bytes(out + k0, staged, m * static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// One row of one pair, backward: grad_feat = g_out * s, grad_gate = d * scale
// with d = g_out * f * s (1 - s) the gradient of the gate's affine; when kSums,
// also sum d and d * gate per channel (into sums[k] / sums[width + k] along a
// channels_last row, into lanes then sums[0] / sums[1] for an NCHW row).
template <bool kVec, bool kSums, bool kStream, typename scalar_t, typename acc_t>
inline void gate_row_backward_widened(int64_t n, const scalar_t* go, const scalar_t* f, const scalar_t* g,
                                      scalar_t* gf, scalar_t* gg, const int64_t* st, const acc_t* sc,
                                      const acc_t* sh, acc_t* sums, int64_t width);

template <bool kVec, bool kSums, typename scalar_t, typename acc_t>
inline void gate_row_backward(int64_t n, const scalar_t* __restrict go, const scalar_t* __restrict f,
                              const scalar_t* __restrict g, scalar_t* __restrict gf, scalar_t* __restrict gg,
                              const int64_t* st, const acc_t* sc, const acc_t* sh, acc_t* sums,
                              int64_t width) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return gate_row_backward_widened<kVec, kSums, false>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
  }
  constexpr int64_t kLanes = 8;
  acc_t l1[kLanes] = {}, l2[kLanes] = {};
  // lane: where this element's sums go (its channel's slot, or an NCHW row's lane)
  auto body = [&](int64_t k, int64_t fs, int64_t gs, int64_t gfs, int64_t ggs,
                  int64_t lane) __attribute__((always_inline)) {  // always_inline: see gate_row
    const acc_t a = kVec ? sc[k] : sc[0], b = kVec ? sh[k] : sh[0];
    const acc_t gout = static_cast<acc_t>(go[k]), gate = static_cast<acc_t>(g[k * gs]);
    const acc_t sgm = sigmoid(gate * a + b);
    const acc_t d = gout * static_cast<acc_t>(f[k * fs]) * sgm * (acc_t(1) - sgm);
    gf[k * gfs] = static_cast<scalar_t>(gout * sgm);
    gg[k * ggs] = static_cast<scalar_t>(d * a);
    if constexpr (kSums && kVec) {
      sums[lane] += d;
      sums[width + lane] += d * gate;
    } else if constexpr (kSums) {
      l1[lane] += d;
      l2[lane] += d * gate;
    }
  };
  const bool unit = st[0] == 1 && st[1] == 1 && st[2] == 1 && st[3] == 1;
  if constexpr (kVec) {  // per-element channels: independent sums
    if (unit)
      for (int64_t k = 0; k < n; ++k) body(k, 1, 1, 1, 1, k);
    else
      for (int64_t k = 0; k < n; ++k) body(k, st[0], st[1], st[2], st[3], k);
  } else {
    int64_t k = 0;
    if (unit && !kSums)
      for (; k < n; ++k) body(k, 1, 1, 1, 1, 0);
    else if (unit)
      for (; k + kLanes <= n; k += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) body(k + l, 1, 1, 1, 1, l);
    for (; k < n; ++k) body(k, st[0], st[1], st[2], st[3], 0);
    if constexpr (kSums)
      for (int64_t l = 0; l < kLanes; ++l) sums[0] += l1[l], sums[1] += l2[l];
  }
}

// gate_row_backward with gf and gg dense along the row (unit steps), written
// by streaming stores: each chunk goes through L1 staging buffers.
template <bool kVec, bool kSums, typename scalar_t, typename acc_t>
inline void gate_row_backward_streamed(int64_t n, const scalar_t* go, const scalar_t* f, const scalar_t* g,
                                       scalar_t* gf, scalar_t* gg, const int64_t* st, const acc_t* sc,
                                       const acc_t* sh, acc_t* sums, int64_t width) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    return gate_row_backward_widened<kVec, kSums, true>(n, go, f, g, gf, gg, st, sc, sh, sums, width);
  }
  scalar_t staged_f[kStreamChunk], staged_g[kStreamChunk];
  const int64_t staged_st[4] = {st[0], st[1], 1, 1};
  for (int64_t k0 = 0; k0 < n; k0 += kStreamChunk) {
    const int64_t m = std::min(kStreamChunk, n - k0);
    // per-element channels (channels_last) and their sums start at k0
    const int64_t c0 = kVec ? k0 : 0;
    gate_row_backward<kVec, kSums>(m, go + k0, f + k0 * st[0], g + k0 * st[1], staged_f, staged_g, staged_st,
                                   sc + c0, sh + c0, kSums ? sums + c0 : sums, width);
    stream_bytes(gf + k0, staged_f, m * static_cast<int64_t>(sizeof(scalar_t)));
    stream_bytes(gg + k0, staged_g, m * static_cast<int64_t>(sizeof(scalar_t)));
  }
}

// gate_row_backward for bf16/fp16 rows: go, f and g widened chunk by chunk,
// the float loop, the two gradients narrowed (kStream: and streamed out; the
// caller has checked that gf and gg are dense along the row).
template <bool kVec, bool kSums, bool kStream, typename scalar_t, typename acc_t>
inline void gate_row_backward_widened(int64_t n, const scalar_t* go, const scalar_t* f, const scalar_t* g,
                                      scalar_t* gf, scalar_t* gg, const int64_t* st, const acc_t* sc,
                                      const acc_t* sh, acc_t* sums, int64_t width) {
  constexpr int64_t kChunk = kStream ? kStreamChunk : 512;
  acc_t wide_go[kChunk], wide_f[kChunk], wide_g[kChunk], wide_gf[kChunk], wide_gg[kChunk];
  scalar_t narrow_f[kStream ? kChunk : 1], narrow_g[kStream ? kChunk : 1];
  const int64_t unit[4] = {1, 1, 1, 1};
  for (int64_t k0 = 0; k0 < n; k0 += kChunk) {
    const int64_t m = std::min(kChunk, n - k0);
    convert_row(wide_go, 1, go + k0, 1, m);
    convert_row(wide_f, 1, f + k0 * st[0], st[0], m);
    convert_row(wide_g, 1, g + k0 * st[1], st[1], m);
    const int64_t c0 = kVec ? k0 : 0;  // per-element channels (channels_last) and their sums start at k0
    gate_row_backward<kVec, kSums>(m, static_cast<const acc_t*>(wide_go), static_cast<const acc_t*>(wide_f),
                                   static_cast<const acc_t*>(wide_g), wide_gf, wide_gg, unit, sc + c0, sh + c0,
                                   kSums ? sums + c0 : sums, width);
    if constexpr (kStream) {
      convert_row(narrow_f, 1, wide_gf, 1, m);
      convert_row(narrow_g, 1, wide_gg, 1, m);
      stream_bytes(gf + k0, narrow_f, m * static_cast<int64_t>(sizeof(scalar_t)));
      stream_bytes(gg + k0, narrow_g, m * static_cast<int64_t>(sizeof(scalar_t)));
    } else {
      convert_row(gf + k0 * st[2], st[2], wide_gf, 1, m);
      convert_row(gg + k0 * st[3], st[3], wide_gg, 1, m);
    }
  }
}
