// Host-side checks and layout choice shared by the CPU and CUDA cross-stitch
// kernels, so both accept exactly the same inputs and allocate the same outputs
// (the fake kernel in mtl_kernels/ops/cross_stitch.py mirrors this).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace mtl_kernels {

// The two dense layouts the kernels read and write in place. Inputs in any
// other layout (a strided slice, say) are copied once, into channels_last when
// their channels are contiguous, else into NCHW (mirrored in mtl_kernels/_layout.py).
inline at::MemoryFormat dense_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  // channels_last, or a channel slice of a channels_last tensor (copied once into channels_last)
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) || (x.dim() == 4 && x.stride(1) == 1))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

inline void check_cross_stitch_args(at::TensorList xs, const at::Tensor& alpha, const char* xs_name) {
  TORCH_CHECK(!xs.empty(), "cross_stitch: ", xs_name, " must hold at least one tensor");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.dim() == 4, "cross_stitch: ", xs_name, "[0] must be 4-D [B, C, H, W], got ", x0.sizes());
  for (size_t j = 1; j < xs.size(); ++j) {
    TORCH_CHECK(xs[j].sizes() == x0.sizes(), "cross_stitch: ", xs_name, "[", j, "] has shape ", xs[j].sizes(),
                ", expected ", x0.sizes(), " like ", xs_name, "[0]");
    TORCH_CHECK(xs[j].scalar_type() == x0.scalar_type(), "cross_stitch: ", xs_name, "[", j, "] has dtype ",
                xs[j].scalar_type(), ", expected ", x0.scalar_type());
    TORCH_CHECK(xs[j].device() == x0.device(), "cross_stitch: ", xs_name, "[", j, "] is on ", xs[j].device(),
                ", expected ", x0.device());
  }
  const int64_t T = static_cast<int64_t>(xs.size());
  TORCH_CHECK(alpha.dim() == 3 && alpha.size(0) == T && alpha.size(1) == T && alpha.size(2) == x0.size(1),
              "cross_stitch: alpha must have shape [T, T, C] = [", T, ", ", T, ", ", x0.size(1), "], got ",
              alpha.sizes());
  TORCH_CHECK(alpha.device() == x0.device(), "cross_stitch: alpha is on ", alpha.device(), ", expected ",
              x0.device());
  TORCH_CHECK(alpha.scalar_type() == x0.scalar_type() || alpha.scalar_type() == at::kFloat,
              "cross_stitch: alpha must have the features' dtype (", x0.scalar_type(), ") or float32, got ",
              alpha.scalar_type());
}

// xs in `fmt`: the tensors themselves when they already are, else copies.
inline std::vector<at::Tensor> in_format(at::TensorList xs, at::MemoryFormat fmt) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.contiguous(fmt));
  return out;
}

inline std::vector<at::Tensor> empty_like_all(at::TensorList xs, at::MemoryFormat fmt) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(at::empty(x.sizes(), x.options().memory_format(fmt)));
  return out;
}

}  // namespace mtl_kernels
