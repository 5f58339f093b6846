// BCE-with-logits per-element math, shared by csrc/cpu/bce_kernel.cpp (vectors) and
// csrc/cuda/bce.cu (one element); see logistic.h for the math-ops struct M.
//
// torch's loss per element, logit x, target t, pos_weight pw (1 without it), weight w:
//   l     = w [(1 - t) x - (1 + (pw - 1) t) logsigmoid(x)]
//         = w [(1 - t) softplus(x) + pw t softplus(-x)]          (the form computed here)
//   dl/dx = w [(1 + (pw - 1) t) sigmoid(x) - pw t]
//         = w [(1 - t) sigmoid(x) - pw t sigmoid(-x)]
// The rewritten forms are sums of non-negative terms for t in [0, 1]: torch's (1 - t) x - ...
// cancels for a confident correct logit (x = -20, t = 0: -20 + 20.000000002), and
// sigmoid(x) - 1 cancels where sigmoid(-x) does not. Targets are not range-checked (soft labels).
#pragma once

#include "logistic.h"

namespace fusedloss {
namespace bce {

// The loss and gradient of one element (or one vector of them) before the weight w: the caller
// multiplies both by w and the gradient by the 'mean' factor. KPW: pos_weight given (pw is read).
template <class M, bool KPW, class V>
FL_HOST_DEVICE void elem(const V& x, const V& t, const V& pw, V& loss, V& grad) {
  const Logistic<M, V> l(x);
  const V a = V(1) - t;
  V b = t;
  if constexpr (KPW) b = pw * t;
  loss = a * l.sp_pos + b * l.sp_neg;
  grad = M::if_nan(x, x, a * l.sig_pos - b * l.sig_neg);
}

}  // namespace bce
}  // namespace fusedloss
