// Total variation on CUDA (schema tv_fwd in csrc/registration.cpp, contract in docs/KERNELS.md):
// the policy of csrc/include/fusedloss/tv.h (ScalarOps) on the CUDA stencil skeleton
// (stencil.cuh), and its host launcher. The weight is read by stride (0 where broadcast); a weight
// of another dtype than the input's is converted at its own (unexpanded) size first.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include <fusedloss/tv.h>

#include "common.cuh"
#include "stencil.cuh"

namespace fusedloss {
namespace cuda {
namespace {

template <typename A, int kNorm>
struct TvPolicy {
  A eps;
  template <bool kGrad>
  __device__ __forceinline__ void apply(A x, A down, A right, A w, A& loss, A& d_self, A& d_down,
                                        A& d_right) const {
    A fv = A(0), fh = A(0);
    tv::pixel<kNorm, kGrad, tv::ScalarOps<A>>(down - x, right - x, w, eps, loss, fv, fh);
    if constexpr (kGrad) {
      d_down = fv;
      d_right = fh;
      d_self = A(0) - (fv + fh);
    }
  }
};

// The weight's broadcast (stride-0) dimensions narrowed to size 1, converted, and expanded again:
// a dtype conversion at the weight's own size, never at the input's.
at::Tensor weight_as(const at::Tensor& w, at::ScalarType t) {
  at::Tensor c = w;
  for (int64_t d = 0; d < c.dim(); ++d) {
    if (c.stride(d) == 0 && c.size(d) > 1) c = c.narrow(d, 0, 1);
  }
  return c.to(t).expand(w.sizes());
}

std::tuple<at::Tensor, at::Tensor> tv_fwd_cuda(const at::Tensor& input,
                                               const std::optional<at::Tensor>& weight,
                                               int64_t norm, double eps, double loss_scale,
                                               bool compute_grad) {
  const char* op = "fusedloss_C::tv_fwd";
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input, got ", input.device());
  TORCH_CHECK(input.dim() == 4, op, ": input must have shape (P, Q, H, W), got ", input.sizes());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": input must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(norm >= 0 && norm <= 2, op, ": norm must be 0, 1 or 2, got ", norm);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
  const bool weighted = weight.has_value() && weight->defined();
  at::Tensor w;
  if (weighted) {
    TORCH_CHECK(weight->device() == input.device(), op, ": weight is on ", weight->device(),
                ", input on ", input.device());
    TORCH_CHECK(weight->sizes() == input.sizes(), op,
                ": weight must have input's shape (expanded), got ", weight->sizes());
    w = weight->scalar_type() == st ? *weight : weight_as(*weight, st);
  }
  const int64_t P = input.size(0), Q = input.size(1), H = input.size(2), W = input.size(3);
  const at::ScalarType acc = acc_dtype(st);
  at::Tensor grad = compute_grad ? at::empty({P, Q, H, W}, input.options())
                                 : at::empty({0}, input.options());
  if (P * Q == 0 || H * W == 0) {
    return {at::zeros({P, Q}, input.options().dtype(acc)), grad};
  }
  c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());
  StencilParams sp{};
  sp.Q = Q;
  sp.H = H;
  sp.W = W;
  for (int k = 0; k < 4; ++k) {
    sp.xs[k] = input.stride(k);
    sp.ws[k] = weighted ? w.stride(k) : 0;
    sp.gs[k] = compute_grad ? grad.stride(k) : 0;
  }
  sp.band = tv::band_rows(H, W);
  sp.bands = ceil_div(H, sp.band);
  sp.col_tiles = ceil_div(W, static_cast<int64_t>(kStencilThreads));
  const int64_t blocks = P * Q * sp.bands * sp.col_tiles;
  at::Tensor partial = at::empty({P * Q, sp.bands * sp.col_tiles}, input.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "fusedloss_tv_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const scalar_t* wp = weighted ? w.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    const acc_t scale = static_cast<acc_t>(loss_scale);
    auto launch = [&](auto norm_c, auto grad_c, auto weight_c) {
      constexpr int kNorm = decltype(norm_c)::value;
      constexpr bool kGrad = decltype(grad_c)::value;
      constexpr bool kWeight = decltype(weight_c)::value;
      TvPolicy<acc_t, kNorm> pol{static_cast<acc_t>(eps)};
      stencil2d_kernel<scalar_t, scalar_t, acc_t, kGrad, kWeight>
          <<<grid_1d(blocks), kStencilThreads, 0, stream>>>(xp, wp, gp, pp, sp, scale, pol);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_flags = [&](auto norm_c) {
      if (compute_grad) {
        if (weighted) {
          launch(norm_c, std::true_type(), std::true_type());
        } else {
          launch(norm_c, std::true_type(), std::false_type());
        }
      } else {
        if (weighted) {
          launch(norm_c, std::false_type(), std::true_type());
        } else {
          launch(norm_c, std::false_type(), std::false_type());
        }
      }
    };
    if (norm == tv::kL1) {
      by_flags(std::integral_constant<int, tv::kL1>());
    } else if (norm == tv::kL2Squared) {
      by_flags(std::integral_constant<int, tv::kL2Squared>());
    } else {
      by_flags(std::integral_constant<int, tv::kIsotropic>());
    }
  });
  // Each image's blocks, added in block order (a fixed-shape reduction: reproducible).
  return {partial.sum(1).view({P, Q}), grad};
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("tv_fwd", &fusedloss::cuda::tv_fwd_cuda);
}
