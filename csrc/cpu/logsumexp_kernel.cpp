// The lse-only kernel (logsumexp_kernel.h): LsePolicy on the softmax-row skeleton.
#include "logsumexp_kernel.h"

#include "softmax_rows.h"
#include "vec.h"

namespace fusedloss::cpu::CPU_CAPABILITY {

void logsumexp_kernel(const LogsumexpArgs& a) {
  if (a.N * a.D == 0) return;
  by_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    RowsLayout<T> lay{};
    lay.N = a.N;
    lay.C = a.C;
    lay.D = a.D;
    lay.x = static_cast<const T*>(a.input);
    lay.x_sn = a.in_sn;
    lay.x_sc = a.in_sc;
    lay.x_sd = a.in_sd;
    lay.softcap = a.softcap;
    LsePolicy<A> pol;
    pol.lse_out = static_cast<A*>(a.lse);
    softmax_rows(pol, lay);
  });
}

}  // namespace fusedloss::cpu::CPU_CAPABILITY
