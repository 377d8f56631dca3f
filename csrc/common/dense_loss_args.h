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

// The balanced-BCE positive weight of dense_loss and dense_loss_upsampled: a one-element
// float64 tensor on pred's device (read there by the kernels, for every kind on CUDA).
inline void check_pos_weight(const at::Tensor& pos_weight, const at::Tensor& pred, const char* op) {
  TORCH_CHECK(pos_weight.numel() == 1 && pos_weight.scalar_type() == at::kDouble &&
                  pos_weight.device() == pred.device(),
              op, ": pos_weight must be one float64 element on pred's device, got ", pos_weight.scalar_type(), " ",
              pos_weight.sizes(), " on ", pos_weight.device());
}

// dense_loss_group: T tasks of dense_loss, predictions of one dtype on one device.
inline void check_dense_loss_group_args(at::TensorList preds, at::TensorList targets, at::IntArrayRef kinds,
                                        const at::Tensor& pos_weights) {
  const size_t T = preds.size();
  TORCH_CHECK(T > 0, "dense_loss_group: needs at least one task");
  TORCH_CHECK(targets.size() == T && kinds.size() == T, "dense_loss_group: preds, targets and kinds must have ",
              "one entry per task, got ", T, ", ", targets.size(), " and ", kinds.size());
  TORCH_CHECK(pos_weights.dim() == 1 && pos_weights.size(0) == static_cast<int64_t>(T) &&
                  pos_weights.scalar_type() == at::kDouble && pos_weights.device() == preds[0].device(),
              "dense_loss_group: pos_weights must be float64 [", T, "] on the predictions' device");
  for (size_t t = 0; t < T; ++t) {
    TORCH_CHECK(preds[t].scalar_type() == preds[0].scalar_type() && preds[t].device() == preds[0].device(),
                "dense_loss_group: every prediction must share the first's dtype and device");
    check_dense_loss_args(preds[t], targets[t], kinds[t]);
  }
}

// dense_loss_group_backward: one kept gradient per task, grad_sums [T] on their device.
inline void check_dense_loss_group_backward_args(at::TensorList grads, const at::Tensor& grad_sums) {
  TORCH_CHECK(grad_sums.dim() == 1 && grad_sums.size(0) == static_cast<int64_t>(grads.size()),
              "dense_loss_group_backward: grad_sums must be [", grads.size(), "], got ", grad_sums.sizes());
  for (const at::Tensor& g : grads) {
    TORCH_CHECK(g.is_non_overlapping_and_dense(), "dense_loss_group_backward: grads must be dense");
    TORCH_CHECK(g.device() == grad_sums.device(), "dense_loss_group_backward: grads and grad_sums on one device");
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
