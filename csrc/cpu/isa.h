// Which x86 instruction set the CPU kernels' inner loops run with. Kernels
// compile their row loops three times (baseline x86-64 = SSE2, AVX2,
// AVX-512), each inside a namespace under a `#pragma GCC target` of its own,
// and pick one at run time with best_isa(): on the dev machine the
// polynomial exp and the divisions ran 8x faster per element with AVX-512
// than with SSE2.
#pragma once

namespace mtl_kernels {

enum class Isa { kBase, kAvx2, kAvx512 };

inline Isa best_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    // f16c: the fp16 conversions (every AVX2 CPU has it)
    const bool f16c = __builtin_cpu_supports("f16c");
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") && f16c)
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) return Isa::kAvx2;
    return Isa::kBase;
  }();
  return isa;
}

}  // namespace mtl_kernels
