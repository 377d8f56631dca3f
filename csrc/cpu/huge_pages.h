// Fresh CPU outputs of tens of MB come from mmap, and first touching them
// costs one page fault per 4 KiB page: on the dev machine that was 12 ms for
// a 39 MB tensor against 3 ms when the kernel may back it with 2 MiB pages
// (transparent huge pages in "madvise" mode). Ask for that before writing.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace mtl_kernels {

// Advises the whole storage under t (t may be a slice of it, as the gradients
// gate_sum_backward_out writes into are).
inline void prefer_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!t.has_storage() || t.storage().data() == nullptr) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.storage().nbytes()) & ~(kHuge - 1);
  // Only whole huge pages inside the buffer; a refusal (THP off) just leaves 4 KiB pages.
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace mtl_kernels
