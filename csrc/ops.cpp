// Every op's schema, in one place. Kernels register themselves per device in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) kernels and autograd
// are registered from Python in mtl_kernels/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

// An importable extension module, so `import mtl_kernels._C` loads the
// library and runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(mtl_kernels, m) {
  // Cross-stitch (Misra et al. 2016): ys[i] = sum_j alpha[i, j, c] * xs[j].
  m.def("cross_stitch(Tensor[] xs, Tensor alpha) -> Tensor[]");
  // Returns (grad_xs, grad_alpha) in one pass over grad_ys and xs.
  m.def("cross_stitch_backward(Tensor[] grad_ys, Tensor[] xs, Tensor alpha) -> (Tensor[], Tensor)");

  // NDDR (Gao et al. 2019): ys[t] = ReLU(BN_t(weight[t*C:(t+1)*C] @ concat_j xs[j])), the
  // concatenation never materialised. weight [T*C, T*C] (row block t: task t's 1x1 conv),
  // bn_weight, bn_bias [T*C]. Training mode normalises with the batch statistics and also
  // returns the pre-BN convolution z [B, T*C, H, W] and the batch mean and biased variance
  // [T*C] (for backward, and for the caller to update the running statistics).
  m.def(
      "nddr_train(Tensor[] xs, Tensor weight, Tensor bn_weight, Tensor bn_bias, float eps)"
      " -> (Tensor[], Tensor, Tensor, Tensor)");
  // Returns (grad_xs, grad_weight, grad_bn_weight, grad_bn_bias).
  m.def(
      "nddr_train_backward(Tensor[] grad_ys, Tensor[] xs, Tensor z, Tensor weight, Tensor bn_weight,"
      " Tensor bn_bias, Tensor mean, Tensor var, float eps) -> (Tensor[], Tensor, Tensor, Tensor)");
  // Eval mode, BN folded by the caller: ys[t] = ReLU(weight[t*C:(t+1)*C] @ concat_j xs[j] + bias[t*C:]).
  m.def("nddr_eval(Tensor[] xs, Tensor weight, Tensor bias) -> Tensor[]");
  // Returns (grad_xs, grad_weight, grad_bias); the ReLU mask comes from the saved outputs ys.
  m.def("nddr_eval_backward(Tensor[] grad_ys, Tensor[] xs, Tensor[] ys, Tensor weight) -> (Tensor[], Tensor, Tensor)");

  // Sigmoid-gated sum, shared by PAD-Net/MTI-Net distillation and MTAN attention:
  //   outs[t] = residuals[t] + sum over pairs i with targets[i] == t of
  //             feats[i] * sigmoid(gates[i] * scale + shift)
  // N pairs of [B, C, H, W] tensors (channel slices of wider tensors are read in place);
  // residuals: num_outputs tensors, or none; scale, shift: per-channel [C] (a BatchNorm
  // folded onto the gates), or none for identity.
  m.def(
      "gate_sum(Tensor[] residuals, Tensor[] feats, Tensor[] gates, int[] targets, int num_outputs,"
      " Tensor? scale, Tensor? shift) -> Tensor[]");
  // Returns (grad_feats, grad_gates, grad_scale, grad_shift); the residuals' gradient is grad_outs itself.
  // grad_scale / grad_shift are empty tensors when scale / shift are none.
  m.def(
      "gate_sum_backward(Tensor[] grad_outs, Tensor[] feats, Tensor[] gates, int[] targets, Tensor? scale,"
      " Tensor? shift) -> (Tensor[], Tensor[], Tensor, Tensor)");
  // The same, writing grad_feats / grad_gates into tensors the caller allocated (channel
  // slices of one stacked gradient, say: PAD-Net's); returns (grad_scale, grad_shift).
  m.def(
      "gate_sum_backward_out(Tensor[] grad_outs, Tensor[] feats, Tensor[] gates, int[] targets, Tensor? scale,"
      " Tensor? shift, Tensor(a!)[] grad_feats, Tensor(b!)[] grad_gates) -> (Tensor, Tensor)");

  // The survey's dense losses (mtl_kernels/reference/dense_loss.py is the definition), each a sum
  // of terms over pred [B, C, H, W] (NCHW or channels_last), in one pass that also writes the
  // gradient of that sum with respect to pred (kept for backward, which only scales it).
  //   kind 0 cross-entropy: target int64 [B, H, W], 255 ignored; one term per valid pixel
  //   kind 1 L1: target like pred; holes are 255 (invalid=0) or anything not > 0 (invalid=1)
  //   kind 2 normals L1: C = 3, pred / (|pred| + 1e-12) against target like pred, 255 ignored
  //   kind 3 balanced BCE with logits: target like pred, labels target >= 0.5, weight
  //          pos_weight (a 0-dim tensor) on positives and 1 - pos_weight on negatives
  // Targets other than cross-entropy's are float32 (float64 for float64 pred).
  // Returns (stats, grad): stats float64 [3] = (sum of terms, number of terms, number of
  // malformed targets: class indices out of range, NaN where not allowed). The kernels ignore
  // inplace_backward; autograd (mtl_kernels/ops/dense_loss.py) scales grad in place when it is set.
  m.def(
      "dense_loss(Tensor pred, Tensor target, int kind, Tensor pos_weight, int invalid, bool inplace_backward)"
      " -> (Tensor, Tensor)");
  // Backward: grad_pred = grad * grad_sum, grad the forward's kept gradient of the sum and
  // grad_sum (0-dim) the gradient flowing into the sum; a fresh tensor in grad's layout. The
  // product is taken in float (double for double grad): a half-precision 1/count underflows.
  m.def("dense_loss_backward(Tensor grad, Tensor grad_sum) -> Tensor");
  // The same, scaling grad in place (inplace_backward).
  m.def("dense_loss_backward_(Tensor(a!) grad, Tensor grad_sum) -> ()");
  // dense_loss of T tasks in one launch (one parallel region on the CPU): task t as
  // dense_loss(preds[t], targets[t], kinds[t], pos_weights[t], invalid), all predictions of
  // one dtype on one device, pos_weights float64 [T]. Returns (stats, grads), one [3] stats
  // tensor per task: separate outputs, so that autograd passes a task no gradient when a loss
  // does not reach it (a gradient-level balancer's per-task passes) and leaves its head alone.
  m.def(
      "dense_loss_group(Tensor[] preds, Tensor[] targets, int[] kinds, Tensor pos_weights, int invalid,"
      " bool inplace_backward) -> (Tensor[], Tensor[])");
  // Its backward in one launch: grad_preds[t] = grads[t] * grad_sums[t], as dense_loss_backward.
  m.def("dense_loss_group_backward(Tensor[] grads, Tensor grad_sums) -> Tensor[]");
  m.def("dense_loss_group_backward_(Tensor(a!)[] grads, Tensor grad_sums) -> ()");
  // dense_loss of a prediction smaller (or larger) than its target, resized bilinearly
  // (align_corners=False, as F.interpolate) inside the pass: pred [B, C, h, w]; target
  // [B, H, W] int64 (cross-entropy) or contiguous [B, C, H, W]. Returns (stats, grad) with
  // grad the gradient of the sum with respect to pred itself (pred's size and dtype).
  m.def(
      "dense_loss_upsampled(Tensor pred, Tensor target, int kind, Tensor pos_weight, int invalid,"
      " bool inplace_backward) -> (Tensor, Tensor)");

  // Multi-tensor ops of gradient-level task balancing (mtl_kernels/reference/gram.py and
  // combine.py). grads is task-major, T lists of the same K tensors flattened: grads[t * K + k]
  // is task t's gradient of shared tensor k; every tensor is read in place.
  // gram: G[s, t] = sum_k grads[s*K+k] . grads[t*K+k], [T, T] float32 (float64 if any
  // gradient is float64), deterministic.
  m.def("gram(Tensor[] grads, int tasks) -> Tensor");
  // combine: out[k] = sum_t weights[t] * grads[t*K+k] (out[k] += ... when accumulate), summed
  // in float32 (float64 for float64 gradients); weights [T] on the gradients' device.
  m.def("combine(Tensor weights, Tensor[] grads, Tensor(a!)[] out, bool accumulate) -> ()");

  // The edge metric's boundary matching (mtl_kernels/metrics/_matching.py; CPU only): the sizes
  // of maximum-cardinality matchings of the bipartite graph with edges (left[i], right[i]),
  // i < ends[k], for each k. left, right, ends: int64 [E], [E], [K]; ends non-decreasing.
  m.def("bipartite_matching_sizes(Tensor left, Tensor right, int num_left, int num_right, Tensor ends) -> Tensor");
  // bwmorph(mask, 'thin', inf) of each slice of a bool [N, H, W] mask (CPU only), with the two
  // sub-iterations' deletion tables (bool [256], indexed by the 8-neighbour code) from Python.
  m.def("thin(Tensor mask, Tensor lut_first, Tensor lut_second) -> Tensor");
}
