// CPU bindings of the cross-entropy ops (schemas in csrc/registration.cpp, contract in
// docs/KERNELS.md): argument checks, output allocation, and the call into the instruction-set copy
// of the kernels chosen at run time (cpu_isa.h). Compiled without AVX flags; runs no vector code.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "buffers.h"
#include "cpu_isa.h"
#include "cross_entropy_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

// Tensors kept alive (contiguous copies) for the duration of a kernel call.
struct Prepared {
  CrossEntropyArgs args{};
  Tensor target, weight;
};

Prepared prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& loss_scale, int64_t ignore_index,
                 double label_smoothing, double z_loss, double softcap) {
  check_cpu(input, "cross_entropy", "input");
  check_cpu(target, "cross_entropy", "target");
  TORCH_CHECK(input.dim() == 3, "cross_entropy: input must have shape (N, C, D), got ",
              input.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "cross_entropy: input must be float32, float16, bfloat16 or float64, got ",
              input.scalar_type());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_type(input.scalar_type());
  TORCH_CHECK(C > 0 || N * D == 0, "cross_entropy: input has no classes (C = 0)");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss),
              "cross_entropy: z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(!std::isnan(softcap), "cross_entropy: softcap must not be NaN");

  Prepared p;
  CrossEntropyArgs& a = p.args;
  a.dtype = input.scalar_type();
  a.N = N;
  a.C = C;
  a.D = D;
  a.input = input.data_ptr();
  const NcdStrides xs = ncd_strides(input);
  a.in_sn = xs.n;
  a.in_sc = xs.c;
  a.in_sd = xs.d;

  if (target.scalar_type() == at::kLong) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D,
                "cross_entropy: class-index target must have shape (N, D) = (", N, ", ", D,
                ") for input of shape ", input.sizes(), ", got ", target.sizes());
    p.target = target.contiguous();
    a.target_index = p.target.const_data_ptr<int64_t>();
  } else if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(target.scalar_type() == input.scalar_type(),
                "cross_entropy: probability target must have input's dtype ",
                input.scalar_type(), ", got ", target.scalar_type());
    TORCH_CHECK(target.sizes() == input.sizes(),
                "cross_entropy: probability target must have input's shape ", input.sizes(),
                ", got ", target.sizes());
    p.target = target;
    a.target_prob = target.data_ptr();
    const NcdStrides ts = ncd_strides(target);
    a.tg_sn = ts.n;
    a.tg_sc = ts.c;
    a.tg_sd = ts.d;
  } else {
    TORCH_CHECK(false,
                "cross_entropy: target must be int64 class indices or floating-point class "
                "probabilities, got ", target.scalar_type());
  }

  a.weight_sum = static_cast<double>(C);
  if (weight.has_value() && weight->defined()) {
    check_cpu(*weight, "cross_entropy", "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C,
                "cross_entropy: weight must have shape (C,) = (", C, ",), got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc, "cross_entropy: weight must be ", acc,
                " (the accumulation dtype of ", input.scalar_type(), " input), got ",
                weight->scalar_type());
    p.weight = weight->contiguous();
    a.weight = p.weight.const_data_ptr();
    a.weight_sum = C > 0 ? p.weight.sum(at::kDouble).item<double>() : 0.0;
  }

  a.loss_scale = 1.0;
  if (loss_scale.has_value() && loss_scale->defined()) {
    check_cpu(*loss_scale, "cross_entropy", "loss_scale");
    TORCH_CHECK(loss_scale->numel() == 1, "cross_entropy: loss_scale must be a 0-d tensor, got "
                "shape ", loss_scale->sizes());
    TORCH_CHECK(loss_scale->scalar_type() == acc, "cross_entropy: loss_scale must be ", acc,
                ", got ", loss_scale->scalar_type());
    a.loss_scale = loss_scale->item<double>();
  }
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap > 0.0 ? softcap : 0.0;
  return p;
}

void set_grad(CrossEntropyArgs& a, const Tensor& g) {
  a.grad = g.data_ptr();
  const NcdStrides gs = ncd_strides(g);
  a.gr_sn = gs.n;
  a.gr_sc = gs.c;
  a.gr_sd = gs.d;
}

void run(CrossEntropyArgs& a, Tensor& loss, Tensor& lse) {
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  if (a.N * a.D == 0) return;
  FL_CPU_DISPATCH(cross_entropy_kernel, a);
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_fwd_cpu(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& loss_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, bool compute_grad) {
  Prepared p = prepare(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                       softcap);
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  Tensor loss = at::empty({p.args.N, p.args.D}, acc);
  Tensor lse = at::empty({p.args.N, p.args.D}, acc);
  Tensor grad;
  if (compute_grad) {
    static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
    grad = slot.get({p.args.N, p.args.C, p.args.D}, input.options());
    set_grad(p.args, grad);
  } else {
    grad = at::empty({0}, input.options());
  }
  run(p.args, loss, lse);
  return {loss, lse, grad};
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_inplace_cpu(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& loss_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap) {
  Prepared p = prepare(input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                       softcap);
  at::assert_no_internal_overlap(input);
  if (p.args.target_prob) {
    at::assert_no_partial_overlap(input, target);
  } else if (p.args.N * p.args.D > 0) {
    // Every target is checked before the input is overwritten, so a bad one leaves it intact.
    const int64_t* y = p.args.target_index;
    const int64_t C = p.args.C;
    for (int64_t r = 0, rows = p.args.N * p.args.D; r < rows; ++r) {
      TORCH_CHECK_INDEX(y[r] == ignore_index || (y[r] >= 0 && y[r] < C), "cross_entropy: target ",
                        y[r], " is out of bounds for ", C, " classes (valid: 0 <= target < ", C,
                        ", or ignore_index = ", ignore_index, ")");
    }
  }
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  Tensor loss = at::empty({p.args.N, p.args.D}, acc);
  Tensor lse = at::empty({p.args.N, p.args.D}, acc);
  set_grad(p.args, input);
  run(p.args, loss, lse);
  return {loss, lse};
}

Tensor cross_entropy_mean_factor_cpu(const Tensor& target, const std::optional<Tensor>& weight,
                                    int64_t ignore_index, at::ScalarType dtype) {
  check_cpu(target, "cross_entropy", "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy_mean_factor: target must be int64, "
              "got ", target.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "cross_entropy_mean_factor: dtype must be float32 or float64, got ", dtype);
  const Tensor y = target.contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const int64_t n = y.numel();
  double total = 0.0;  // summed in a fixed order: deterministic, and exact for counts < 2^53
  if (weight.has_value() && weight->defined()) {
    check_cpu(*weight, "cross_entropy", "weight");
    const Tensor w = weight->contiguous().to(at::kDouble);
    const double* wp = w.const_data_ptr<double>();
    const int64_t C = w.numel();
    for (int64_t i = 0; i < n; ++i) {
      if (yp[i] != ignore_index && yp[i] >= 0 && yp[i] < C) total += wp[yp[i]];
    }
  } else {
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += yp[i] != ignore_index;
    total = static_cast<double>(count);
  }
  return at::scalar_tensor(1.0 / total, target.options().dtype(dtype));
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("cross_entropy_fwd", &fusedloss::cpu::cross_entropy_fwd_cpu);
  m.impl("cross_entropy_fwd_inplace", &fusedloss::cpu::cross_entropy_fwd_inplace_cpu);
  m.impl("cross_entropy_mean_factor", &fusedloss::cpu::cross_entropy_mean_factor_cpu);
}
