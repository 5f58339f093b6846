// CPU binding of softmax_focal_fwd (schema in csrc/registration.cpp, contract in docs/KERNELS.md):
// argument checks, outputs, and the call into the instruction-set copy of the kernel
// (softmax_focal_kernel.cpp). Compiled without AVX flags; runs no vector code.
#include <ATen/ATen.h>
#include <fusedloss/row_blocks.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "buffers.h"
#include "cpu_isa.h"
#include "softmax_focal_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> softmax_focal_fwd_cpu(const Tensor& input, const Tensor& target,
                                                 const std::optional<Tensor>& weight,
                                                 const std::optional<Tensor>& loss_scale,
                                                 double gamma, int64_t ignore_index, bool reduce,
                                                 bool compute_grad) {
  check_cpu(input, "softmax_focal_fwd", "input");
  check_cpu(target, "softmax_focal_fwd", "target");
  TORCH_CHECK(input.dim() == 3, "softmax_focal_fwd: input must have shape (N, C, D), got ",
              input.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "softmax_focal_fwd: input must be float32, float16, bfloat16 or float64, got ",
              input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_type(input.scalar_type());
  TORCH_CHECK(C > 0 || N * D == 0, "softmax_focal_fwd: input has no classes (C = 0)");
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma),
              "softmax_focal_fwd: gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK(target.scalar_type() == at::kLong,
              "softmax_focal_fwd: target must be int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D,
              "softmax_focal_fwd: target must have shape (N, D) = (", N, ", ", D,
              ") for input of shape ", input.sizes(), ", got ", target.sizes());

  SoftmaxFocalArgs a{};
  a.dtype = input.scalar_type();
  a.N = N;
  a.C = C;
  a.D = D;
  a.input = input.const_data_ptr();
  const NcdStrides xs = ncd_strides(input);
  a.in_sn = xs.n;
  a.in_sc = xs.c;
  a.in_sd = xs.d;
  const Tensor y = target.contiguous();  // no copy when it already is (the functional path)
  a.target = y.const_data_ptr<int64_t>();
  Tensor w;
  if (weight.has_value() && weight->defined()) {
    check_cpu(*weight, "softmax_focal_fwd", "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C,
                "softmax_focal_fwd: weight must have shape (C,) = (", C, ",), got ",
                weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc, "softmax_focal_fwd: weight must be ", acc,
                " (the accumulation dtype of ", input.scalar_type(), " input), got ",
                weight->scalar_type());
    w = weight->contiguous();
    a.weight = w.const_data_ptr();
  }
  a.gamma = gamma;
  a.loss_scale = 1.0;
  if (loss_scale.has_value() && loss_scale->defined()) {
    check_cpu(*loss_scale, "softmax_focal_fwd", "loss_scale");
    TORCH_CHECK(loss_scale->numel() == 1,
                "softmax_focal_fwd: loss_scale must be a 0-d tensor, got shape ",
                loss_scale->sizes());
    TORCH_CHECK(loss_scale->scalar_type() == acc, "softmax_focal_fwd: loss_scale must be ", acc,
                ", got ", loss_scale->scalar_type());
    a.loss_scale = loss_scale->item<double>();
  }
  a.ignore_index = ignore_index;

  const auto acc_opts = input.options().dtype(acc);
  Tensor loss = reduce ? at::empty({loss_blocks(N, C, D)}, acc_opts) : at::empty({N, D}, acc_opts);
  (reduce ? a.block_loss : a.row_loss) = loss.data_ptr();
  Tensor grad;
  if (compute_grad) {
    static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
    grad = slot.get({N, C, D}, input.options());
    a.grad = grad.data_ptr();
    const NcdStrides gs = ncd_strides(grad);
    a.gr_sn = gs.n;
    a.gr_sc = gs.c;
    a.gr_sd = gs.d;
  } else {
    grad = at::empty({0}, input.options());
  }
  if (N * D > 0) FL_CPU_DISPATCH(softmax_focal_kernel, a);
  return {loss, grad};
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("softmax_focal_fwd", &fusedloss::cpu::softmax_focal_fwd_cpu);
}
