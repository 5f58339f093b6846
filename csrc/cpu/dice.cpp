// CPU binding of the Dice device ops dice_fwd and dice_bwd (schemas in csrc/registration.cpp,
// contract in docs/KERNELS.md, "Dice"): argument checks, outputs, and the call into the
// instruction-set copy of the kernels (dice_kernel.cpp). Compiled without AVX flags; runs no vector
// code.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <fusedloss/dice.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "buffers.h"
#include "cpu_isa.h"
#include "dice_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

// The checks and fields dice_fwd and dice_bwd share: input, target, mode flags.
DiceArgs common_args(const char* op, const Tensor& input, const Tensor& target,
                     int64_t ignore_index, bool sigmoid, bool squared_pred, bool with_ce,
                     bool with_smoothing) {
  check_cpu(input, op, "input");
  check_cpu(target, op, "target");
  TORCH_CHECK(input.dim() == 3, op, ": input must have shape (N, C, D), got ", input.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()), op,
              ": input must be float32, float16, bfloat16 or float64, got ", input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  TORCH_CHECK(C >= 1, op, ": input has no classes (C = 0)");
  if (sigmoid) {
    TORCH_CHECK(!with_ce && !with_smoothing, op,
                ": with_ce and with_smoothing need softmax mode (sigmoid = False)");
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), op,
                ": sigmoid-mode target must have the input's dtype ", input.scalar_type(),
                ", got ", target.scalar_type());
    TORCH_CHECK(target.sizes() == input.sizes(), op,
                ": sigmoid-mode target must have the input's shape ", input.sizes(), ", got ",
                target.sizes());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": target must be int64 class indices, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": target must have shape (N, D) = (", N, ", ", D, ") for input of shape ",
                input.sizes(), ", got ", target.sizes());
  }
  DiceArgs a{};
  a.dtype = input.scalar_type();
  a.N = N;
  a.C = C;
  a.D = D;
  a.input = input.const_data_ptr();
  const NcdStrides xs = ncd_strides(input);
  a.in_sn = xs.n;
  a.in_sc = xs.c;
  a.in_sd = xs.d;
  a.target = target.const_data_ptr();
  if (sigmoid) {
    const NcdStrides ts = ncd_strides(target);
    a.t_sn = ts.n;
    a.t_sc = ts.c;
    a.t_sd = ts.d;
  } else {  // read by strides: no copy of a non-contiguous target
    a.t_sn = target.stride(0);
    a.t_sc = 0;
    a.t_sd = target.stride(1);
  }
  a.ignore_index = ignore_index;
  a.sigmoid = sigmoid;
  a.squared_pred = squared_pred;
  a.with_ce = with_ce;
  a.with_smoothing = with_smoothing;
  return a;
}

std::tuple<Tensor, Tensor> dice_fwd_cpu(const Tensor& input, const Tensor& target,
                                        int64_t ignore_index, bool sigmoid, bool squared_pred,
                                        bool with_ce, bool with_smoothing) {
  DiceArgs a = common_args("dice_fwd", input, target, ignore_index, sigmoid, squared_pred,
                           with_ce, with_smoothing);
  const auto acc_opts = input.options().dtype(acc_type(input.scalar_type()));
  const int64_t N = a.N, C = a.C, D = a.D;
  Tensor sums = D == 0 ? at::zeros({N, C, dice::kSums}, acc_opts)
                       : at::empty({N, C, dice::kSums}, acc_opts);
  Tensor lse = sigmoid ? at::empty({0}, acc_opts) : at::empty({N, D}, acc_opts);
  Tensor partials;
  const int64_t per_n = dice_blocks_along(C, D);
  if (per_n > 1 && N > 0) {
    partials = at::empty({N * per_n, C, dice::kSums}, acc_opts);
    a.partials = partials.data_ptr();
  }
  a.sums = sums.data_ptr();
  a.lse_out = sigmoid ? nullptr : lse.data_ptr();
  if (N * D > 0) FL_CPU_DISPATCH(dice_fwd_kernel, a);
  return {sums, lse};
}

Tensor dice_bwd_cpu(const Tensor& grad_sums, const Tensor& input, const Tensor& target,
                    const Tensor& lse, int64_t ignore_index, bool sigmoid, bool squared_pred,
                    bool with_ce, bool with_smoothing) {
  DiceArgs a = common_args("dice_bwd", input, target, ignore_index, sigmoid, squared_pred,
                           with_ce, with_smoothing);
  check_cpu(grad_sums, "dice_bwd", "grad_sums");
  check_cpu(lse, "dice_bwd", "lse");
  const at::ScalarType acc = acc_type(input.scalar_type());
  const int64_t N = a.N, C = a.C, D = a.D;
  TORCH_CHECK(grad_sums.dim() == 3 && grad_sums.size(0) == N && grad_sums.size(1) == C &&
                  grad_sums.size(2) == dice::kSums,
              "dice_bwd: grad_sums must have shape (N, C, 5) = (", N, ", ", C, ", 5), got ",
              grad_sums.sizes());
  TORCH_CHECK(grad_sums.is_floating_point(), "dice_bwd: grad_sums must be floating, got ",
              grad_sums.scalar_type());
  const Tensor gs = grad_sums.to(acc).contiguous();  // N*C*5 values: a copy costs nothing
  Tensor l;
  a.lse_in = nullptr;  // softmax with an empty lse: the kernel recomputes it per tile
  if (!sigmoid && lse.numel() != 0) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == N && lse.size(1) == D,
                "dice_bwd: lse must have shape (N, D) = (", N, ", ", D, "), got ", lse.sizes());
    TORCH_CHECK(lse.scalar_type() == acc, "dice_bwd: lse must be ", acc, ", got ",
                lse.scalar_type());
    l = lse.contiguous();  // dice_fwd's own lse is
    a.lse_in = l.const_data_ptr();
  }
  // torch.empty_like's strides: input's when they are non-overlapping and dense (channels_last
  // in, channels_last gradient out), else dense strides in input's stride order; the memory is
  // the binding's reused gradient buffer (buffers.h: a fresh logits-sized buffer page-faults on
  // every call), viewed with those strides.
  static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
  const std::vector<int64_t> strides =
      input.is_non_overlapping_and_dense()
          ? input.strides().vec()
          : at::infer_dense_strides(input.sizes(), input.strides());
  Tensor grad = slot.get({input.numel()}, input.options()).as_strided(input.sizes(), strides);
  a.grad_sums = gs.const_data_ptr();
  a.grad = grad.data_ptr();
  const NcdStrides g = ncd_strides(grad);
  a.g_sn = g.n;
  a.g_sc = g.c;
  a.g_sd = g.d;
  if (N * D > 0) FL_CPU_DISPATCH(dice_bwd_kernel, a);
  return grad;
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("dice_fwd", &fusedloss::cpu::dice_fwd_cpu);
  m.impl("dice_bwd", &fusedloss::cpu::dice_bwd_cpu);
}
