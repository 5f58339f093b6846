// Sigmoid focal loss CPU kernel (docs/KERNELS.md), compiled once per instruction set: the
// per-element math of csrc/include/fusedloss/sigmoid_focal.h (log space) as a policy on the
// elementwise skeleton. One pass: loss ('none': per element; 'mean'/'sum': the deterministic
// block sums, no per-element tensor) and, when asked, the gradient times the 'mean' factor.
// weight is read by stride.
#include "sigmoid_focal_kernel.h"

#include <fusedloss/sigmoid_focal.h>

#include "elementwise_loss.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// Operands: x, t, then w (KW).
template <typename A, bool KW>
struct SigmoidFocalPolicy {
  using V = Vectorized<A>;
  static constexpr bool kLoss = true;
  static constexpr bool kGrad = true;
  static constexpr int kDense = 2;
  A alpha, gamma;
  V grad_scale;
  template <int K>
  void operator()(const V (&in)[K], V& loss, V& grad) const {
    V l, g;
    sigmoid_focal::elem<VecMath<A>>(in[0], in[1], alpha, gamma, l, g);
    if constexpr (KW) {
      loss = in[2] * l;
      grad = (in[2] * grad_scale) * g;
    } else {
      loss = l;
      grad = grad_scale * g;
    }
  }
};

template <typename T, typename U>
double sigmoid_focal_typed(const EwLossArgs& a) {
  using A = acc_t<T>;
  const auto x = ew_in<T>(a.x);
  const auto t = ew_in<U>(a.t);
  const A alpha = static_cast<A>(a.alpha), gamma = static_cast<A>(a.gamma);
  const Vectorized<A> gs(static_cast<A>(a.grad_scale));
  if (a.w.p != nullptr) {
    return ew_loss_run<A, T>(SigmoidFocalPolicy<A, true>{alpha, gamma, gs}, a, x, t,
                             ew_in<U>(a.w));
  }
  return ew_loss_run<A, T>(SigmoidFocalPolicy<A, false>{alpha, gamma, gs}, a, x, t);
}

}  // namespace

double sigmoid_focal_kernel(const EwLossArgs& args) {
  double total = 0;
  ew_dtypes(args, [&](auto tt, auto ut) {
    total = sigmoid_focal_typed<decltype(tt), decltype(ut)>(args);
  });
  return total;
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
