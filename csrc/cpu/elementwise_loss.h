// What the per-element loss kernels (bce_kernel.cpp, sigmoid_focal_kernel.cpp) share on top of the
// elementwise skeleton: EwLossArgs (elementwise_args.h) turned into the skeleton's shape, operands
// and outputs, and the dtype dispatch. For *_kernel.cpp files only (compiled once per ISA).
#pragma once

#include "elementwise.h"
#include "elementwise_args.h"
#include "vec.h"

#include <type_traits>

namespace fusedloss::cpu::CPU_CAPABILITY {

template <typename E>
inline Strided<const E> ew_in(const EwOperandArg& o) {
  Strided<const E> s;
  s.p = static_cast<const E*>(o.p);
  for (int k = 0; k < kEwMaxDims; ++k) s.s[k] = o.s[k];
  return s;
}

// f(T(), U()): T the input's element type, U the other operands' (T, or acc_t<T> when aux_acc).
template <typename F>
inline void ew_dtypes(const EwLossArgs& a, F&& f) {
  by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      f(T(), T());
    } else if (a.aux_acc) {
      f(T(), acc_t<T>());
    } else {
      f(T(), T());
    }
  });
}

// Runs `pol` over the operands with the outputs of `a` (per-element loss for 'none', contiguous
// gradient when a.grad); returns the deterministic sum of the losses for 'mean' and 'sum'.
template <typename A, typename T, typename P, typename... E>
inline double ew_loss_run(const P& pol, const EwLossArgs& a, Strided<E>... ops) {
  static_assert(kEwMaxDims == kEwArgDims, "one dimension cap");
  EwShape shape;
  shape.ndim = a.ndim;
  Strided<T> loss_out, grad_out;
  int64_t stride = 1;
  for (int k = a.ndim - 1; k >= 0; --k) {
    shape.size[k] = a.size[k];
    loss_out.s[k] = grad_out.s[k] = stride;
    stride *= a.size[k];
  }
  if (a.ndim == 0) {  // a 0-d input: one element
    shape.ndim = 1;
    shape.size[0] = 1;
  }
  loss_out.p = static_cast<T*>(a.loss);
  grad_out.p = static_cast<T*>(a.grad);
  const Reduction red = a.reduction == 0 ? Reduction::None : Reduction::Sum;
  return static_cast<double>(elementwise<A>(pol, shape, red, loss_out, grad_out, ops...));
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
