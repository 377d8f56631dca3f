// Compiles the header named by MTL_ISA_ROWS three times, into namespaces
// isa_base (baseline x86-64 = SSE2), isa_avx2 and isa_avx512, each under its
// own `#pragma GCC target`; best_isa() (cpu/isa.h) picks one at run time.
// Usage: #define MTL_ISA_ROWS "cpu/<op>_rows.h", then include this file where
// the namespaces belong. No include guard on purpose. Inside, MTL_ISA says
// which one is being compiled (0, 1, 2): GCC's #pragma target does not set
// __AVX2__ or __AVX512F__.
#define MTL_ISA 0
namespace isa_base {
#include MTL_ISA_ROWS
}  // namespace isa_base
#undef MTL_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define MTL_ISA 1
namespace isa_avx2 {
#include MTL_ISA_ROWS
}  // namespace isa_avx2
#undef MTL_ISA
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")
#define MTL_ISA 2
namespace isa_avx512 {
#include MTL_ISA_ROWS
}  // namespace isa_avx512
#undef MTL_ISA
#pragma GCC pop_options
#undef MTL_ISA_ROWS
