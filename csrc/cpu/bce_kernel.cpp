// BCE-with-logits CPU kernel (docs/KERNELS.md), compiled once per instruction set: the per-element
// math of csrc/include/fusedloss/bce.h as a policy on the elementwise skeleton. One pass: loss
// ('none': per element; 'mean'/'sum': the deterministic block sums, no per-element tensor) and,
// when asked, the gradient times the 'mean' factor. weight and pos_weight are read by stride.
#include "bce_kernel.h"

#include <fusedloss/bce.h>

#include "elementwise_loss.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// Operands: x, t, then w (KW), then pw (KPW).
template <typename A, bool KW, bool KPW>
struct BcePolicy {
  using V = Vectorized<A>;
  static constexpr bool kLoss = true;
  static constexpr bool kGrad = true;
  static constexpr int kDense = 2;
  V grad_scale;
  template <int K>
  void operator()(const V (&in)[K], V& loss, V& grad) const {
    V l, g;
    bce::elem<VecMath<A>, KPW>(in[0], in[1], in[K - 1], l, g);
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
double bce_typed(const EwLossArgs& a) {
  using A = acc_t<T>;
  const auto x = ew_in<T>(a.x);
  const auto t = ew_in<U>(a.t);
  const Vectorized<A> gs(static_cast<A>(a.grad_scale));
  const bool kw = a.w.p != nullptr, kpw = a.pw.p != nullptr;
  if (kw && kpw) {
    return ew_loss_run<A, T>(BcePolicy<A, true, true>{gs}, a, x, t, ew_in<U>(a.w), ew_in<U>(a.pw));
  } else if (kw) {
    return ew_loss_run<A, T>(BcePolicy<A, true, false>{gs}, a, x, t, ew_in<U>(a.w));
  } else if (kpw) {
    return ew_loss_run<A, T>(BcePolicy<A, false, true>{gs}, a, x, t, ew_in<U>(a.pw));
  }
  return ew_loss_run<A, T>(BcePolicy<A, false, false>{gs}, a, x, t);
}

}  // namespace

double bce_kernel(const EwLossArgs& args) {
  double total = 0;
  ew_dtypes(args, [&](auto tt, auto ut) {
    total = bce_typed<decltype(tt), decltype(ut)>(args);
  });
  return total;
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
