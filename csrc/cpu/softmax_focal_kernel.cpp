// Softmax focal loss CPU kernel (docs/KERNELS.md), compiled once per instruction set by setup.py
// with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see cpu_isa.h); the binding is softmax_focal.cpp.
//
// A policy of the softmax-row skeleton (softmax_rows.h) with no extra pass-1 sums: the epilogue
// takes d = lse - x_y and em1 = expm1(x_y - lse) = p_y - 1 (the skeleton's aux, vectorised over
// a tile of rows on the spatial path) to the row's loss w_y q^gamma d and the gradient
// coefficient A (csrc/include/fusedloss/softmax_focal.h); pass 2 from pass 1's exp values,
// g_j = A p_j, the target column A * em1. The loss goes to the skeleton's per-row output ('none')
// or its block sums ('mean', 'sum': row_blocks.h). All math in float (double for double input).
#include "softmax_focal_kernel.h"

#include <c10/util/Exception.h>
#include <fusedloss/softmax_focal.h>

#include <cstdint>
#include <cstdlib>

#include "softmax_rows.h"
#include "vec.h"

namespace fusedloss::cpu::CPU_CAPABILITY {
namespace {

[[noreturn]] void bad_target(int64_t y, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "softmax_focal_loss: target ", y, " is out of bounds for ", C,
                    " classes (valid: 0 <= target < ", C, ", or ignore_index = ", ignore_index,
                    ")");
  std::abort();  // unreachable
}

template <typename A>
struct FocalPolicy {
  using V = Vectorized<A>;
  static constexpr int kSums = 0;
  static constexpr SumKind kKinds[1] = {SumKind::kPlain};
  static constexpr int kCoefs = 0;
  static constexpr bool kElem = false;
  static constexpr bool kStoreExp = true;
  static constexpr bool kGradReadsX = false;
  static constexpr bool kClassOperand = false;
  static constexpr Aux kAux = Aux::kAlways;  // p_y - 1: the loss needs it too
  static constexpr bool kRowLoss = true;
  const A* class_operand = nullptr;
  const A* lane_table = nullptr;
  int64_t C;
  const A* w;  // class weights, nullptr: all ones
  A gamma, scale;
  const int64_t* target;
  int64_t ignore_index;

  struct Row {
    int64_t col;
    bool ignored;
  };
  Row row(int64_t r) const {
    const int64_t y = target[r];
    if (y == ignore_index) return {-1, true};
    if (y < 0 || y >= C) bad_target(y, C, ignore_index);  // before w[y] or x[y] is read
    return {y, false};
  }
  template <bool TAIL>
  void sums(V (&)[1], const Lanes<V>&, const V&, int64_t) const {}
  // expm1(xs_y - lse) = p_y - 1, with xs_y - lse = (xs_y - m) - log_s.
  template <typename W>
  W aux(const W& m, const W& log_s, const W& xs_y) const {
    return vexpm1((xs_y - m) - log_s);
  }
  void epilogue(const Row& rw, int64_t, const Lse<A>& L, const A*, A xs_y, A em1,
                RowOut<A, 0>& out) const {
    if (rw.ignored) {
      out.loss = A(0) * scale;  // NaN for an all-ignored 'mean' (scale inf), as torch
      return;
    }
    const A wy = w ? w[rw.col] : A(1);
    const A d = (L.m - xs_y) + L.log_s;  // lse - xs_y
    const sfocal::FocalRow<A> fr = sfocal::focal_row<A>(d, em1, wy, gamma);
    out.loss = fr.loss * scale;
    if (!out.want_grad) return;
    out.pscale = scale * fr.A;
    out.fix_col = rw.col;
    out.fix_val = scale * fr.g_y;
  }
  V grad(const V (&)[1], const V& q, const Lanes<V>&) const { return q; }
};

template <typename T>
void softmax_focal_typed(const SoftmaxFocalArgs& a) {
  using A = acc_t<T>;
  RowsLayout<T> lay{};
  lay.N = a.N;
  lay.C = a.C;
  lay.D = a.D;
  lay.x = static_cast<const T*>(a.input);
  lay.x_sn = a.in_sn;
  lay.x_sc = a.in_sc;
  lay.x_sd = a.in_sd;
  lay.t = nullptr;
  lay.g = static_cast<T*>(a.grad);
  lay.g_sn = a.gr_sn;
  lay.g_sc = a.gr_sc;
  lay.g_sd = a.gr_sd;
  lay.softcap = 0.0;
  lay.row_loss = a.row_loss;
  lay.block_loss = a.block_loss;
  FocalPolicy<A> pol;
  pol.C = a.C;
  pol.w = static_cast<const A*>(a.weight);
  pol.gamma = static_cast<A>(a.gamma);
  pol.scale = static_cast<A>(a.loss_scale);
  pol.target = a.target;
  pol.ignore_index = a.ignore_index;
  softmax_rows(pol, lay);
}

}  // namespace

void softmax_focal_kernel(const SoftmaxFocalArgs& args) {
  if (args.N * args.D == 0) return;
  by_dtype(args.dtype, [&](auto tag) { softmax_focal_typed<decltype(tag)>(args); });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
