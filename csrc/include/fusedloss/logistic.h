// The logistic pieces of a logit that BCE-with-logits and sigmoid focal loss share (bce.h,
// sigmoid_focal.h), written once for scalars (CUDA, CPU tests) and CPU vectors. Plain C++ with no
// ATen types: the arithmetic goes through a math-ops struct M (ScalarMath below for one element;
// csrc/cpu/elementwise.h's VecMath for at::vec vectors) with these static members:
//
//   V exp_nonpos(V)      exp of an argument <= 0 (the only exp these formulas take)
//   V log(V), log1p(V)   natural log, log(1 + v)
//   V abs(V), max0(V)    |v|, max(v, 0) (NaN propagates)
//   V if_nonneg(c, a, b) c >= 0 ? a : b        V if_zero(c, a, b)  c == 0 ? a : b
//   V if_nan(c, a, b)    c is NaN ? a : b      bool all_hard(t)    every t is exactly 0 or 1
//
// Everything is taken from e = exp(-|x|) in (0, 1], which never overflows, and r = 1 / (1 + e):
//   sigmoid(|x|) = r,  sigmoid(-|x|) = e r,  softplus(+-x) = max(+-x, 0) + log1p(e),
// so no finite logit gives inf or NaN, and sigmoid(-x) for a large x is e r, not 1 - sigmoid(x)
// (which would cancel to 0).
#pragma once

#include "common.h"

namespace fusedloss {

template <typename T>
FL_HOST_DEVICE T fl_log1p(T x) { return ::log1p(x); }
template <>
FL_HOST_DEVICE float fl_log1p<float>(float x) { return ::log1pf(x); }

// M for one element of type T (float or double).
template <typename T>
struct ScalarMath {
  using V = T;
  static FL_HOST_DEVICE T exp_nonpos(T v) { return fl_exp(v); }
  static FL_HOST_DEVICE T log(T v) { return fl_log(v); }
  static FL_HOST_DEVICE T log1p(T v) { return fl_log1p(v); }
  static FL_HOST_DEVICE T abs(T v) { return v < T(0) ? -v : v; }
  static FL_HOST_DEVICE T max0(T v) { return (v != v || v > T(0)) ? v : T(0); }
  static FL_HOST_DEVICE T if_nonneg(T c, T a, T b) { return c >= T(0) ? a : b; }
  static FL_HOST_DEVICE T if_zero(T c, T a, T b) { return c == T(0) ? a : b; }
  static FL_HOST_DEVICE T if_nan(T c, T a, T b) { return c != c ? a : b; }
  static FL_HOST_DEVICE bool all_hard(T t) { return t == T(0) || t == T(1); }
};

// sigmoid and softplus of x and of -x, accurate at both ends.
template <class M, class V>
struct Logistic {
  V ax;       // |x|
  V e;        // exp(-|x|)
  V l1p;      // log1p(e)
  V r;        // 1 / (1 + e) = sigmoid(|x|)
  V sig_pos;  // sigmoid(x)
  V sig_neg;  // sigmoid(-x)
  V sp_pos;   // softplus(x)  = -logsigmoid(-x)
  V sp_neg;   // softplus(-x) = -logsigmoid(x)
  FL_HOST_DEVICE explicit Logistic(const V& x) {
    const V zero(0), one(1);
    ax = M::abs(x);
    e = M::exp_nonpos(zero - ax);
    l1p = M::log1p(e);
    r = one / (one + e);
    const V er = e * r;
    sig_pos = M::if_nonneg(x, r, er);
    sig_neg = M::if_nonneg(x, er, r);
    sp_pos = M::max0(x) + l1p;
    sp_neg = M::max0(zero - x) + l1p;
  }
};

}  // namespace fusedloss
