// Total-variation CPU kernel (docs/KERNELS.md), compiled once per instruction set: the policy of
// csrc/include/fusedloss/tv.h (one pixel's terms and their fluxes) on the stencil skeleton
// (stencil.h), on at::vec vectors of the accumulation type.
#include "tv_kernel.h"

#include "stencil.h"
#include "vec.h"

#include <fusedloss/tv.h>

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

// tv.h's operations on vectors (ScalarOps on scalars).
template <typename A>
struct VecOps {
  using V = Vectorized<A>;
  static V abs(const V& x) { return x.abs(); }
  static V sgn(const V& x) {  // 1, -1, or x itself (0, -0 or NaN)
    const V zero(0);
    return V::blendv(V::blendv(x, V(-1), x < zero), V(1), x > zero);
  }
  static void norm(const V& n2, V& n, V& inv) {
    n = n2.sqrt();
    inv = V::blendv(n.reciprocal(), V(0), n == V(0));
  }
};

// The stencil policy: dv = down - x, dh = right - x; d_self = -(fv + fh), d_down = fv,
// d_right = fh.
template <typename A, int kNorm>
struct TvPolicy {
  using V = Vectorized<A>;
  V eps;
  template <bool kGrad>
  void apply(const V& x, const V& down, const V& right, const V& w, V& loss, V& d_self,
             V& d_down, V& d_right) const {
    V fv, fh;
    tv::pixel<kNorm, kGrad, VecOps<A>>(down - x, right - x, w, eps, loss, fv, fh);
    if constexpr (kGrad) {
      d_down = fv;
      d_right = fh;
      d_self = V(0) - (fv + fh);
    }
  }
};

template <typename T>
void tv_typed(const TvArgs& t) {
  using A = acc_t<T>;
  StencilArgs a;
  a.P = t.P;
  a.Q = t.Q;
  a.H = t.H;
  a.W = t.W;
  a.x = t.input;
  a.w = t.weight;
  a.w_dtype = t.w_dtype;
  a.g = t.grad;
  for (int k = 0; k < 4; ++k) {
    a.xs[k] = t.xs[k];
    a.ws[k] = t.ws[k];
    a.gs[k] = t.gs[k];
  }
  a.scale = t.scale;
  a.loss = t.loss;
  with_mode<3>(t.norm, [&](auto norm) {
    TvPolicy<A, decltype(norm)::value> pol{Vectorized<A>(static_cast<A>(t.eps))};
    with_bool(t.grad != nullptr, [&](auto grad) {
      with_bool(t.weight != nullptr, [&](auto weight) {
        stencil2d<T, decltype(grad)::value, decltype(weight)::value>(pol, a);
      });
    });
  });
}

}  // namespace

void tv_kernel(const TvArgs& args) {
  by_dtype(args.dtype, [&](auto tag) { tv_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
