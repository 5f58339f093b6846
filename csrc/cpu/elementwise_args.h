// Plain-data operands of the elementwise losses (BCE-with-logits, sigmoid focal) between their
// bindings (bce.cpp, sigmoid_focal.cpp) and their per-ISA kernels (*_kernel.cpp): the loop shape
// and each operand as a pointer plus one element stride per dimension of the input, 0 on the
// dimensions it is broadcast over (a broadcast weight is never materialised at the input's size).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace fusedloss::cpu {

constexpr int kEwArgDims = 8;  // = elementwise.h's kEwMaxDims

struct EwOperandArg {
  const void* p = nullptr;  // nullptr: the operand is absent
  int64_t s[kEwArgDims] = {};
};

// The per-element loss kernels' common arguments. Operands other than the input have the input's
// dtype or, when `aux_acc`, the accumulation dtype (float32; float64 for float64 input).
struct EwLossArgs {
  c10::ScalarType dtype;  // input's
  bool aux_acc = false;
  int ndim = 0;
  int64_t size[kEwArgDims] = {};
  EwOperandArg x, t, w, pw;
  void* loss = nullptr;  // Reduction::None: the per-element loss, contiguous, input's dtype
  void* grad = nullptr;  // the gradient (contiguous, input's dtype), or nullptr: none
  int reduction = 0;     // 0 none, 1 mean, 2 sum (mean: the caller scales the sum)
  double grad_scale = 1;  // multiplies every gradient element (the 'mean' factor)
  double alpha = -1, gamma = 0;  // sigmoid focal only
};

// `t` viewed at the input's sizes (a broadcast dim gets stride 0; `t` must broadcast to them).
inline EwOperandArg ew_operand(const at::Tensor& t, at::IntArrayRef sizes) {
  EwOperandArg o;
  if (!t.defined()) return o;
  const at::Tensor v = t.expand(sizes);  // a view: strides 0 where broadcast
  o.p = v.const_data_ptr();
  for (int64_t k = 0; k < v.dim(); ++k) o.s[k] = v.size(k) == 1 ? 0 : v.stride(k);
  return o;
}

}  // namespace fusedloss::cpu

namespace fusedloss::cpu {

// The binding side shared by the per-element losses: checks, the operands (target, weight and
// pos_weight read by stride; converted only when their dtypes differ: then every operand other
// than the input is read in the accumulation dtype), the outputs ('none': the per-element loss in
// the input's dtype; the gradient from `slot` when compute_grad), and the call of `kernel`, which
// returns the sum of the losses for 'mean' / 'sum'. Returns (loss, grad) as the schemas say.
template <typename Slot, typename Kernel>
std::tuple<at::Tensor, at::Tensor> run_ew_loss(const char* op, const at::Tensor& input,
                                               const at::Tensor& target,
                                               const c10::optional<at::Tensor>& weight,
                                               const c10::optional<at::Tensor>& pos_weight,
                                               double loss_scale, int64_t reduction,
                                               bool compute_grad, EwLossArgs a, Slot& slot,
                                               Kernel&& kernel) {
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": input must be float32, float16, bfloat16 or float64, got ", dt);
  TORCH_CHECK(input.dim() <= kEwArgDims, op, ": input may have at most ", kEwArgDims,
              " dimensions, got ", input.dim());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0, 1 or 2");
  TORCH_CHECK(target.sizes() == input.sizes(), op, ": target must have the input's shape ",
              input.sizes(), ", got ", target.sizes());
  const at::ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor t = target, w = weight.value_or(at::Tensor()), pw = pos_weight.value_or(at::Tensor());
  bool aux_acc = false;
  for (const at::Tensor* o : {&t, &w, &pw}) {
    if (!o->defined()) continue;
    TORCH_CHECK(o->device().is_cpu(), op, ": every operand must be a CPU tensor");
    TORCH_CHECK(at::isFloatingType(o->scalar_type()), op, ": operands must be floating, got ",
                o->scalar_type());
    aux_acc = aux_acc || o->scalar_type() != dt;
  }
  const at::ScalarType aux = aux_acc ? acc : dt;
  for (at::Tensor* o : {&t, &w, &pw}) {
    if (o->defined() && o->scalar_type() != aux) *o = o->to(aux);
  }
  const auto sizes = input.sizes();
  a.dtype = dt;
  a.aux_acc = aux_acc && acc != dt;
  a.ndim = static_cast<int>(input.dim());
  for (int k = 0; k < a.ndim; ++k) a.size[k] = sizes[k];
  a.x = ew_operand(input, sizes);
  a.t = ew_operand(t, sizes);
  a.w = ew_operand(w, sizes);
  a.pw = ew_operand(pw, sizes);
  a.reduction = static_cast<int>(reduction);
  a.grad_scale = loss_scale;
  at::Tensor loss, grad;
  if (reduction == 0) {
    loss = at::empty(sizes, input.options());
    a.loss = loss.data_ptr();
  }
  if (compute_grad) {
    grad = slot.get(sizes, input.options());
    a.grad = grad.data_ptr();
  } else {
    grad = at::empty({0}, input.options());
  }
  const double total = input.numel() == 0 ? 0.0 : kernel(a);
  if (reduction != 0) {
    loss = at::scalar_tensor(total * loss_scale, input.options().dtype(acc));
  }
  return {loss, grad};
}

}  // namespace fusedloss::cpu
