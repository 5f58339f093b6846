// logsumexp_fwd on CUDA: the lse-only policy of the softmax-row skeleton (pass 1 alone).
//
// The partial logsumexp of each rank's vocabulary slice in fusedloss.distributed: one read of the
// logits, no target, no gradient. Contract: docs/KERNELS.md (logsumexp_fwd). lse = m + log(s) of the
// (softcapped) logits, in the accumulation dtype; a row with a NaN or +inf logit gives NaN (as
// cross_entropy_fwd's lse), an all -inf row -inf.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common.cuh"
#include "fusedloss/cross_entropy.h"
#include "softmax_rows.cuh"

namespace fusedloss {
namespace cuda {
namespace {

template <typename scalar_t_, typename acc_t_>
struct LsePolicy {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using Extra = NoExtra;
  struct Row {};
  struct Coef {
    acc_t lse;
  };
  static constexpr bool kAux = false;

  acc_t* lse;  // (N, D) contiguous
  acc_t softcap;

  __device__ __forceinline__ void prepare() {}
  __device__ __forceinline__ acc_t logit(acc_t x) const { return ce::softcap_fwd(x, softcap); }
  __device__ __forceinline__ Row row(int64_t, int64_t, const scalar_t*, int64_t, bool) const {
    return Row{};
  }
  __device__ __forceinline__ bool extra_sums(const Row&) const { return false; }
  __device__ __forceinline__ void accumulate(Extra&, const Row&, int64_t, acc_t, acc_t,
                                             acc_t) const {}
  __device__ __forceinline__ Coef epilogue(const Row&, const ce::OnlineLSE<acc_t>& st,
                                           const Extra&) const {
    return Coef{st.lse()};
  }
  __device__ __forceinline__ void store_row(int64_t r, const Coef& c) const { lse[r] = c.lse; }
  // No pass 2 is launched (no gradient pointer); these complete the policy.
  __device__ __forceinline__ bool zero_grad(const Row&, const Coef&) const { return true; }
  __device__ __forceinline__ acc_t grad(const Coef&, const Row&, int64_t, acc_t, acc_t) const {
    return acc_t(0);
  }
};

at::Tensor logsumexp_fwd_cuda(const at::Tensor& input, double softcap) {
  const char* op = "fusedloss_C::logsumexp_fwd";
  check_ncd_input(input, op);
  TORCH_CHECK(!(softcap != softcap), op, ": softcap must not be NaN");
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  at::Tensor lse = at::empty({N, D}, input.options().dtype(acc_dtype(input.scalar_type())));
  const int64_t rows = N * D;
  if (rows == 0) return lse;
  TORCH_CHECK(C > 0, op, ": input has no classes (C = 0)");
  c10::cuda::CUDAGuard guard(input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_logsumexp_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const RowsArgs<scalar_t> a = input_rows_args<scalar_t>(input);
        LsePolicy<scalar_t, acc_t> pol;
        pol.lse = lse.mutable_data_ptr<acc_t>();
        pol.softcap = softcap > 0.0 ? static_cast<acc_t>(softcap) : acc_t(0);
        launch_softmax_rows(a, pol);
      });
  return lse;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("logsumexp_fwd", &fusedloss::cuda::logsumexp_fwd_cuda);
}
