// CPU binding of tv_fwd (schema in csrc/registration.cpp, contract in docs/KERNELS.md): checks,
// the outputs, and the call into the instruction-set copy of the kernel (tv_kernel.cpp), which
// reads the input and the weight through their own strides (never expanded or copied).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "buffers.h"
#include "cpu_isa.h"
#include "tv_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> tv_fwd_cpu(const Tensor& input, const std::optional<Tensor>& weight,
                                      int64_t norm, double eps, double loss_scale,
                                      bool compute_grad) {
  TORCH_CHECK(input.device().is_cpu(), "tv_fwd: input must be a CPU tensor, got one on ",
              input.device());
  TORCH_CHECK(input.dim() == 4, "tv_fwd: input must have shape (P, Q, H, W), got ",
              input.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "tv_fwd: input must be float32, float16, bfloat16 or float64, got ",
              input.scalar_type());
  TORCH_CHECK(norm >= 0 && norm <= 2, "tv_fwd: norm must be 0 (l1), 1 (l2_squared) or 2 "
              "(isotropic), got ", norm);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "tv_fwd: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(loss_scale), "tv_fwd: loss_scale must be finite, got ", loss_scale);
  const bool weighted = weight.has_value() && weight->defined();
  if (weighted) {
    TORCH_CHECK(weight->device().is_cpu(), "tv_fwd: weight must be a CPU tensor");
    TORCH_CHECK(weight->sizes() == input.sizes(),
                "tv_fwd: weight must have input's shape (expanded, stride 0 where broadcast), got ",
                weight->sizes(), " for input ", input.sizes());
    TORCH_CHECK(supported_dtype(weight->scalar_type()),
                "tv_fwd: weight must be float32, float16, bfloat16 or float64, got ",
                weight->scalar_type());
  }
  const int64_t P = input.size(0), Q = input.size(1), H = input.size(2), W = input.size(3);
  Tensor loss = at::empty({P, Q}, input.options().dtype(acc_type(input.scalar_type())));
  Tensor grad;
  if (compute_grad) {
    static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
    grad = slot.get({P, Q, H, W}, input.options());
  } else {
    grad = at::empty({0}, input.options());
  }
  if (P * Q == 0) return {loss, grad};
  TvArgs a{};
  a.dtype = input.scalar_type();
  a.P = P;
  a.Q = Q;
  a.H = H;
  a.W = W;
  a.input = input.const_data_ptr();
  for (int k = 0; k < 4; ++k) a.xs[k] = input.size(k) == 1 ? 0 : input.stride(k);
  a.weight = nullptr;
  a.w_dtype = at::kFloat;
  if (weighted) {
    a.weight = weight->const_data_ptr();
    a.w_dtype = weight->scalar_type();
    for (int k = 0; k < 4; ++k) a.ws[k] = weight->size(k) == 1 ? 0 : weight->stride(k);
  }
  a.norm = static_cast<int>(norm);
  a.eps = eps;
  a.scale = loss_scale;
  a.loss = loss.data_ptr();
  a.grad = compute_grad && grad.numel() > 0 ? grad.data_ptr() : nullptr;
  if (a.grad) {
    for (int k = 0; k < 4; ++k) a.gs[k] = grad.stride(k);
  }
  FL_CPU_DISPATCH(tv_kernel, a);
  return {loss, grad};
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("tv_fwd", &fusedloss::cpu::tv_fwd_cpu);
}
