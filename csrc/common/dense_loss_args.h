// The compiled dense_loss kernels' argument checks, shared by CPU and CUDA.
// mtl_kernels/ops/dense_loss.py checks user input with friendlier messages and
// prepares the target; these guard direct calls of torch.ops.mtl_kernels.dense_loss.
#pragma once
#include <ATen/ATen.h>

#include "common/dense_loss.h"

namespace mtl_kernels {

inline void check_dense_loss_args(const at::Tensor& pred, const at::Tensor& target, int64_t kind) {
  TORCH_CHECK(pred.dim() == 4, "dense_loss: pred must be 4-D [B, C, H, W], got ", pred.sizes());
  TORCH_CHECK(kind >= kCrossEntropy && kind <= kBalancedBce, "dense_loss: unknown kind ", kind);
  TORCH_CHECK(pred.is_contiguous() || pred.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dense_loss: pred must be NCHW or channels_last");
  TORCH_CHECK(target.device() == pred.device(), "dense_loss: target must be on pred's device");
  if (kind == kCrossEntropy) {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.dim() == 3 &&
                    target.size(0) == pred.size(0) && target.size(1) == pred.size(2) && target.size(2) == pred.size(3),
                "dense_loss: cross-entropy target must be contiguous int64 [B, H, W]");
  } else {
    TORCH_CHECK(target.sizes() == pred.sizes() && target.strides() == pred.strides(),
                "dense_loss: target must have pred's shape and strides");
    TORCH_CHECK(kind != kNormalsL1 || pred.size(1) == 3, "dense_loss: normals need 3 channels");
  }
}

// dense_loss_upsampled: pred [B, C, h, w] in any strides, the target at its own size, contiguous.
inline void check_dense_loss_upsampled_args(const at::Tensor& pred, const at::Tensor& target, int64_t kind) {
  TORCH_CHECK(pred.dim() == 4, "dense_loss_upsampled: pred must be 4-D [B, C, H, W], got ", pred.sizes());
  TORCH_CHECK(kind >= kCrossEntropy && kind <= kBalancedBce, "dense_loss_upsampled: unknown kind ", kind);
  TORCH_CHECK(target.device() == pred.device(), "dense_loss_upsampled: target must be on pred's device");
  const int64_t C = pred.size(1);
  TORCH_CHECK(target.is_contiguous() && target.dim() >= 3 && target.size(0) == pred.size(0),
              "dense_loss_upsampled: target must be contiguous [B, ...]");
  if (kind == kCrossEntropy) {
    TORCH_CHECK(target.dim() == 3 && target.scalar_type() == at::kLong,
                "dense_loss_upsampled: cross-entropy target must be int64 [B, H, W]");
  } else {
    TORCH_CHECK(target.dim() == 4 && target.size(1) == C, "dense_loss_upsampled: target must be [B, C, H, W]");
    TORCH_CHECK(kind != kNormalsL1 || C == 3, "dense_loss_upsampled: normals need 3 channels");
  }
  TORCH_CHECK(pred.numel() > 0 && target.numel() > 0, "dense_loss_upsampled: empty input");
}

}  // namespace mtl_kernels
