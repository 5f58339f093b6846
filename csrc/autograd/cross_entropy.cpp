// Eager cross-entropy in one call, autograd included, for the cpu and cuda backends
// (fusedloss_C::cross_entropy_loss / cross_entropy_loss_inplace, schemas in registration.cpp).
//
// fusedloss/ops/cross_entropy.py builds the same thing from Python pieces (the canonical view, the
// 'mean' factor, the device kernel, the reduction, an autograd.Function); that is what
// torch.compile traces and what the triton backend runs. Here it is one dispatcher call and a C++
// autograd node: at small shapes the per-call cost of those pieces (each torch.ops call and each
// Python backward costs microseconds) is more than the kernel, and on a GPU it decides whether a
// fused kernel wins at all. The math is the device kernels'; the backward follows
// ops/cross_entropy.py's _grad_input / _scaled_grad exactly (tests run both).
#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fusedloss {
namespace {

using at::Tensor;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

constexpr const char* kNoDoubleBackward =
    "fusedloss.cross_entropy: the fused kernels give first derivatives only; differentiating the "
    "gradient again (create_graph=True: double backward, hessian, gradient penalties) is not "
    "supported. Use backend='reference' (plain PyTorch, every derivative) for that computation.";

// The device kernels, through the dispatcher (CPU or CUDA by the tensors' device).
std::tuple<Tensor, Tensor, Tensor> kernel_fwd(const Tensor& x, const Tensor& t,
                                              const std::optional<Tensor>& w,
                                              const std::optional<Tensor>& scale, int64_t ii,
                                              double ls, double z, double cap, bool grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss_C::cross_entropy_fwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const std::optional<Tensor>&,
              const std::optional<Tensor>&, int64_t, double, double, double, bool)>();
  return op.call(x, t, w, scale, ii, ls, z, cap, grad);
}

std::tuple<Tensor, Tensor> kernel_fwd_inplace(const Tensor& x, const Tensor& t,
                                              const std::optional<Tensor>& w,
                                              const std::optional<Tensor>& scale, int64_t ii,
                                              double ls, double z, double cap) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss_C::cross_entropy_fwd_inplace", "")
          .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                            const std::optional<Tensor>&,
                                            const std::optional<Tensor>&, int64_t, double, double,
                                            double)>();
  return op.call(x, t, w, scale, ii, ls, z, cap);
}

Tensor mean_factor(const Tensor& t, const std::optional<Tensor>& w, int64_t ii, at::ScalarType acc) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss_C::cross_entropy_mean_factor", "")
          .typed<Tensor(const Tensor&, const std::optional<Tensor>&, int64_t, at::ScalarType)>();
  return op.call(t, w, ii, acc);
}

void scale_grad_(const Tensor& grad, const Tensor& grad_loss) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedloss_C::scale_grad_", "")
                             .typed<void(const Tensor&, const Tensor&)>();
  op.call(grad, grad_loss);
}

// The (N, C, D) view of the kernels' contract, as fusedloss.functional.cross_entropy makes it.
struct Canonical {
  Tensor x, t;
  std::optional<Tensor> w;
  std::vector<int64_t> out_shape;  // the 'none' loss shape: (N, d1, ..., dk), () unbatched
  int64_t N = 0, C = 0, D = 1;
  bool prob = false;
  at::ScalarType acc = at::kFloat;
};

Canonical canonical(const Tensor& input, const Tensor& target,
                    const std::optional<Tensor>& weight) {
  Canonical c;
  const bool unbatched = input.dim() == 1;
  c.N = unbatched ? 1 : input.size(0);
  c.C = unbatched ? input.size(0) : input.size(1);
  if (!unbatched) {
    c.out_shape.push_back(c.N);
    for (int64_t i = 2; i < input.dim(); ++i) {
      c.out_shape.push_back(input.size(i));
      c.D *= input.size(i);
    }
  }
  c.acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c.x = input.reshape({c.N, c.C, c.D});
  c.prob = at::isFloatingType(target.scalar_type());
  // (.to only where the dtype differs: a same-dtype .to returns its input, which is fine but
  // what schema checks flag.)
  if (c.prob) {
    c.t = (target.scalar_type() == input.scalar_type() ? target : target.to(input.scalar_type()))
              .reshape({c.N, c.C, c.D});
  } else {
    c.t = target.reshape({c.N, c.D});
    if (c.t.scalar_type() != at::kLong || !c.t.is_contiguous()) {
      c.t = c.t.to(at::kLong).contiguous();  // uint8 targets: torch accepts Byte
    }
  }
  if (weight.has_value() && weight->defined()) {
    c.w = (weight->scalar_type() == c.acc ? *weight : weight->to(c.acc)).contiguous();
  }
  return c;
}

std::optional<Tensor> scale_for(const Canonical& c, int64_t reduction, int64_t ii) {
  if (reduction != kMean) return std::nullopt;
  if (c.prob) {
    const int64_t rows = c.N * c.D;
    const double s = rows ? 1.0 / static_cast<double>(rows)
                          : std::numeric_limits<double>::infinity();
    return at::scalar_tensor(s, c.x.options().dtype(c.acc));
  }
  return mean_factor(c.t, c.w, ii, c.acc);
}

// A tensor whose data this code can read: real memory, not a fake or functional tensor of a
// tracer (opcheck, AOTAutograd), for which everything here must be expressed as tensor ops.
bool readable(const Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return !impl->is_python_dispatch() && impl->has_storage() && impl->storage_initialized() &&
         !at::isTensorSubclassLike(t);
}

// The sum of the per-row losses. On the CPU a plain loop in double (at::sum's reduction setup
// costs microseconds, more than the whole kernel at small shapes), rounded once; elsewhere at::sum.
Tensor sum_rows(const Tensor& loss) {
  if (!loss.is_cpu() || !loss.is_contiguous() || !readable(loss)) return loss.sum();
  double total = 0.0;
  const int64_t n = loss.numel();
  if (loss.scalar_type() == at::kDouble) {
    const double* p = loss.const_data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) total += p[i];
  } else {
    const float* p = loss.const_data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) total += p[i];
  }
  return at::scalar_tensor(total, loss.options());
}

// The per-row kernel outputs reduced to what the user gets (loss in `dtype`, lse detached).
std::tuple<Tensor, Tensor> finish(const Canonical& c, Tensor loss, Tensor lse, int64_t reduction,
                                  const std::optional<Tensor>& scale, at::ScalarType dtype) {
  if (reduction == kNone) {
    loss = loss.reshape(c.out_shape);
  } else {
    loss = sum_rows(loss);  // 'mean' rows already carry 1 / sum(w_y)
    if (reduction == kMean && c.N * c.D == 0) loss = loss * *scale;  // torch's NaN mean of nothing
  }
  if (loss.scalar_type() != dtype) loss = loss.to(dtype);
  return {loss, lse.reshape(c.out_shape)};
}

// d(loss)/d(input) from the saved gradient g (N, C, D) and the upstream gradient of the returned
// loss: ops/cross_entropy.py's _grad_input and _scaled_grad.
Tensor grad_input(Tensor g, Tensor up, const Tensor& target, bool index_target, int64_t ii,
                  bool inplace) {
  const int64_t N = g.size(0), D = g.size(2);
  const at::ScalarType acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (up.scalar_type() != acc) up = up.to(acc);
  if (!readable(g) || !readable(up)) {
    // Traced: functional ops only (zeros stay zero, as in the kernel).
    const Tensor gl = up.dim() == 0 ? up : up.reshape({N, D});
    if (index_target && up.dim() != 0) {
      return at::where(g == 0, g, (g * at::where(target == ii, at::zeros({}, gl.options()), gl)
                                       .unsqueeze(1)).to(g.scalar_type()));
    }
    return at::where(g == 0, g, (g * (up.dim() == 0 ? gl : gl.unsqueeze(1))).to(g.scalar_type()));
  }
  bool uniform = up.numel() <= 1;
  if (!uniform) {
    uniform = true;
    for (int64_t i = 0; i < up.dim(); ++i) uniform = uniform && up.stride(i) == 0;
  }
  Tensor gl;  // (N, D)
  bool finite = !uniform;  // a per-row upstream arrives with its ignored rows zeroed
  if (uniform) {
    if (g.is_cpu()) {  // a host read, no device to wait for (any element: all are the same)
      const double s = up.numel() == 0 ? 1.0
                       : acc == at::kDouble ? *up.const_data_ptr<double>()
                                            : static_cast<double>(*up.const_data_ptr<float>());
      if (s == 1.0) return g;
      finite = std::isfinite(s);
    }
    gl = up.reshape({1, 1}).expand({N, D});
  } else {
    gl = up.reshape({N, D});
    // Per-row upstream ('none'): ignored rows get exactly 0, whatever their upstream value.
    if (index_target) gl = at::where(target == ii, at::zeros({}, gl.options()), gl);
  }
  if (inplace || (uniform && !g.is_cpu())) {
    scale_grad_(g, gl);  // a 1 on the device is skipped by the kernel: no host sync
    return g;
  }
  if (g.scalar_type() == acc && finite) return g * gl.unsqueeze(1);
  Tensor out = g.clone();  // half, or a NaN/inf scalar: the kernel's float32 math, zeros kept
  scale_grad_(out, gl);
  return out;
}

// The autograd node of the eager op: a hand-written Node, as ATen's generated autograd code has,
// rather than a torch::autograd::Function (whose CppNode bookkeeping cost several microseconds per
// step, forward and backward, more than the whole kernel at small shapes).
template <bool kInplace>
struct CrossEntropyBackward final : public torch::autograd::Node {
  explicit CrossEntropyBackward(torch::autograd::edge_list&& next_edges)
      : Node(std::move(next_edges)) {}

  std::string name() const override {
    return kInplace ? "CrossEntropyInplaceBackward" : "CrossEntropyBackward";
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(1);
    if (!grads[0].defined()) return out;
    TORCH_CHECK(!at::GradMode::is_enabled(), kNoDoubleBackward);
    // In place, the saved tensor is the input itself: its version check fails loudly if anything
    // wrote to it after the forward stored the gradient there.
    const Tensor g = grad_.unpack();
    const Tensor target = index_target_ ? target_.unpack() : Tensor();
    // (N, C, D) of the kernels' contract, from input's shape (N, C, d...) or (C,)
    const bool unbatched = g.dim() == 1;
    const int64_t N = unbatched ? 1 : g.size(0), C = unbatched ? g.size(0) : g.size(1);
    const int64_t D = C == 0 || N == 0 ? 1 : g.numel() / (N * C);
    const Tensor r = grad_input(g.view({N, C, D}), grads[0], target, index_target_,
                                ignore_index_, kInplace);
    out[0] = r.view(g.sizes());
    return out;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad_.reset_data();
    target_.reset_data();
  }

  torch::autograd::SavedVariable grad_;    // d(loss)/d(input) in input's shape
  torch::autograd::SavedVariable target_;  // only for a per-row upstream gradient
  int64_t ignore_index_ = 0;
  bool index_target_ = false;
};

template <bool kInplace>
std::tuple<Tensor, Tensor> cross_entropy_loss_with_grad(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss, double softcap,
    at::ScalarType dtype) {
  Canonical c;
  Tensor out, lse_out, grad;
  {
    // Everything below autograd: the views are plain aliases and no graph is recorded.
    at::AutoDispatchBelowADInplaceOrView guard;
    c = canonical(input, target, weight);
    const std::optional<Tensor> scale = scale_for(c, reduction, ignore_index);
    Tensor loss, lse;
    if constexpr (kInplace) {
      std::tie(loss, lse) = kernel_fwd_inplace(c.x, c.t, c.w, scale, ignore_index,
                                               label_smoothing, z_loss, softcap);
    } else {
      std::tie(loss, lse, grad) = kernel_fwd(c.x, c.t, c.w, scale, ignore_index, label_smoothing,
                                             z_loss, softcap, true);
      grad = grad.view(input.sizes());
    }
    std::tie(out, lse_out) = finish(c, loss, lse, reduction, scale, dtype);
  }
  auto node = c10::make_intrusive<CrossEntropyBackward<kInplace>>(
      torch::autograd::collect_next_edges(input));
  if constexpr (kInplace) {
    // A declared write: an op that saved the logits for its own backward now fails autograd's
    // version check instead of reading a gradient as logits. Saved after the write: input's memory
    // holds the gradient now.
    input.unsafeGetTensorImpl()->bump_version();
    node->grad_ = torch::autograd::SavedVariable(input, false);
  } else {
    node->grad_ = torch::autograd::SavedVariable(grad, false);
  }
  // The target only where a per-row upstream gradient can come ('none' with class indices:
  // ignored rows are kept at 0).
  node->index_target_ = reduction == kNone && !c.prob;
  if (node->index_target_) {
    node->target_ = torch::autograd::SavedVariable(c.t, false);
    node->ignore_index_ = ignore_index;
  }
  torch::autograd::set_history(out, node);  // lse stays without history: not differentiable
  return {out, lse_out};
}

// Without autograd (no_grad, inference_mode, an input that needs no gradient): no gradient made.
std::tuple<Tensor, Tensor> cross_entropy_loss_forward(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss, double softcap,
    at::ScalarType dtype) {
  const Canonical c = canonical(input, target, weight);
  const std::optional<Tensor> scale = scale_for(c, reduction, ignore_index);
  auto [loss, lse, grad] =
      kernel_fwd(c.x, c.t, c.w, scale, ignore_index, label_smoothing, z_loss, softcap, false);
  return finish(c, loss, lse, reduction, scale, dtype);
}

template <bool kInplace>
std::tuple<Tensor, Tensor> cross_entropy_loss_autograd(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss, double softcap,
    at::ScalarType dtype) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, "cross_entropy_loss: bad reduction ",
              reduction);
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    // No gradient wanted: nothing is computed for it and nothing is written into input.
    at::AutoDispatchBelowADInplaceOrView guard;
    return cross_entropy_loss_forward(input, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, dtype);
  }
  return cross_entropy_loss_with_grad<kInplace>(input, target, weight, ignore_index, reduction,
                                               label_smoothing, z_loss, softcap, dtype);
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, Autograd, m) {
  m.impl("cross_entropy_loss", &fusedloss::cross_entropy_loss_autograd<false>);
  m.impl("cross_entropy_loss_inplace", &fusedloss::cross_entropy_loss_autograd<true>);
}

TORCH_LIBRARY_IMPL(fusedloss_C, CompositeExplicitAutograd, m) {
  m.impl("cross_entropy_loss", &fusedloss::cross_entropy_loss_forward);
  m.impl("cross_entropy_loss_inplace", &fusedloss::cross_entropy_loss_forward);
}
