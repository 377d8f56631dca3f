// thin on the CPU: bwmorph(mask, 'thin', inf) of each [H, W] slice (Lam, Lee
// and Suen's parallel thinning as MATLAB implements it), for the edge metric's
// thin=True (mtl_kernels/metrics/edge.py, whose thin() and _thin_dense() are
// the references, and whose _thin_luts() gives the two deletion tables).
//
// Each sub-iteration decides every pixel from the mask as it was at its start,
// then deletes. Only pixels that can change are evaluated, as in the numpy
// thin(): first the foreground pixels with a background neighbour, then the
// foreground neighbours of the pixels deleted in the two previous
// sub-iterations. Slices run in parallel; each is sequential.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace mtl_kernels {
namespace {

// One slice, padded by a zero border (width s = W + 2): thinned in place.
void thin_slice(uint8_t* img, int64_t H, int64_t W, const bool* lut[2]) {
  const int64_t s = W + 2;
  const int64_t offs[8] = {1, -s + 1, -s, -s - 1, -1, s - 1, s, s + 1};  // x1 east, counter-clockwise
  auto code = [&](int64_t i) {
    int c = 0;
    for (int bit = 0; bit < 8; ++bit) c |= img[i + offs[bit]] << bit;
    return c;
  };
  std::vector<int64_t> prev, prev2, cand, del;
  std::vector<int64_t> seen((H + 2) * s, -1);  // the step a pixel was last listed in, for distinct lists
  for (int64_t y = 1; y <= H; ++y)
    for (int64_t x = 1; x <= W; ++x)
      if (img[y * s + x] && code(y * s + x) != 255) prev.push_back(y * s + x);
  prev2 = prev;
  for (int64_t step = 0;; ++step) {
    cand.clear();
    for (const auto* list : {&prev, &prev2})
      for (const int64_t i : *list)
        if (img[i] && seen[i] != step) seen[i] = step, cand.push_back(i);
    if (cand.empty()) return;  // then no later sub-iteration has a candidate either
    del.clear();
    for (const int64_t i : cand)
      if (lut[step % 2][code(i)]) del.push_back(i);
    for (const int64_t i : del) img[i] = 0;
    prev2.swap(prev);
    prev.clear();
    const int64_t mark = -2 - step;  // a second, separate tag for the neighbour list
    for (const int64_t i : del)
      for (const int64_t o : offs)
        if (img[i + o] && seen[i + o] != mark) seen[i + o] = mark, prev.push_back(i + o);
  }
}

at::Tensor thin_cpu(const at::Tensor& mask, const at::Tensor& lut_first, const at::Tensor& lut_second) {
  TORCH_CHECK(mask.dim() == 3 && mask.scalar_type() == at::kBool && mask.device().is_cpu(),
              "thin: mask must be a bool CPU tensor [N, H, W], got ", mask.scalar_type(), " ", mask.sizes());
  for (const auto* lut : {&lut_first, &lut_second})
    TORCH_CHECK(lut->numel() == 256 && lut->scalar_type() == at::kBool && lut->device().is_cpu(),
                "thin: the deletion tables must be bool CPU tensors of 256 entries");
  const int64_t N = mask.size(0), H = mask.size(1), W = mask.size(2);
  // A zero border around every slice, so that neighbours need no bounds checks.
  at::Tensor padded = at::constant_pad_nd(mask.to(at::kByte), {1, 1, 1, 1}, 0).contiguous();
  const at::Tensor l1 = lut_first.contiguous(), l2 = lut_second.contiguous();
  const bool* lut[2] = {l1.const_data_ptr<bool>(), l2.const_data_ptr<bool>()};
  uint8_t* data = padded.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) thin_slice(data + n * (H + 2) * (W + 2), H, W, lut);
  });
  return padded.narrow(1, 1, H).narrow(2, 1, W).to(at::kBool).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) { m.impl("thin", &thin_cpu); }

}  // namespace mtl_kernels
