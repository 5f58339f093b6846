// CPU binding of bce_fwd (schema in csrc/registration.cpp, contract in docs/KERNELS.md): the shared
// per-element-loss binding (elementwise_args.h: checks, operands by stride, outputs) around the
// instruction-set copy of the kernel (bce_kernel.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "bce_kernel.h"
#include "buffers.h"
#include "cpu_isa.h"

namespace fusedloss::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> bce_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& weight,
                                               const c10::optional<at::Tensor>& pos_weight,
                                               double loss_scale, int64_t reduction,
                                               bool compute_grad) {
  TORCH_CHECK(input.device().is_cpu(), "bce_fwd: input must be a CPU tensor");
  static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
  return run_ew_loss("bce_fwd", input, target, weight, pos_weight, loss_scale, reduction,
                     compute_grad, EwLossArgs{}, slot,
                     [](const EwLossArgs& a) { return FL_CPU_DISPATCH(bce_kernel, a); });
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("bce_fwd", &fusedloss::cpu::bce_fwd_cpu);
}
