// CPU binding of scale_grad_ (schema in csrc/registration.cpp, contract in docs/KERNELS.md): the
// upstream-gradient scale of every loss's saved gradient, loss-agnostic. Checks, the scalar fast
// path (a scalar 1 returns without touching grad), and the call into the instruction-set copy of
// the kernel (scale_grad_kernel.cpp), which handles any strides of grad itself.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "buffers.h"
#include "cpu_isa.h"
#include "scale_grad_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

void scale_grad_cpu(const Tensor& grad, const Tensor& grad_loss) {
  TORCH_CHECK(grad.device().is_cpu() && grad_loss.device().is_cpu(),
              "scale_grad_: grad and grad_loss must be CPU tensors");
  TORCH_CHECK(grad.dim() == 3, "scale_grad_: grad must have shape (N, C, D), got ", grad.sizes());
  TORCH_CHECK(supported_dtype(grad.scalar_type()),
              "scale_grad_: grad must be float32, float16, bfloat16 or float64, got ",
              grad.scalar_type());
  const int64_t N = grad.size(0), C = grad.size(1), D = grad.size(2);
  TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == N && grad_loss.size(1) == D,
              "scale_grad_: grad_loss must have shape (N, D) = (", N, ", ", D, "), got ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat || grad_loss.scalar_type() == at::kDouble,
              "scale_grad_: grad_loss must be float32 or float64, got ", grad_loss.scalar_type());
  if (grad.numel() == 0) return;
  at::assert_no_internal_overlap(grad);
  const at::ScalarType acc = acc_type(grad.scalar_type());
  const bool scalar =
      grad_loss.numel() == 1 || (grad_loss.stride(0) == 0 && grad_loss.stride(1) == 0);
  ScaleGradArgs a{};
  a.dtype = grad.scalar_type();
  a.grad = grad.data_ptr();
  a.N = N;
  a.C = C;
  a.D = D;
  a.g_sn = grad.stride(0);
  a.g_sc = grad.stride(1);
  a.g_sd = grad.stride(2);
  Tensor gl;
  if (scalar) {
    // The scalar lives on the host: read it, and skip the pass over grad when it is 1.
    a.scalar = grad_loss.scalar_type() == at::kDouble
                   ? *grad_loss.const_data_ptr<double>()
                   : static_cast<double>(*grad_loss.const_data_ptr<float>());
    if (acc == at::kFloat) a.scalar = static_cast<float>(a.scalar);
    if (a.scalar == 1.0) return;
  } else {
    // (N, D) in the accumulation dtype, read through its strides (an expanded dim has stride 0).
    gl = grad_loss.scalar_type() == acc ? grad_loss : grad_loss.to(acc);
    a.grad_loss = gl.const_data_ptr();
    a.l_sn = N == 1 ? 0 : gl.stride(0);
    a.l_sd = D == 1 ? 0 : gl.stride(1);
  }
  FL_CPU_DISPATCH(scale_grad_kernel, a);
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("scale_grad_", &fusedloss::cpu::scale_grad_cpu);
}
