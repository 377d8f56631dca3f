// dense_loss_group on the CPU (schema in csrc/ops.cpp): every task's dense
// loss in one parallel region, and the backward's scaling in another.
//
// The tasks' tiles (cpu/dense_loss_tiles.h, the same tiles as dense_loss's)
// are laid end to end and cut into chunks of about equal size in prediction
// elements, which the threads take from a shared counter as they finish: a
// tile's cost per element differs by kind (a normals pixel costs about ten
// times a cross-entropy logit), so a fixed share per thread would leave some
// idle. Each tile writes its partial sums to its own slot and each task adds
// its slots in order, so the stats equal dense_loss's bit for bit, whatever
// the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common/dense_loss.h"
#include "common/dense_loss_args.h"
#include "cpu/dense_loss_tiles.h"
#include "cpu/huge_pages.h"

namespace mtl_kernels {
namespace {

constexpr int64_t kChunksPerThread = 32;  // small enough that the last chunks even the threads out

// [begin, end) of the items (tiles, elements) in chunk k of `chunks` equal shares of work,
// where work[i] is the work before item i (work.back() the total).
std::pair<int64_t, int64_t> chunk_items(const std::vector<int64_t>& work, int64_t k, int64_t chunks) {
  const int64_t total = work.back();
  auto at = [&](int64_t j) {
    const int64_t w = total / chunks * j + total % chunks * j / chunks;  // j * total / chunks, no overflow
    return static_cast<int64_t>(std::lower_bound(work.begin(), work.end() - 1, w) - work.begin());
  };
  return {at(k), k + 1 == chunks ? static_cast<int64_t>(work.size()) - 1 : at(k + 1)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> dense_loss_group_cpu(
    at::TensorList preds, at::TensorList targets, at::IntArrayRef kinds, const at::Tensor& pos_weights,
    int64_t invalid, bool /*inplace_backward: autograd only*/) {
  check_dense_loss_group_args(preds, targets, kinds, pos_weights);
  const int64_t T = static_cast<int64_t>(preds.size());
  std::vector<at::Tensor> grads;
  std::vector<int64_t> first_tile{0}, work{0};  // per task; per tile, cumulative
  for (int64_t t = 0; t < T; ++t) {
    grads.push_back(at::empty_like(preds[t]));
    prefer_huge_pages(grads.back());
    const int64_t tiles = tiles_of(preds[t], kinds[t]), per_tile = preds[t].numel() / std::max<int64_t>(tiles, 1);
    for (int64_t i = 0; i < tiles; ++i) work.push_back(work.back() + std::max<int64_t>(per_tile, 1));
    first_tile.push_back(first_tile.back() + tiles);
  }
  std::vector<Partial> parts(first_tile.back());
  const at::Tensor w = pos_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds[0].scalar_type(), "dense_loss_group_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(kinds[t] == kCrossEntropy || targets[t].scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                  "dense_loss_group: target ", t, " must be ", c10::CppTypeToScalarType<acc_t>::value, " for ",
                  preds[0].scalar_type(), " predictions");
    const double* pw = w.const_data_ptr<double>();
    const int64_t chunks = std::min<int64_t>(first_tile.back(), kChunksPerThread * at::get_num_threads());
    std::atomic<int64_t> next{0};  // the next chunk to take
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      for (int64_t k = next++; k < chunks; k = next++) {
        const auto [begin, end] = chunk_items(work, k, chunks);
        for (int64_t i = begin; i < end; ++i) {
          const int64_t t = std::upper_bound(first_tile.begin(), first_tile.end(), i) - first_tile.begin() - 1;
          parts[i] = run_tile<scalar_t, acc_t>(kinds[t], i - first_tile[t], preds[t], targets[t], grads[t],
                                               static_cast<acc_t>(pw[t]), invalid);
        }
      }
    });
  });
  std::vector<at::Tensor> stats;
  for (int64_t t = 0; t < T; ++t) {
    double sum = 0, count = 0, bad = 0;  // in tile order, as dense_loss adds them
    for (int64_t i = first_tile[t]; i < first_tile[t + 1]; ++i)
      sum += parts[i].sum, count += parts[i].count, bad += parts[i].bad;
    stats.push_back(at::empty({3}, preds[0].options().dtype(at::kDouble)));
    double* s = stats.back().mutable_data_ptr<double>();
    s[0] = sum, s[1] = count, s[2] = bad;
  }
  return {stats, grads};
}

// out[t] = grads[t] * grad_sums[t], in acc_t; out may be grads (in place). One parallel
// region over the tasks' elements laid end to end.
void group_scale_cpu(at::TensorList grads, const at::Tensor& grad_sums, at::TensorList out) {
  check_dense_loss_group_backward_args(grads, grad_sums);
  const at::Tensor s = grad_sums.to(at::kDouble).contiguous();
  const std::vector<double> scale(s.const_data_ptr<double>(), s.const_data_ptr<double>() + s.numel());
  std::vector<int64_t> first{0};  // the tasks' first elements
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK(grads[t].scalar_type() == grads[0].scalar_type(), "dense_loss_group_backward: grads of one dtype");
    first.push_back(first.back() + grads[t].numel());
  }
  if (first.back() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(), "dense_loss_group_backward", [&] {
    at::parallel_for(0, first.back(), 1 << 16, [&](int64_t begin, int64_t end) {
      for (size_t t = 0; t + 1 < first.size(); ++t) {  // the part of [begin, end) in each task
        const int64_t b = std::max(begin, first[t]), e = std::min(end, first[t + 1]);
        if (b < e)
          scale_span(grads[t].const_data_ptr<scalar_t>(), out[t].mutable_data_ptr<scalar_t>(), b - first[t],
                     e - first[t], scale[t]);
      }
    });
  });
}

std::vector<at::Tensor> dense_loss_group_backward_cpu(at::TensorList grads, const at::Tensor& grad_sums) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) {
    out.push_back(at::empty_like(g));
    prefer_huge_pages(out.back());
  }
  group_scale_cpu(grads, grad_sums, out);
  return out;
}

void dense_loss_group_backward_inplace_cpu(at::TensorList grads, const at::Tensor& grad_sums) {
  group_scale_cpu(grads, grad_sums, grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("dense_loss_group", &dense_loss_group_cpu);
  m.impl("dense_loss_group_backward", &dense_loss_group_backward_cpu);
  m.impl("dense_loss_group_backward_", &dense_loss_group_backward_inplace_cpu);
}

}  // namespace mtl_kernels
