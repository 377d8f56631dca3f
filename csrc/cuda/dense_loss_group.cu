// CUDA kernels of dense_loss_group (schema in csrc/ops.cpp): the dense losses
// of every task of a batch in one launch, and their backward in one more.
//
// The tasks travel as kernel arguments (pointers, sizes and strides, no copy
// to the device), as apex's multi_tensor_apply passes its tensor lists. Each
// task owns a contiguous range of blocks; a block finds its task by a scan of
// the (at most kMaxTasks) ranges and runs that task's item of
// cuda/dense_loss_terms.cuh for each of its threads, the same items as the
// one-task kernels of dense_loss.cu. The kind is uniform within a block, so
// the switch never diverges a warp. The blocks' partial sums are added per
// task by a second small kernel, one block per task, in a fixed order:
// deterministic. More than kMaxTasks tasks take more launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/dense_loss.h"
#include "common/dense_loss_args.h"
#include "cuda/dense_loss_terms.cuh"

namespace mtl_kernels {
namespace {

constexpr int kThreads = kLossThreads;
constexpr int kMaxTasks = 16;  // 16 tasks of 104 bytes: well inside the 4 KB of kernel arguments

struct LossTask {
  const void* x;
  const void* target;
  void* grad;
  const double* pos_weight;
  double* stats;  // the task's (sum, count, malformed)
  int64_t kind, items, C, first_block;
  Pixels px;
};

// Tasks as kernel arguments, task t owning blocks [task[t].first_block, end_block(t)).
template <typename Task>
struct TaskList {
  Task task[kMaxTasks];
  int tasks;
  int64_t blocks;

  // The task whose range holds block b.
  __device__ int task_of(int64_t b) const {
    int t = 0;
    while (t + 1 < tasks && b >= task[t + 1].first_block) ++t;
    return t;
  }
  __device__ int64_t end_block(int t) const { return t + 1 < tasks ? task[t + 1].first_block : blocks; }
};

struct LossTasks : TaskList<LossTask> {
  int64_t invalid;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) group_loss_kernel(const LossTasks tasks, double* __restrict part) {
  const LossTask& task = tasks.task[tasks.task_of(blockIdx.x)];
  const int64_t i = (int64_t(blockIdx.x) - task.first_block) * kThreads + threadIdx.x;
  const scalar_t* x = static_cast<const scalar_t*>(task.x);
  scalar_t* g = static_cast<scalar_t*>(task.grad);
  const acc_t* t = static_cast<const acc_t*>(task.target);
  acc_t sum = 0, count = 0, bad = 0;
  if (i < task.items) {
    switch (task.kind) {
      case kCrossEntropy:
        ce_item(x, static_cast<const int64_t*>(task.target), g, i, task.C, task.px, sum, count, bad);
        break;
      case kNormalsL1: normals_item(x, t, g, i, task.px, sum, count, bad); break;
      case kL1: flat_item<kL1>(x, t, g, i, acc_t(0), tasks.invalid, sum, count, bad); break;
      default:
        flat_item<kBalancedBce>(x, t, g, i, static_cast<acc_t>(*task.pos_weight), tasks.invalid, sum, count, bad);
    }
  }
  block_partial(sum, count, bad, part + int64_t(blockIdx.x) * 3);
}

// Block t adds task t's partials, strided over its threads then reduced as a block: the same
// order every run. Writes task t's stats = (sum, count, malformed).
__global__ void __launch_bounds__(kThreads) task_sums_kernel(const LossTasks tasks, const double* __restrict part) {
  const int t = blockIdx.x;
  double v[3] = {0, 0, 0};
  for (int64_t b = tasks.task[t].first_block + threadIdx.x; b < tasks.end_block(t); b += kThreads)
    for (int k = 0; k < 3; ++k) v[k] += part[b * 3 + k];
  block_partial(v[0], v[1], v[2], tasks.task[t].stats);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> dense_loss_group_cuda(
    at::TensorList preds, at::TensorList targets, at::IntArrayRef kinds, const at::Tensor& pos_weights,
    int64_t invalid, bool /*inplace_backward: autograd only*/) {
  check_dense_loss_group_args(preds, targets, kinds, pos_weights);
  const int64_t T = static_cast<int64_t>(preds.size());
  const at::cuda::OptionalCUDAGuard guard(preds[0].device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> grads, stats;
  for (const at::Tensor& p : preds) {
    grads.push_back(at::empty_like(p));
    stats.push_back(at::empty({3}, p.options().dtype(at::kDouble)));
  }
  const at::Tensor w = pos_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds[0].scalar_type(), "dense_loss_group_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t t0 = 0; t0 < T; t0 += kMaxTasks) {  // kMaxTasks tasks per launch
      LossTasks group{};
      group.invalid = invalid;
      int64_t blocks = 0;
      for (int64_t t = t0; t < std::min(T, t0 + kMaxTasks); ++t) {
        const at::Tensor& pred = preds[t];
        const int64_t kind = kinds[t];
        TORCH_CHECK(kind == kCrossEntropy || targets[t].scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                    "dense_loss_group: target ", t, " must be ", c10::CppTypeToScalarType<acc_t>::value, " for ",
                    pred.scalar_type(), " predictions");
        const Pixels px = pixels_of(pred);
        const bool flat = kind == kL1 || kind == kBalancedBce;
        const int64_t items = flat ? pred.numel() : pred.size(0) * px.P;
        group.task[group.tasks++] = LossTask{pred.const_data_ptr(), targets[t].const_data_ptr(),
                                             grads[t].mutable_data_ptr(), w.const_data_ptr<double>() + t,
                                             stats[t].mutable_data_ptr<double>(), kind, items, pred.size(1), blocks,
                                             px};
        blocks += (items + kThreads - 1) / kThreads;
      }
      group.blocks = blocks;
      TORCH_CHECK(blocks <= INT32_MAX, "dense_loss_group: input too large");
      if (blocks == 0) {  // empty predictions: no 0-block launch
        for (int64_t t = t0; t < t0 + group.tasks; ++t) stats[t].zero_();
        continue;
      }
      at::Tensor part = at::empty({blocks, 3}, preds[0].options().dtype(at::kDouble));
      group_loss_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          group, part.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      task_sums_kernel<<<group.tasks, kThreads, 0, stream>>>(group, part.const_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {stats, grads};
}

// Backward: out[t] = grads[t] * grad_sums[t] in acc_t (see dense_loss.cu's scale_kernel),
// every task in one launch; each task's blocks stride over its elements.
struct ScaleTask {
  const void* g;
  void* o;
  int64_t n, first_block;
};

struct ScaleTasks : TaskList<ScaleTask> {
  const double* s;  // grad_sums, stride s_stride
  int64_t s_stride;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) group_scale_kernel(const ScaleTasks tasks) {
  const int t = tasks.task_of(blockIdx.x);
  const ScaleTask& task = tasks.task[t];
  const int64_t stride = (tasks.end_block(t) - task.first_block) * kThreads;
  const acc_t scale = static_cast<acc_t>(tasks.s[t * tasks.s_stride]);
  const scalar_t* g = static_cast<const scalar_t*>(task.g);
  scalar_t* o = static_cast<scalar_t*>(task.o);
  for (int64_t i = (int64_t(blockIdx.x) - task.first_block) * kThreads + threadIdx.x; i < task.n; i += stride)
    o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * scale);
}

void group_scale_cuda(at::TensorList grads, const at::Tensor& grad_sums, at::TensorList out) {
  check_dense_loss_group_backward_args(grads, grad_sums);
  if (grads.empty()) return;
  const at::cuda::OptionalCUDAGuard guard(grads[0].device());
  const at::Tensor s = grad_sums.to(at::kDouble);
  const int64_t T = static_cast<int64_t>(grads.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "dense_loss_group_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t t0 = 0; t0 < T; t0 += kMaxTasks) {
      ScaleTasks group{};
      group.s = s.const_data_ptr<double>() + t0 * s.stride(0);
      group.s_stride = s.stride(0);
      int64_t blocks = 0;
      for (int64_t t = t0; t < std::min(T, t0 + kMaxTasks); ++t) {
        TORCH_CHECK(grads[t].scalar_type() == grads[0].scalar_type(), "dense_loss_group_backward: grads of one dtype");
        const int64_t n = grads[t].numel();
        group.task[group.tasks++] = ScaleTask{grads[t].const_data_ptr(), out[t].mutable_data_ptr(), n, blocks};
        // Up to 4096 blocks a task, striding over the rest: enough to fill any GPU.
        blocks += std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 4096);
      }
      group.blocks = blocks;
      group_scale_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::vector<at::Tensor> dense_loss_group_backward_cuda(at::TensorList grads, const at::Tensor& grad_sums) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) out.push_back(at::empty_like(g));
  group_scale_cuda(grads, grad_sums, out);
  return out;
}

void dense_loss_group_backward_inplace_cuda(at::TensorList grads, const at::Tensor& grad_sums) {
  group_scale_cuda(grads, grad_sums, grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("dense_loss_group", &dense_loss_group_cuda);
  m.impl("dense_loss_group_backward", &dense_loss_group_backward_cuda);
  m.impl("dense_loss_group_backward_", &dense_loss_group_backward_inplace_cuda);
}

}  // namespace mtl_kernels
