// Schemas of the device kernels behind fusedloss's custom ops (fusedloss/ops/*.py). Each schema is
// defined once here; csrc/cpu/*.cpp and csrc/cuda/*.cu register the kernels for their device with
// TORCH_LIBRARY_IMPL. The Python layer owns autograd, fake kernels and argument checks.
#include <Python.h>
#include <torch/library.h>

// Importing fusedloss._C (after torch) runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fusedloss_C, m) {
  // input: (N, C, D), any strides; target: int64 (N, D) class indices or input-shaped (N, C, D)
  // probabilities; weight: (C,) in the accumulation dtype; loss_scale: 0-d, multiplies every row's
  // loss and gradient. Returns per-row loss and lse (N, D) in the accumulation dtype (float32, or
  // float64 for float64 input) and, with compute_grad, d(loss)/d(input) as a contiguous (N, C, D)
  // tensor of input's dtype (else an empty tensor). softcap <= 0 means off.
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? loss_scale, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor grad)");
  // As cross_entropy_fwd with compute_grad, but the gradient overwrites input (same strides).
  m.def(
      "cross_entropy_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "Tensor? loss_scale, int ignore_index, float label_smoothing, float z_loss, float softcap) "
      "-> (Tensor loss, Tensor lse)");
  // The whole eager cross-entropy in one call, autograd included (csrc/autograd/cross_entropy.cpp):
  // input (N, C, d...) or (C,) and target exactly as fusedloss.cross_entropy takes them (checked
  // there), reduction 0 = none, 1 = mean, 2 = sum; returns the loss in `dtype` and the per-row lse.
  // The _inplace variant writes the gradient into input's memory.
  m.def(
      "cross_entropy_loss(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, ScalarType dtype) "
      "-> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_loss_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "ScalarType dtype) -> (Tensor loss, Tensor lse)");
  // The 'mean' factor of class-index cross-entropy: 1 / sum of weight[y] (the count without a
  // weight) over the targets that are not ignore_index, as a 0-d tensor of `dtype` (inf when every
  // target is ignored: torch's NaN mean). Out-of-range targets add nothing (the loss kernel rejects
  // them). One call instead of three small ops: it runs on every 'mean' loss.
  m.def(
      "cross_entropy_mean_factor(Tensor target, Tensor? weight, int ignore_index, "
      "ScalarType dtype) -> Tensor");
  // grad (N, C, D) *= grad_loss (N, D) broadcast over C. grad_loss may be an expanded (stride 0)
  // tensor: then it is one scalar, and a scalar equal to 1 leaves grad untouched (no pass over it).
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_loss) -> ()");
  // The softmax-row skeleton's lse-only policy: the logsumexp over C of each row of input (N, C, D),
  // any strides, of the softcapped logits (softcap <= 0: off), as an (N, D) tensor of the
  // accumulation dtype; one read of the logits (fusedloss.distributed's partial logsumexp). NaN for
  // a row with a NaN or +inf logit, as cross_entropy_fwd's lse.
  m.def("logsumexp_fwd(Tensor input, float softcap) -> Tensor");
  // Total variation (the stencil skeleton): input (P, Q, H, W), any strides; weight None or of
  // input's shape (an expanded view: stride 0 where broadcast), any floating dtype; norm 0 = l1,
  // 1 = l2_squared, 2 = isotropic; eps >= 0 (isotropic); loss_scale multiplies every image's loss
  // and the gradient. Returns the per-image loss (P, Q) in the accumulation dtype and, with
  // compute_grad, d(sum of loss)/d(input) as a contiguous (P, Q, H, W) tensor of input's dtype
  // (else an empty tensor).
  m.def(
      "tv_fwd(Tensor input, Tensor? weight, int norm, float eps, float loss_scale, "
      "bool compute_grad) -> (Tensor loss, Tensor grad)");
  // Per-element losses on the elementwise skeleton. input: any shape (at most 8 dims) and strides;
  // target: input's shape; weight / pos_weight: broadcastable to input's shape, read by stride.
  // reduction 0 = none (loss: per element, input's shape and dtype), 1 = mean, 2 = sum (loss: a
  // 0-d tensor of the accumulation dtype, the deterministic sum times loss_scale). grad (with
  // compute_grad, else an empty tensor): d(sum of the returned loss)/d(input), contiguous, input's
  // dtype (loss_scale multiplies it). See docs/KERNELS.md.
  m.def(
      "sigmoid_focal_fwd(Tensor input, Tensor target, Tensor? weight, float alpha, float gamma, "
      "float loss_scale, int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)");
  m.def(
      "bce_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, float loss_scale, "
      "int reduction, bool compute_grad) -> (Tensor loss, Tensor grad)");
  // Softmax focal loss on the softmax-row skeleton: input (N, C, D), any strides; target int64
  // (N, D) class indices; weight (C,) and loss_scale (0-d) in the accumulation dtype; gamma >= 0.
  // loss: per-row (N, D) in the accumulation dtype, or with reduce the sums over the fixed blocks
  // of rows of csrc/include/fusedloss/row_blocks.h ((loss_blocks(N, C, D),): 'mean' and 'sum'
  // without a per-row tensor); each row's loss and gradient times loss_scale. With compute_grad
  // also d(sum of loss)/d(input) as a contiguous (N, C, D) tensor of input's dtype.
  m.def(
      "softmax_focal_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? loss_scale, "
      "float gamma, int ignore_index, bool reduce, bool compute_grad) -> (Tensor loss, "
      "Tensor grad)");
  // Dice / Tversky / Dice+CE (docs/KERNELS.md, "Dice"; math in csrc/include/fusedloss/dice.h):
  // input (N, C, D), any strides; target int64 (N, D) class indices (softmax) or (N, C, D) of
  // input's dtype (sigmoid). dice_fwd returns the per-(n, c) sums (N, C, 5) (I, P, G, NLL, SM) in
  // the accumulation dtype, deterministic, and the per-position lse (N, D) (softmax; (0,) in
  // sigmoid mode); dice_bwd the gradient of sum(grad_sums * sums) with respect to input, of
  // input's shape, dtype and (non-overlapping and dense) strides.
  m.def(
      "dice_fwd(Tensor input, Tensor target, int ignore_index, bool sigmoid, bool squared_pred, "
      "bool with_ce, bool with_smoothing) -> (Tensor sums, Tensor lse)");
  m.def(
      "dice_bwd(Tensor grad_sums, Tensor input, Tensor target, Tensor lse, int ignore_index, "
      "bool sigmoid, bool squared_pred, bool with_ce, bool with_smoothing) -> Tensor");
}
