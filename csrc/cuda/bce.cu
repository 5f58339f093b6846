// bce_fwd on CUDA (schema in csrc/registration.cpp, contract in docs/KERNELS.md): torch's
// binary_cross_entropy_with_logits per element, the math of csrc/include/fusedloss/bce.h as a
// policy on the elementwise skeleton (elementwise.cuh): one pass, weight and pos_weight read by
// stride, 'mean' / 'sum' as deterministic block partials (no per-element tensor).
#include <torch/library.h>

#include <fusedloss/bce.h>

#include "common.cuh"
#include "elementwise.cuh"

namespace fusedloss {
namespace cuda {
namespace {

// Operands: t, then w (KW), then pw (KPW).
template <typename S, typename U, bool KW, bool KPW>
struct BcePolicy {
  using scalar_t = S;
  using aux_t = U;
  using acc_t = at::opmath_type<S>;
  static constexpr int kOps = 1 + KW + KPW;
  acc_t grad_scale;
  __device__ __forceinline__ void operator()(acc_t x, const acc_t (&o)[kOps], acc_t& loss,
                                             acc_t& grad) const {
    bce::elem<ScalarMath<acc_t>, KPW>(x, o[0], o[kOps - 1], loss, grad);
    grad *= grad_scale;
    if constexpr (KW) {
      loss *= o[1];
      grad *= o[1];
    }
  }
};

template <typename S, typename U, bool KW, bool KPW>
void launch_bce(const at::Tensor& input, const at::Tensor (&ops)[kEwMaxOps], at::Tensor& loss,
                at::Tensor& grad, at::Tensor& partial, const EwShape& sh, int64_t grid,
                double loss_scale, cudaStream_t stream) {
  using P = BcePolicy<S, U, KW, KPW>;
  const P pol{static_cast<typename P::acc_t>(loss_scale)};
  launch_elementwise_loss(pol, ew_pointers<P>(input, ops, loss, grad, partial), sh, input.numel(),
                          grid, stream);
}

std::tuple<at::Tensor, at::Tensor> bce_fwd_cuda(const at::Tensor& input, const at::Tensor& target,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& pos_weight,
                                                double loss_scale, int64_t reduction,
                                                bool compute_grad) {
  return run_ew_loss_cuda(
      "fusedloss_C::bce_fwd", input, target, weight, pos_weight, loss_scale, reduction,
      compute_grad,
      [&](const at::Tensor(&ops)[kEwMaxOps], bool aux_acc, at::Tensor& loss, at::Tensor& grad,
          at::Tensor& partial, const EwShape& sh, int64_t grid, cudaStream_t stream) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                        "fusedloss_bce_cuda", [&] {
          using A = at::opmath_type<scalar_t>;
          auto go = [&](auto u_tag) {
            using U = decltype(u_tag);
            const bool kw = ops[1].defined(), kpw = ops[2].defined();
            if (kw && kpw) {
              launch_bce<scalar_t, U, true, true>(input, ops, loss, grad, partial, sh, grid,
                                                  loss_scale, stream);
            } else if (kw) {
              launch_bce<scalar_t, U, true, false>(input, ops, loss, grad, partial, sh, grid,
                                                   loss_scale, stream);
            } else if (kpw) {
              launch_bce<scalar_t, U, false, true>(input, ops, loss, grad, partial, sh, grid,
                                                   loss_scale, stream);
            } else {
              launch_bce<scalar_t, U, false, false>(input, ops, loss, grad, partial, sh, grid,
                                                    loss_scale, stream);
            }
          };
          if (aux_acc) {
            go(A());
          } else {
            go(scalar_t());
          }
        });
      });
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("bce_fwd", &fusedloss::cuda::bce_fwd_cuda);
}
