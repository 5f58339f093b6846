// CPU binding of sigmoid_focal_fwd (schema in csrc/registration.cpp, contract in docs/KERNELS.md):
// the shared per-element-loss binding (elementwise_args.h: checks, operands by stride, outputs)
// around the instruction-set copy of the kernel (sigmoid_focal_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "buffers.h"
#include "cpu_isa.h"
#include "sigmoid_focal_kernel.h"

namespace fusedloss::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_fwd_cpu(const at::Tensor& input,
                                                         const at::Tensor& target,
                                                         const c10::optional<at::Tensor>& weight,
                                                         double alpha, double gamma,
                                                         double loss_scale, int64_t reduction,
                                                         bool compute_grad) {
  TORCH_CHECK(input.device().is_cpu(), "sigmoid_focal_fwd: input must be a CPU tensor");
  TORCH_CHECK(gamma >= 0, "sigmoid_focal_fwd: gamma must be >= 0, got ", gamma);
  static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
  EwLossArgs a;
  a.alpha = alpha;
  a.gamma = gamma;
  return run_ew_loss("sigmoid_focal_fwd", input, target, weight, c10::nullopt, loss_scale,
                     reduction, compute_grad, a, slot, [](const EwLossArgs& args) {
                       return FL_CPU_DISPATCH(sigmoid_focal_kernel, args);
                     });
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("sigmoid_focal_fwd", &fusedloss::cpu::sigmoid_focal_fwd_cpu);
}
