// Cross-entropy per-row math, shared by csrc/cpu/cross_entropy.cpp and csrc/cuda/cross_entropy.cu.
//
// Notation for one row r (one (n, d) position of an (N, C, D) input), acc type T (float, or
// double for float64 inputs):
//   xs_c  = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c           (the logits actually used)
//   lse   = log sum_c exp(xs_c) = m + log_s                              (online: max m, sum s)
//   p_c   = exp(xs_c - lse)
// Class-index target y with class weights w (w == 1 without `weight`), smoothing ls, C classes:
//   loss  = (1-ls) w_y (lse - xs_y) + (ls/C) sum_c w_c (lse - xs_c) + z w_y lse^2
//   dloss/dxs_j = A p_j - (ls/C) w_j - [j == y] (1-ls) w_y,
//   A     = (1-ls) w_y + (ls/C) W + 2 z w_y lse,  W = sum_c w_c
// Probability target t (t'_c = (1-ls) t_c + ls/C):
//   loss  = sum_c w_c t'_c (lse - xs_c) + z lse^2
//   dloss/dxs_j = A p_j - w_j t'_j,   A = sum_c w_c t'_c + 2 z lse
// Both: dloss/dx_j = dloss/dxs_j * (1 - (xs_j / softcap)^2) with softcap, and loss and gradient
// are multiplied by the row scale `scale` (1/sum(w_y) for 'mean', else 1). Ignored rows give
// loss 0 * scale (so an all-ignored 'mean' is NaN, as torch) and gradient 0.
//
// Weighted sums S = sum_c v_c (lse - xs_c), v_c >= 0 (v = w t' for probability targets, v = w for
// the smoothing term), are summed from non-negative terms: W lse - sum_c v_c xs_c cancels (a
// confident target's loss is ~1e-4 of lse: 2% error in float32). Pass 1 keeps, relative to the
// running max m,
//   a = sum_c v_c (m - xs_c),  omega = sum_c v_c,   and at the end  S = a + omega log_s.
// When the max rises from m to m' (a new chunk, or merging another lane's / thread's state),
// a += omega (m' - m): dev_rebase. With ls == 0 no smoothing term is formed at all: a class weight
// may be inf (1/count balancing of an absent class), and 0 * inf would be NaN.
#pragma once

#include "common.h"

namespace fusedloss {
namespace ce {

// Online softmax state: running max m and sum s of exp(x - m).
template <typename T>
struct OnlineLSE {
  T m;
  T s;
  FL_HOST_DEVICE OnlineLSE() : m(-INFINITY), s(T(0)) {}
  FL_HOST_DEVICE void update(T x) {
    T m_new = nan_max(m, x);
    // m == -inf and x == -inf: keep s (exp(-inf - -inf) would be NaN).
    if (m_new == -INFINITY) return;
    s = s * fl_exp(m - m_new) + fl_exp(x - m_new);
    m = m_new;
  }
  // Merge a partial state (another block's, another thread's, another rank's).
  FL_HOST_DEVICE void merge(T m2, T s2) {
    T m_new = nan_max(m, m2);
    if (m_new == -INFINITY) return;
    s = s * fl_exp(m - m_new) + s2 * fl_exp(m2 - m_new);
    m = m_new;
  }
  FL_HOST_DEVICE T lse() const { return m + fl_log(s); }
};

template <typename T>
FL_HOST_DEVICE T softcap_fwd(T x, T softcap) {
  return softcap > T(0) ? softcap * fl_tanh(x / softcap) : x;
}

// d xs / d x expressed through xs itself, so the backward needs no second tanh.
template <typename T>
FL_HOST_DEVICE T softcap_grad(T xs, T softcap) {
  if (softcap <= T(0)) return T(1);
  T u = xs / softcap;
  return T(1) - u * u;
}

// A partial sum a = sum v_c (m - xs_c), omega = sum v_c, taken from max m to m_new >= m. Nothing
// to add without weight or when the max did not rise (m may be -inf: 0 * inf would be NaN).
template <typename T>
FL_HOST_DEVICE T dev_rebase(T a, T omega, T m, T m_new) {
  return (omega != T(0) && m_new > m) ? a + omega * (m_new - m) : a;
}

// m - xs for the running max m >= xs; -inf logits (m may be -inf too) are infinitely far.
template <typename T>
FL_HOST_DEVICE T dev_term(T m, T xs) {
  return xs == -T(INFINITY) ? T(INFINITY) : m - xs;
}

// Row coefficients of the class-index gradient; see the notation at the top of the file.
template <typename T>
struct IndexRow {
  T A;         // multiplies p_j
  T smooth;    // (ls / C): multiplies w_j, subtracted from every column
  T target;    // (1 - ls) w_y: subtracted at the target column
  T loss;      // unscaled row loss
};

// smooth * w, and 0 without smoothing whatever w is (w may be inf).
template <typename T>
FL_HOST_DEVICE T smooth_weight(const IndexRow<T>& r, T w) {
  return r.smooth != T(0) ? r.smooth * w : T(0);
}

// lse = m + log_s: the row's logsumexp; lse_minus_xs_y: lse - xs_y, passed in as
// (m - xs_y) + log_s, which keeps its digits when the logits are large (|x| ~ 100: the rounding
// of lse alone is then ~1e-5); wy: weight of the target class; W: sum of class weights (C without
// weight); sum_wd: sum_c w_c (m - xs_c) (see dev_rebase). W and sum_wd are only read when ls > 0.
template <typename T>
FL_HOST_DEVICE IndexRow<T> index_row_diff(T lse, T log_s, T lse_minus_xs_y, T wy, T W, T sum_wd,
                                          T ls, T z, long C) {
  IndexRow<T> r;
  r.smooth = ls / T(C);
  r.target = (T(1) - ls) * wy;
  r.A = (ls > T(0) ? r.target + r.smooth * W : r.target) + T(2) * z * wy * lse;
  r.loss = r.target * lse_minus_xs_y + z * wy * lse * lse;
  if (ls > T(0)) {
    T sm = sum_wd + W * log_s;  // sum_c w_c (lse - xs_c)
    // An inf class weight: torch's term is inf * (lse - xs_c) > 0; here it is inf * 0 where that
    // class is the max.
    if (W == T(INFINITY)) sm = T(INFINITY);
    r.loss += r.smooth * sm;
  }
  return r;
}

// Gradient with respect to the softcapped logit at a non-target column.
template <typename T>
FL_HOST_DEVICE T index_grad(const IndexRow<T>& r, T xs, T lse, T w) {
  return r.A * fl_exp(xs - lse) - smooth_weight(r, w);
}

// At the target column p_y is close to 1 for a confident prediction, and A p_y - target loses all
// its digits when p_y is rounded first (Liger PR 1329). Written as A (p_y - 1) + (A - target) with
// p_y - 1 = expm1(xs_y - lse) (computed by the caller, maybe vectorised), it keeps full relative
// accuracy. An infinite A (inf class weight with smoothing) would give inf - inf there: then
// A p_y - target, inf like torch's.
template <typename T>
FL_HOST_DEVICE T index_grad_target_em1(const IndexRow<T>& r, T expm1_xs_y_minus_lse, T wy) {
  const T sw = smooth_weight(r, wy);
  if (r.A == T(INFINITY) || r.A == -T(INFINITY)) {
    return r.A * (expm1_xs_y_minus_lse + T(1)) - (r.target + sw);
  }
  return r.A * expm1_xs_y_minus_lse + (r.A - r.target - sw);
}

template <typename T>
FL_HOST_DEVICE T index_grad_target(const IndexRow<T>& r, T xs_y, T lse, T wy) {
  return index_grad_target_em1(r, fl_expm1(xs_y - lse), wy);
}

// The same with xs_y - lse passed in (see index_row_diff).
template <typename T>
FL_HOST_DEVICE T index_grad_target_diff(const IndexRow<T>& r, T xs_y_minus_lse, T wy) {
  return index_grad_target_em1(r, fl_expm1(xs_y_minus_lse), wy);
}

// Probability targets: per-row sums gathered in the first pass over the row.
template <typename T>
struct ProbRow {
  T A;     // multiplies p_j
  T loss;  // unscaled row loss
};

// lse = m + log_s; sum_wt = sum_c w_c t'_c; sum_wtd = sum_c w_c t'_c (m - xs_c) (see dev_rebase).
template <typename T>
FL_HOST_DEVICE ProbRow<T> prob_row(T lse, T log_s, T sum_wt, T sum_wtd, T z) {
  ProbRow<T> r;
  r.A = sum_wt + T(2) * z * lse;
  r.loss = sum_wtd + sum_wt * log_s + z * lse * lse;
  return r;
}

template <typename T>
FL_HOST_DEVICE T smoothed_prob(T t, T ls, long C) {
  return (T(1) - ls) * t + ls / T(C);
}

// wt = w_j t'_j.
template <typename T>
FL_HOST_DEVICE T prob_grad(const ProbRow<T>& r, T xs, T lse, T wt) {
  return r.A * fl_exp(xs - lse) - wt;
}

}  // namespace ce
}  // namespace fusedloss
