// Softmax focal loss per-row math, shared by csrc/cpu/softmax_focal_kernel.cpp and
// csrc/cuda/softmax_focal.cu (kernels/softmax_focal.py mirrors it).
//
// One row (position (n, d) of an (N, C, D) input), target class k = y, class weight w = w_y (1
// without `weight`), l = log_softmax(x), p = exp(l), in log space relative to the row's max:
//   d   = lse - x_k = (m - x_k) + log_s = -l_k >= 0
//   em1 = expm1(-d) = p_k - 1,   q = 1 - p_k = -em1   (no cancellation when p_k is near 1)
//   loss       = w q^gamma d
//   dloss/dx_j = A (p_j - [j == k]),   A = w q^gamma (1 + gamma p_k d / q)
// (the focal factor's derivative d(q^gamma)/dx_j = -gamma q^(gamma-1) p_k ([j == k] - p_j)). The
// target column is written as A * em1 (A (p_k - 1) without the cancellation of p_k - 1).
// The ratio d / q = -l_k / (1 - p_k) tends to 1 as q -> 0; at q == 0 exactly (p_k rounds to 1)
// the row is guarded: q^gamma is 0 for gamma > 0 and 1 for gamma == 0, the ratio taken as 1, so a
// gamma < 1 gives a finite 0 gradient, never inf * 0. gamma == 0 is cross-entropy's row
// (A = w, loss = w d). Loss and gradient are multiplied by the row scale (the 'mean' factor).
//
// 'mean' and 'sum' return block sums of the rows' losses (row_blocks.h), not one loss per row.
#pragma once

#include <cstdint>

#include "common.h"
#include "row_blocks.h"

namespace fusedloss {
namespace sfocal {

// q^gamma for q in [0, 1]: the common gammas without pow (0, 1, 2, 3, 4), 0^gamma = 0 for
// gamma > 0 and 1 for gamma == 0.
template <typename T>
FL_HOST_DEVICE T focal_pow(T q, T gamma) {
  if (gamma == T(0)) return T(1);
  if (gamma == T(1)) return q;
  if (gamma == T(2)) return q * q;
  if (gamma == T(3)) return q * q * q;
  if (gamma == T(4)) {
    const T q2 = q * q;
    return q2 * q2;
  }
  if (q <= T(0)) return T(0);
  return fl_exp(gamma * fl_log(q));
}

template <typename T>
struct FocalRow {
  T loss;  // w q^gamma d
  T A;     // gradient coefficient of p_j
  T g_y;   // the target column's gradient, A * em1
};

// d = lse - x_y >= 0 (NaN propagates), em1 = expm1(-d), w = w_y.
template <typename T>
FL_HOST_DEVICE FocalRow<T> focal_row(T d, T em1, T w, T gamma) {
  FocalRow<T> r;
  if (gamma == T(0)) {  // cross-entropy
    r.loss = w * d;
    r.A = w;
    r.g_y = w * em1;
    return r;
  }
  const T q = -em1;
  const T qg = focal_pow(q, gamma);
  const T p = T(1) + em1;
  const T ratio = q > T(0) ? d / q : T(1);  // -l_k / (1 - p_k) -> 1 as q -> 0
  r.loss = w * qg * d;
  r.A = w * qg * (T(1) + gamma * p * ratio);
  r.g_y = r.A * em1;
  return r;
}

}  // namespace sfocal
}  // namespace fusedloss
