// Cross-entropy CPU kernels (docs/KERNELS.md), compiled once per instruction set by setup.py with
// -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see cpu_isa.h); the bindings are in cross_entropy.cpp.
//
// Two policies of the softmax-row skeleton (softmax_rows.h: passes, layouts, softcap, streaming):
//  - class-index targets: pass 1 adds nothing but the smoothing sum sum_c w_c (m - x_c) with label
//    smoothing (its omega, sum_c w_c, is the same for every row: the skeleton's lane table); pass 2
//    from pass 1's exp values, g_j = A p_j - (ls/C) w_j, and the target column written afterwards
//    from expm1 (ce::index_grad_target_em1, accurate when p_y is close to 1);
//  - probability targets: pass 1 sums w_c t'_c and w_c t'_c (m - x_c); pass 2 recomputes p_j
//    (it reads the target row anyway), g_j = A p_j - w_j t'_j.
// All math in float (double for double input); the per-row formulas are the shared header's
// (csrc/include/fusedloss/cross_entropy.h).
#include "cross_entropy_kernel.h"

#include <c10/util/Exception.h>
#include <fusedloss/cross_entropy.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "softmax_rows.h"
#include "vec.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

[[noreturn]] void bad_target(int64_t y, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "cross_entropy: target ", y, " is out of bounds for ", C,
                    " classes (valid: 0 <= target < ", C, ", or ignore_index = ", ignore_index,
                    ")");
  std::abort();  // unreachable
}

// Pass-1 sums of the class-index policy: none, sum_c (m - x_c), sum_c w_c (m - x_c).
enum SumMode { kNoSum = 0, kSumX = 1, kSumWX = 2 };

// What both policies read of the call.
template <typename A>
struct CeCommon {
  int64_t C;
  const A* w;  // class weights, nullptr: all ones
  A W;         // sum of w (C without w)
  A ls, z, scale;
  A* loss;
  A* lse;
};

template <typename A>
CeCommon<A> ce_common(const CrossEntropyArgs& a) {
  CeCommon<A> k;
  k.C = a.C;
  k.w = static_cast<const A*>(a.weight);
  k.W = static_cast<A>(a.weight_sum);
  k.ls = static_cast<A>(a.label_smoothing);
  k.z = static_cast<A>(a.z_loss);
  k.scale = static_cast<A>(a.loss_scale);
  k.loss = static_cast<A*>(a.loss);
  k.lse = static_cast<A*>(a.lse);
  return k;
}

// Class-index targets (see cross_entropy.h for the formulas). MODE: the smoothing sum.
template <typename A, int MODE>
struct IndexPolicy {
  using V = Vectorized<A>;
  static constexpr int kSums = MODE == kNoSum ? 0 : 1;
  static constexpr SumKind kKinds[1] = {SumKind::kDevTable};
  static constexpr int kCoefs = MODE == kNoSum ? 0 : 1;
  static constexpr bool kElem = false;
  static constexpr bool kStoreExp = true;
  static constexpr bool kGradReadsX = false;
  static constexpr bool kClassOperand = MODE == kSumWX;
  static constexpr Aux kAux = Aux::kForGrad;  // p_y - 1, for the target column's gradient
  const A* class_operand;  // w (kSumWX)
  const A* lane_table;     // lane_sums(C, w) with smoothing
  CeCommon<A> k;
  const int64_t* target;
  int64_t ignore_index;

  struct Row {
    int64_t col;
    bool ignored;
  };
  Row row(int64_t r) const {
    const int64_t y = target[r];
    if (y == ignore_index) return {-1, true};
    if (y < 0 || y >= k.C) bad_target(y, k.C, ignore_index);
    return {y, false};
  }
  template <bool TAIL>
  void sums(V (&acc)[1], const Lanes<V>& v, const V& m, int64_t n) const {
    if constexpr (MODE == kSumX) {
      acc[0] = acc[0] + tail_mask<TAIL>(m - v.x, n);
    } else if constexpr (MODE == kSumWX) {
      acc[0] = at::vec::fmadd(v.w, tail_mask<TAIL>(m - v.x, n), acc[0]);
    }
  }
  // expm1(xs_y - lse) = p_y - 1, with xs_y - lse = (xs_y - m) - log_s (see ce::index_row_diff).
  template <typename W>
  W aux(const W& m, const W& log_s, const W& xs_y) const {
    return vexpm1((xs_y - m) - log_s);
  }
  void epilogue(const Row& rw, int64_t r, const Lse<A>& L, const A* sums, A xs_y, A em1,
                RowOut<A, kCoefs>& out) const {
    k.lse[r] = L.lse;
    if (rw.ignored) {
      k.loss[r] = A(0) * k.scale;  // NaN for an all-ignored 'mean' (scale inf), as torch
      return;
    }
    const A wy = k.w ? k.w[rw.col] : A(1);
    const A d = (L.m - xs_y) + L.log_s;  // lse - xs_y
    const ce::IndexRow<A> ir = ce::index_row_diff<A>(L.lse, L.log_s, d, wy, k.W,
                                                     kSums ? sums[0] : A(0), k.ls, k.z, k.C);
    k.loss[r] = ir.loss * k.scale;
    if (!out.want_grad) return;
    out.pscale = k.scale * ir.A;
    if constexpr (kCoefs > 0) out.k[0] = k.scale * ir.smooth;
    out.fix_col = rw.col;
    out.fix_val = k.scale * ce::index_grad_target_em1(ir, em1, wy);
  }
  // g_j = A p_j - (ls/C) w_j; the target column is fix_val.
  V grad(const V (&c)[1], const V& q, const Lanes<V>& v) const {
    if constexpr (MODE == kSumWX) {
      return q - c[0] * v.w;
    } else if constexpr (MODE == kSumX) {
      return q - c[0];
    } else {
      return q;
    }
  }
};

// Probability targets t, t'_c = keep t_c + add (keep = 1 - ls, add = ls / C).
template <typename A, bool HAS_W>
struct ProbPolicy {
  using V = Vectorized<A>;
  static constexpr int kSums = 2;  // sum w t', sum w t' (m - x)
  static constexpr SumKind kKinds[2] = {SumKind::kPlain, SumKind::kDev};
  static constexpr int kCoefs = 0;
  static constexpr bool kElem = true;
  static constexpr bool kStoreExp = false;
  static constexpr bool kGradReadsX = false;
  static constexpr bool kClassOperand = HAS_W;
  static constexpr Aux kAux = Aux::kNone;
  const A* class_operand;  // w (HAS_W)
  const A* lane_table = nullptr;
  CeCommon<A> k;
  A keep, add;

  struct Row {
    int64_t col = -1;
    bool ignored = false;
  };
  Row row(int64_t) const { return {}; }
  V wt(const Lanes<V>& v) const {  // w t'
    const V r = at::vec::fmadd(V(keep), v.t, V(add));
    if constexpr (HAS_W) {
      return r * v.w;
    } else {
      return r;
    }
  }
  template <bool TAIL>
  void sums(V (&acc)[2], const Lanes<V>& v, const V& m, int64_t n) const {
    const V u = tail_mask<TAIL>(wt(v), n);
    acc[0] = acc[0] + u;
    acc[1] = at::vec::fmadd(u, tail_mask<TAIL>(m - v.x, n), acc[1]);
  }
  template <typename W>
  W aux(const W&, const W&, const W& x) const {
    return x;
  }
  void epilogue(const Row&, int64_t r, const Lse<A>& L, const A* sums, A, A,
                RowOut<A, 0>& out) const {
    k.lse[r] = L.lse;
    const ce::ProbRow<A> pr = ce::prob_row<A>(L.lse, L.log_s, sums[0], sums[1], k.z);
    k.loss[r] = pr.loss * k.scale;
    out.pscale = k.scale * pr.A;
  }
  // g_j = A p_j - w_j t'_j.
  V grad(const V (&)[1], const V& q, const Lanes<V>& v) const { return q - V(k.scale) * wt(v); }
};

template <typename T>
void cross_entropy_typed(const CrossEntropyArgs& a) {
  using A = acc_t<T>;
  RowsLayout<T> lay;
  lay.N = a.N;
  lay.C = a.C;
  lay.D = a.D;
  lay.x = static_cast<const T*>(a.input);
  lay.x_sn = a.in_sn;
  lay.x_sc = a.in_sc;
  lay.x_sd = a.in_sd;
  lay.t = static_cast<const T*>(a.target_prob);
  lay.t_sn = a.tg_sn;
  lay.t_sc = a.tg_sc;
  lay.t_sd = a.tg_sd;
  lay.g = static_cast<T*>(a.grad);
  lay.g_sn = a.gr_sn;
  lay.g_sc = a.gr_sc;
  lay.g_sd = a.gr_sd;
  lay.softcap = a.softcap;
  const CeCommon<A> k = ce_common<A>(a);
  if (a.target_prob) {
    with_bool(k.w != nullptr, [&](auto hw) {
      const ProbPolicy<A, decltype(hw)::value> pol{k.w, nullptr, k, A(1) - k.ls, k.ls / A(a.C)};
      softmax_rows(pol, lay);
    });
    return;
  }
  const int mode = k.ls > A(0) ? (k.w ? kSumWX : kSumX) : kNoSum;
  std::vector<A> lane_w;
  if (mode != kNoSum) lane_w = lane_sums<A>(a.C, k.w);
  with_mode<3>(mode, [&](auto m) {
    const IndexPolicy<A, decltype(m)::value> pol{k.w, lane_w.data(), k, a.target_index,
                                                 a.ignore_index};
    softmax_rows(pol, lay);
  });
}

}  // namespace

void cross_entropy_kernel(const CrossEntropyArgs& args) {
  if (args.N * args.D == 0) return;
  by_dtype(args.dtype, [&](auto tag) { cross_entropy_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
