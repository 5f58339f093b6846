// Sigmoid focal loss per-element math (torchvision's definition, soft targets), shared by
// csrc/cpu/sigmoid_focal_kernel.cpp (vectors) and csrc/cuda/sigmoid_focal.cu (one element); see
// logistic.h for the math-ops struct M.
//
// Logit x, target t, p = sigmoid(x):
//   CE  = t softplus(-x) + (1 - t) softplus(x)                        (BCE with logits)
//   q   = 1 - p_t = t sigmoid(-x) + (1 - t) sigmoid(x)
//   a_t = alpha t + (1 - alpha)(1 - t)            (alpha < 0: a_t = 1)
//   L   = a_t q^gamma CE
//   dL/dx = a_t q^gamma [(p - t) - gamma (2t - 1) (sigmoid(x) sigmoid(-x) / q) CE]
// with p - t = (1 - t) sigmoid(x) - t sigmoid(-x) (no cancellation for a hard target).
//
// Log space. With e = exp(-|x|), r = 1/(1+e), the sigmoid of |x| is r and that of -|x| is e r, so
//   q = (c_big + c_small e) r,   c_big = (x >= 0 ? 1 - t : t),  c_small = (x >= 0 ? t : 1 - t)
//   log q = log(c_big + c_small e) - log1p(e)        (= -|x| - log1p(e) when c_big == 0)
//   sigmoid(x) sigmoid(-x) / q = e r / (c_big + c_small e)   (= r when c_big == 0)
// and q^gamma = exp(gamma log q): for a hard target log q is exactly logsigmoid(-z), z = (2t-1) x,
// and nothing underflows to 0 before it is raised to gamma (a logit of +-100 in fp16 with
// gamma = 0.5 has a finite loss and gradient; autograd's gamma (1-p_t)^(gamma-1) * 0 is NaN
// there). gamma == 0 is the factor 1 exactly (exp(0 * log 0) would be NaN). Vectors whose targets
// are all exactly 0 or 1 skip the log and the division (c_big + c_small e is 1 or e there).
#pragma once

#include "logistic.h"

namespace fusedloss {
namespace sigmoid_focal {

// The loss and gradient of one element (or one vector) before the weight w: the caller multiplies
// both by w and the gradient by the 'mean' factor. alpha < 0 disables a_t.
template <class M, class V, typename A>
FL_HOST_DEVICE void elem(const V& x, const V& t, A alpha, A gamma, V& loss, V& grad) {
  const Logistic<M, V> l(x);
  const V one(1), zero(0);
  const V a = one - t;
  const V ce = a * l.sp_pos + t * l.sp_neg;
  const V pmt = a * l.sig_pos - t * l.sig_neg;
  if (gamma == A(0)) {
    loss = ce;
    grad = pmt;
  } else {
    const V c_big = M::if_nonneg(x, a, t);
    const V er = l.e * l.r;
    V log_q, ratio;
    if (M::all_hard(t)) {  // c_big + c_small e is 1 (c_big = 1) or e (c_big = 0)
      log_q = M::if_zero(c_big, zero - l.ax, zero) - l.l1p;
      ratio = M::if_zero(c_big, l.r, er);
    } else {
      const V c_small = M::if_nonneg(x, t, a);
      const V u = c_big + c_small * l.e;
      log_q = M::if_zero(c_big, zero - l.ax, M::log(u)) - l.l1p;
      ratio = M::if_zero(c_big, l.r, er / u);
    }
    const V g(gamma);
    const V f = M::exp_nonpos(g * log_q);  // q <= 1: log q <= 0
    loss = f * ce;
    grad = f * (pmt - g * (t - a) * ratio * ce);
  }
  if (alpha >= A(0)) {
    const V at = V(alpha) * t + V(A(1) - alpha) * a;
    loss = at * loss;
    grad = at * grad;
  }
  grad = M::if_nan(x, x, grad);
}

}  // namespace sigmoid_focal
}  // namespace fusedloss
