// CUDA kernels of gram and combine (schemas in csrc/ops.cpp, definitions in
// mtl_kernels/reference/gram.py and combine.py), multi-tensor in the manner of
// apex's multi_tensor_apply: the T tasks' gradient pointers of up to kMaxL
// tensors travel in the kernel's parameters (sm_90 takes 32 KB of them), each
// block takes one chunk of one tensor and reads that chunk of every task once.
// gram: each thread keeps its T(T+1)/2 pair sums in registers (T a template
// parameter), the block reduces them into its own slot of a partial buffer,
// and at::sum adds the slots: deterministic. combine: out = (out +) sum_t w_t g_t
// elementwise, the weights read from device memory (no host read-back).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "common/multi_tensor.h"

namespace mtl_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int64_t kChunk = int64_t(kThreads) * kPerThread;  // elements per block
constexpr int kMaxT = 8;                                     // tasks
constexpr int kMaxL = 32;                                    // tensors per launch

template <typename scalar_t, typename out_t = scalar_t>
struct Group {  // up to kMaxL tensors of one dtype (out: of one dtype too); block b works on tensor l
                // with first[l] <= b < first[l + 1]
  const scalar_t* g[kMaxT][kMaxL];
  out_t* out[kMaxL];
  int64_t numel[kMaxL];
  int32_t first[kMaxL + 1];
  int n;
};

template <typename G>
__device__ __forceinline__ int find_tensor(const G& grp, int block) {
  int l = 0;
  while (l + 1 < grp.n && grp.first[l + 1] <= block) ++l;
  return l;
}

template <int T, typename scalar_t>
__global__ void __launch_bounds__(kThreads) gram_kernel(const __grid_constant__ Group<scalar_t> grp,
                                                        double* __restrict part) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPairs = T * (T + 1) / 2;
  const int l = find_tensor(grp, blockIdx.x);
  const int64_t base = int64_t(blockIdx.x - grp.first[l]) * kChunk;
  acc_t sums[kPairs] = {};
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;  // coalesced
    if (i >= grp.numel[l]) break;
    acc_t x[T];
#pragma unroll
    for (int t = 0; t < T; ++t) x[t] = static_cast<acc_t>(grp.g[t][l][i]);
    int p = 0;
#pragma unroll
    for (int s = 0; s < T; ++s)
#pragma unroll
      for (int t = s; t < T; ++t) sums[p++] += x[s] * x[t];
  }
  __shared__ double smem[kPairs][kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int p = 0; p < kPairs; ++p) {
    double v = sums[p];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) smem[p][warp] = v;
  }
  __syncthreads();
  for (int p = threadIdx.x; p < kPairs; p += kThreads) {
    double v = 0;
    for (int w = 0; w < kThreads / 32; ++w) v += smem[p][w];
    part[int64_t(blockIdx.x) * kPairs + p] = v;
  }
}

template <int T, typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ Group<scalar_t, out_t> grp,
                                                           const at::opmath_type<scalar_t>* __restrict w,
                                                           bool accumulate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int l = find_tensor(grp, blockIdx.x);
  const int64_t base = int64_t(blockIdx.x - grp.first[l]) * kChunk;
  acc_t wt[T];
#pragma unroll
  for (int t = 0; t < T; ++t) wt[t] = w[t];
  for (int r = 0; r < kPerThread; ++r) {
    const int64_t i = base + int64_t(r) * kThreads + threadIdx.x;
    if (i >= grp.numel[l]) break;
    acc_t acc = accumulate ? static_cast<acc_t>(grp.out[l][i]) : acc_t(0);
#pragma unroll
    for (int t = 0; t < T; ++t) acc += wt[t] * static_cast<acc_t>(grp.g[t][l][i]);
    grp.out[l][i] = static_cast<out_t>(acc);
  }
}

// Calls fn(group, blocks) for consecutive runs of tensors of one dtype, at most kMaxL each.
template <typename scalar_t, typename out_t = scalar_t, typename Fn>
void for_each_group(at::TensorList grads, at::TensorList out, int64_t T, int64_t K, const std::vector<int64_t>& ks,
                    Fn fn) {
  Group<scalar_t, out_t> grp{};
  int32_t blocks = 0;
  auto flush = [&] {
    if (grp.n == 0) return;
    grp.first[grp.n] = blocks;
    fn(grp, blocks);
    grp = Group<scalar_t, out_t>{};
    blocks = 0;
  };
  for (const int64_t k : ks) {
    const int64_t n = grads[k].numel();
    if (n == 0) continue;
    const int l = grp.n++;
    for (int64_t t = 0; t < T; ++t) grp.g[t][l] = grads[t * K + k].const_data_ptr<scalar_t>();
    grp.out[l] = out.empty() ? nullptr : out[k].mutable_data_ptr<out_t>();
    grp.numel[l] = n;
    grp.first[l] = blocks;
    const int64_t b = (n + kChunk - 1) / kChunk;
    TORCH_CHECK(int64_t(blocks) + b < INT32_MAX, "gram/combine: tensor too large");
    blocks += int32_t(b);
    if (grp.n == kMaxL) flush();
  }
  flush();
}

// The tensor indices of each dtype (each pair of the gradients' and out's dtypes), in order.
using DtypePair = std::pair<at::ScalarType, at::ScalarType>;
std::vector<std::pair<DtypePair, std::vector<int64_t>>> by_dtype(at::TensorList grads, at::TensorList out, int64_t K) {
  std::vector<std::pair<DtypePair, std::vector<int64_t>>> groups;
  for (int64_t k = 0; k < K; ++k) {
    const DtypePair dt{grads[k].scalar_type(), out.empty() ? grads[k].scalar_type() : out[k].scalar_type()};
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == dt; });
    if (it == groups.end()) groups.push_back({dt, {k}});
    else it->second.push_back(k);
  }
  return groups;
}

template <int T>
void gram_launch(at::TensorList grads, int64_t K, at::Tensor& G, DtypePair dt, const std::vector<int64_t>& ks) {
  constexpr int kPairs = T * (T + 1) / 2;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.first, "gram_cuda", [&] {
    for_each_group<scalar_t>(grads, {}, T, K, ks, [&](const Group<scalar_t>& grp, int32_t blocks) {
      at::Tensor part = at::empty({blocks, kPairs}, G.options());
      gram_kernel<T, scalar_t><<<blocks, kThreads, 0, stream>>>(grp, part.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      G.add_(part.sum(0));
    });
  });
}

template <int T>
void combine_launch(const at::Tensor& w, at::TensorList grads, at::TensorList out, int64_t K, bool accumulate,
                    DtypePair dt, const std::vector<int64_t>& ks) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.first, "combine_cuda", [&] {
    using in_t = scalar_t;
    using acc_t = at::opmath_type<in_t>;
    const at::Tensor wa = w.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    // out keeps its own dtype (float32 .grad of bfloat16 task gradients, say), as on the CPU.
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.second, "combine_cuda_out", [&] {
      using out_t = scalar_t;
      for_each_group<in_t, out_t>(grads, out, T, K, ks, [&](const Group<in_t, out_t>& grp, int32_t blocks) {
        combine_kernel<T, in_t, out_t><<<blocks, kThreads, 0, stream>>>(grp, wa.const_data_ptr<acc_t>(), accumulate);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

// Calls F<T>::run(args...) for the runtime T in 1..kMaxT.
template <template <int> class F, typename... Args>
void with_tasks(int64_t T, Args&&... args) {
  switch (T) {
    case 1: return F<1>::run(args...);
    case 2: return F<2>::run(args...);
    case 3: return F<3>::run(args...);
    case 4: return F<4>::run(args...);
    case 5: return F<5>::run(args...);
    case 6: return F<6>::run(args...);
    case 7: return F<7>::run(args...);
    case 8: return F<8>::run(args...);
    default: TORCH_CHECK(false, "gram/combine: the cuda backend takes 1 to ", kMaxT, " tasks, got ", T);
  }
}
template <int T>
struct GramRun {
  template <typename... A>
  static void run(A&&... a) { gram_launch<T>(a...); }
};
template <int T>
struct CombineRun {
  template <typename... A>
  static void run(A&&... a) { combine_launch<T>(a...); }
};

at::Tensor gram_cuda(at::TensorList grads, int64_t T) {
  const int64_t K = check_task_major("gram", grads, T);
  TORCH_CHECK(T <= kMaxT, "gram: the cuda backend takes 1 to ", kMaxT, " tasks, got ", T);
  const at::cuda::OptionalCUDAGuard guard(grads[0].device());
  const int64_t pairs = T * (T + 1) / 2;
  at::Tensor packed = at::zeros({pairs}, grads[0].options().dtype(at::kDouble));
  bool any_double = false;
  for (const auto& [dt, ks] : by_dtype(grads, {}, K)) {
    any_double |= dt.first == at::kDouble;
    with_tasks<GramRun>(T, grads, K, packed, dt, ks);
  }
  // packed upper triangle -> symmetric [T, T]. triu_indices is built on the device, in the
  // packed order (s outer, t >= s inner): at::tensor of host vectors would synchronise.
  const at::Tensor idx = at::triu_indices(T, T, 0, grads[0].options().dtype(at::kLong));
  at::Tensor G = at::zeros({T, T}, packed.options());
  G.index_put_({idx[0], idx[1]}, packed);
  G.index_put_({idx[1], idx[0]}, packed);
  return G.to(any_double ? at::kDouble : at::kFloat);
}

void combine_cuda(const at::Tensor& weights, at::TensorList grads, at::TensorList out, bool accumulate) {
  const int64_t T = weights.numel();
  const int64_t K = check_task_major("combine", grads, T);
  TORCH_CHECK(T <= kMaxT, "combine: the cuda backend takes 1 to ", kMaxT, " tasks, got ", T);
  TORCH_CHECK(int64_t(out.size()) == K, "combine: out must hold one tensor per gradient (", K, "), got ", out.size());
  for (int64_t k = 0; k < K; ++k)
    TORCH_CHECK(out[k].sizes() == grads[k].sizes() && out[k].is_contiguous() && out[k].is_floating_point() &&
                    out[k].device() == grads[k].device(),
                "combine: out[", k, "] must be a contiguous floating-point tensor with grads[0][", k,
                "]'s shape and device");
  TORCH_CHECK(weights.device() == grads[0].device(), "combine: weights must be on the gradients' device");
  const at::cuda::OptionalCUDAGuard guard(grads[0].device());
  for (const auto& [dt, ks] : by_dtype(grads, out, K))
    with_tasks<CombineRun>(T, weights, grads, out, K, accumulate, dt, ks);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("combine", &combine_cuda);
}

}  // namespace mtl_kernels
