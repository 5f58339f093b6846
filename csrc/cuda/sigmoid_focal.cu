// sigmoid_focal_fwd on CUDA (schema in csrc/registration.cpp, contract in docs/KERNELS.md):
// torchvision's sigmoid focal loss per element, the log-space math of
// csrc/include/fusedloss/sigmoid_focal.h as a policy on the elementwise skeleton
// (elementwise.cuh): one pass, weight read by stride, 'mean' / 'sum' as deterministic block
// partials (no per-element tensor).
#include <torch/library.h>

#include <fusedloss/sigmoid_focal.h>

#include "common.cuh"
#include "elementwise.cuh"

namespace fusedloss {
namespace cuda {
namespace {

// Operands: t, then w (KW).
template <typename S, typename U, bool KW>
struct SigmoidFocalPolicy {
  using scalar_t = S;
  using aux_t = U;
  using acc_t = at::opmath_type<S>;
  static constexpr int kOps = 1 + KW;
  acc_t alpha, gamma, grad_scale;
  __device__ __forceinline__ void operator()(acc_t x, const acc_t (&o)[kOps], acc_t& loss,
                                             acc_t& grad) const {
    sigmoid_focal::elem<ScalarMath<acc_t>>(x, o[0], alpha, gamma, loss, grad);
    grad *= grad_scale;
    if constexpr (KW) {
      loss *= o[1];
      grad *= o[1];
    }
  }
};

template <typename S, typename U, bool KW>
void launch_sf(const at::Tensor& input, const at::Tensor (&ops)[kEwMaxOps], at::Tensor& loss,
               at::Tensor& grad, at::Tensor& partial, const EwShape& sh, int64_t grid,
               double alpha, double gamma, double loss_scale, cudaStream_t stream) {
  using P = SigmoidFocalPolicy<S, U, KW>;
  using A = typename P::acc_t;
  const P pol{static_cast<A>(alpha), static_cast<A>(gamma), static_cast<A>(loss_scale)};
  launch_elementwise_loss(pol, ew_pointers<P>(input, ops, loss, grad, partial), sh, input.numel(),
                          grid, stream);
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    double alpha, double gamma, double loss_scale, int64_t reduction, bool compute_grad) {
  TORCH_CHECK(gamma >= 0, "fusedloss_C::sigmoid_focal_fwd: gamma must be >= 0, got ", gamma);
  return run_ew_loss_cuda(
      "fusedloss_C::sigmoid_focal_fwd", input, target, weight, c10::nullopt, loss_scale,
      reduction, compute_grad,
      [&](const at::Tensor(&ops)[kEwMaxOps], bool aux_acc, at::Tensor& loss, at::Tensor& grad,
          at::Tensor& partial, const EwShape& sh, int64_t grid, cudaStream_t stream) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                        "fusedloss_sigmoid_focal_cuda", [&] {
          using A = at::opmath_type<scalar_t>;
          auto go = [&](auto u_tag) {
            using U = decltype(u_tag);
            if (ops[1].defined()) {
              launch_sf<scalar_t, U, true>(input, ops, loss, grad, partial, sh, grid, alpha,
                                           gamma, loss_scale, stream);
            } else {
              launch_sf<scalar_t, U, false>(input, ops, loss, grad, partial, sh, grid, alpha,
                                            gamma, loss_scale, stream);
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
  m.impl("sigmoid_focal_fwd", &fusedloss::cuda::sigmoid_focal_fwd_cuda);
}
