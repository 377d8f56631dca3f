// Streaming (non-temporal) stores for outputs too large to stay in cache. A
// plain store first reads the line it writes (read-for-ownership); a streaming
// store does not, so a loop that reads two arrays and writes one moves three
// arrays' worth of memory instead of four. On the dev machine such a loop ran
// 1.4x faster with 2 threads, but only when each store burst was short: the
// rows compute a chunk of at most kStreamChunk elements into an L1 buffer and
// stream it out at once (bursts of 2 KiB or more lost the gain).
//
// No include guard on purpose: included by the *_rows.h headers, once per
// instruction set (MTL_ISA is 0, 1 or 2: SSE2, AVX2, AVX-512; see
// cpu/isa_variants.h); <immintrin.h>, <algorithm> and <cstring> must come
// first. Streaming is for AVX2 and AVX-512 only (stream_bytes copies plainly
// under SSE2, where the callers do not stream).

constexpr int64_t kStreamChunk = 128;  // elements staged per burst

// Copies `bytes` from src (the L1 staging buffer) to dst: plain stores up to
// dst's first vector-aligned address and after its last, streaming stores
// between. Call stream_fence() before another thread reads dst.
inline void stream_bytes(void* dst, const void* src, int64_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#if defined(__x86_64__) && MTL_ISA > 0  // the callers stream with AVX2 or AVX-512 only
  constexpr int64_t kVec = MTL_ISA == 2 ? 64 : 32;
  const int64_t head = std::min<int64_t>((-reinterpret_cast<intptr_t>(d)) & (kVec - 1), bytes);
  std::memcpy(d, s, head);
  d += head, s += head, bytes -= head;
  for (; bytes >= kVec; bytes -= kVec, d += kVec, s += kVec) {
#if MTL_ISA == 2
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), _mm512_loadu_si512(s));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#endif
  }
#endif
  std::memcpy(d, s, bytes);
}

// Orders this thread's streaming stores before its later stores (the end of
// a parallel task that other threads then read the output of).
inline void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}
