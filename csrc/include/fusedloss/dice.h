// Dice / Tversky / Dice+CE per-position math, shared by csrc/cpu/dice_kernel.cpp and
// csrc/cuda/dice.cu (kernels/dice.py mirrors it). The device ops compute only the per-(n, c) sums
// of docs/KERNELS.md ("dice"); the loss is a function of those sums, taken in Python, whose
// autograd gives the upstream gradient of each sum: gS[n, c, k] for k in DiceSum.
//
// Softmax mode, one non-ignored position (n, d) with class y, p = softmax(z) over C:
//   I[c] += p_c [c == y]      P[c] += p_c (p_c^2 with squared_pred)     G[y] += 1
//   NLL[y] += lse - z_y (with_ce)             SM[c] += lse - z_c (with_smoothing)
// Gradient of sum_{c,k} gS[c, k] S[c, k] with respect to z_j, u_c = dL/dp_c:
//   u_c  = gI[c] [c == y] + gP[c] (2 p_c with squared_pred, else 1)
//   dz_j = p_j (u_j - sum_c p_c u_c) + gNLL[y] (p_j - [j == y]) + (p_j sum_c gSM[c] - gSM[j])
// Sigmoid mode, element (n, c, d) with float target g, p = sigmoid(z):
//   I += p g    P += p (p^2)    G += g (g^2)
//   dz = p (1 - p) (gI g + gP (2 p or 1)),  p (1 - p) = sigmoid(z) sigmoid(-z)
#pragma once

#include "common.h"

namespace fusedloss {
namespace dice {

// Index of each sum in the last dimension of the (N, C, kSums) sums tensor.
enum DiceSum : int { kI = 0, kP = 1, kG = 2, kNLL = 3, kSM = 4, kSums = 5 };

// u_c of the softmax gradient for class c at a position whose class is y.
template <typename T>
FL_HOST_DEVICE T softmax_u(T p, bool is_target, T gI, T gP, bool squared_pred) {
  return (is_target ? gI : T(0)) + gP * (squared_pred ? T(2) * p : T(1));
}

// dz_j of a softmax position: s = sum_c p_c u_c, sum_gsm = sum_c gSM[c] (0 without smoothing),
// g_nll = gNLL[y] (0 without CE), g_sm = gSM[j].
template <typename T>
FL_HOST_DEVICE T softmax_grad(T p, T u, T s, bool is_target, T g_nll, T sum_gsm, T g_sm) {
  return p * (u - s) + g_nll * (p - (is_target ? T(1) : T(0))) + (p * sum_gsm - g_sm);
}

// dz of a sigmoid element: p = sigmoid(z), q = sigmoid(-z) = 1 - p without cancellation.
template <typename T>
FL_HOST_DEVICE T sigmoid_grad(T p, T q, T g, T gI, T gP, bool squared_pred) {
  return p * q * (gI * g + gP * (squared_pred ? T(2) * p : T(1)));
}

// One value x folded into an online logsumexp state (m = max so far, s = sum exp(x - m)) with a
// single exp: the larger of (m, x) is the new max and the other's term is exp(-|x - m|). Starts
// from m = -inf, s = 0; a -inf value adds nothing (both -inf would make exp(NaN)); a NaN value
// makes s NaN (and the lse m + log s NaN). lse = m + log(s).
template <typename T>
FL_HOST_DEVICE void lse_step(T& m, T& s, T x) {
  if (x == -T(INFINITY)) return;
  const T t = x - m;
  const bool up = t > T(0);
  const T e = fl_exp(up ? -t : t);
  s = up ? s * e + T(1) : s + e;
  m = up ? x : m;
}

// 1 / x for x in [1, 2] (or NaN). On the device, float takes the fast reciprocal (__fdividef,
// about 1 ulp here): the IEEE division's slow path for denormal / huge operands, which cannot occur
// in this range, is a called subroutine that made the CUDA sigmoid kernel spill.
template <typename T>
FL_HOST_DEVICE T recip_1_2(T x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) return __fdividef(T(1), x);
#endif
  return T(1) / x;
}

// p = sigmoid(z) and q = sigmoid(-z) = 1 - p, each without cancellation, with one exp.
template <typename T>
FL_HOST_DEVICE void sigmoid_pq(T z, T& p, T& q) {
  const T e = fl_exp(z >= T(0) ? -z : z);  // exp(-|z|); NaN for NaN z
  const T r = recip_1_2(T(1) + e);
  const bool pos = z >= T(0);
  p = pos ? r : e * r;
  q = pos ? e * r : r;
}

// softmax_u / softmax_grad with the class test as a value, is_target = 1 or 0 of type T: for a T whose
// lanes are positions of different classes (the CPU kernel's at::vec vectors, lanes = positions).
// Equal to softmax_u / softmax_grad for is_target in {0, 1} and finite upstream gradients.
template <typename T>
FL_HOST_DEVICE T softmax_u_w(T p, T is_target, T gI, T gP, bool squared_pred) {
  return is_target * gI + gP * (squared_pred ? T(2) * p : T(1));
}

template <typename T>
FL_HOST_DEVICE T softmax_grad_w(T p, T u, T s, T is_target, T g_nll, T sum_gsm, T g_sm) {
  return p * (u - s) + g_nll * (p - is_target) + (p * sum_gsm - g_sm);
}

// The terms a position adds to P (p or p^2) and G (g or g^2) of its class c.
template <typename T>
FL_HOST_DEVICE T pred_term(T p, bool squared_pred) {
  return squared_pred ? p * p : p;
}

}  // namespace dice
}  // namespace fusedloss
