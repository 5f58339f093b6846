// scale_grad_ CPU kernel (docs/KERNELS.md), compiled once per instruction set: the elementwise
// skeleton with a policy of one multiply. grad *= factor, where the factor is the upstream
// gradient broadcast by stride (0 over C, and over N and D when it is one scalar); an element that
// is exactly 0 stays 0 (g == 0 ? 0 : g * s), so a NaN or inf upstream gradient does not reach the
// zero gradient of ignored rows (torch's is exactly 0 there). float32 math (float64 for float64
// grads), rounded once to grad's dtype.
#include "scale_grad_kernel.h"

#include "elementwise.h"
#include "vec.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

template <typename A>
struct ScaleKeepZero {
  using V = Vectorized<A>;
  static constexpr bool kLoss = false;
  static constexpr bool kGrad = true;
  // in[0]: grad, in[1]: factor.
  void operator()(const V (&in)[2], V& /*loss*/, V& grad) const {
    grad = V::blendv(in[0] * in[1], V(0), in[0] == V(0));
  }
};

template <typename T>
void scale_grad_typed(const ScaleGradArgs& a) {
  using A = acc_t<T>;
  EwShape shape;
  shape.ndim = 3;
  shape.size[0] = a.N;
  shape.size[1] = a.C;
  shape.size[2] = a.D;
  T* g = static_cast<T*>(a.grad);
  const Strided<T> gout{g, {a.g_sn, a.g_sc, a.g_sd}};
  const Strided<const T> gin{g, {a.g_sn, a.g_sc, a.g_sd}};
  const A scalar = static_cast<A>(a.scalar);
  const Strided<const A> factor =
      a.grad_loss ? Strided<const A>{static_cast<const A*>(a.grad_loss), {a.l_sn, 0, a.l_sd}}
                  : Strided<const A>{&scalar, {0, 0, 0}};
  elementwise<A>(ScaleKeepZero<A>(), shape, Reduction::None, Strided<A>{}, gout, gin, factor);
}

}  // namespace

void scale_grad_kernel(const ScaleGradArgs& args) {
  by_dtype(args.dtype, [&](auto tag) { scale_grad_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
