// CPU bindings of the cross-entropy ops (schemas in csrc/registration.cpp, contract in
// docs/KERNELS.md): argument checks, output allocation, and the call into the instruction-set copy
// of the kernels chosen at run time (cpu_isa.h). Compiled without AVX flags; runs no vector code.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "cpu_isa.h"
#include "cross_entropy_kernel.h"

namespace fusedloss::cpu {
namespace {

using at::Tensor;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A large buffer about to be written for the first time: back it with transparent huge pages where
// the system allows it on request (THP "madvise" mode). Faulting in 4 KiB pages costs about as much
// as the whole cross-entropy kernel for a 500 MB gradient. Harmless if it fails.
void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kMinBytes = uintptr_t(4) << 20;
  const uintptr_t nbytes = static_cast<uintptr_t>(t.nbytes());
  static const bool off = [] {
    const char* v = std::getenv("FUSEDLOSS_CPU_HUGEPAGES");
    return v != nullptr && std::string(v) == "0";
  }();
  if (off || nbytes < kMinBytes) return;
  const uintptr_t page = 4096;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + page - 1) & ~(page - 1);
  const uintptr_t e = (p + nbytes) & ~(page - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// How a new gradient buffer is obtained (FUSEDLOSS_CPU_GRAD_BUFFER, read once):
//  - "reuse" (default): the previous call's gradient buffer is handed out again when nothing but
//    this cache still holds it (the training step that used it has finished with it) and it has
//    the same shape and dtype; otherwise a fresh one is allocated and cached. glibc returns a
//    large freed buffer to the OS at once, so a fresh one page-faults in anew on every call (about
//    as much time as the kernel, and far more in a process whose memory is fragmented); torch's
//    CPU allocator has no cache. Costs one gradient's worth of memory held between calls.
//  - "fresh": always a new buffer (advised to huge pages unless FUSEDLOSS_CPU_HUGEPAGES=0).
// Buffers below 4 MiB always come fresh: glibc serves those from its heap without faults.
enum class GradBuffer { kReuse, kFresh };

GradBuffer grad_buffer_mode() {
  static const GradBuffer mode = [] {
    const char* v = std::getenv("FUSEDLOSS_CPU_GRAD_BUFFER");
    return v != nullptr && std::string(v) == "fresh" ? GradBuffer::kFresh : GradBuffer::kReuse;
  }();
  return mode;
}

Tensor new_grad_buffer(int64_t N, int64_t C, int64_t D, const at::TensorOptions& opts) {
  constexpr int64_t kMinBytes = int64_t(4) << 20;
  const int64_t nbytes = N * C * D * static_cast<int64_t>(c10::elementSize(
      c10::typeMetaToScalarType(opts.dtype())));
  if (grad_buffer_mode() == GradBuffer::kFresh || nbytes < kMinBytes) {
    Tensor g = at::empty({N, C, D}, opts);
    advise_huge_pages(g);
    return g;
  }
  static std::mutex mu;
  static Tensor& cached = *new Tensor();  // never destroyed: no teardown order at exit
  std::lock_guard<std::mutex> lock(mu);
  // use_count 1 on both the tensor and its storage: no other tensor, view or autograd buffer
  // refers to the memory, so handing it out again cannot be observed.
  if (cached.defined() && cached.use_count() == 1 && cached.storage().use_count() == 1 &&
      cached.dtype() == opts.dtype() && cached.sizes() == at::IntArrayRef({N, C, D})) {
    return at::alias(cached);  // a new tensor on the same storage, no autograd state carried
  }
  cached = Tensor();  // release the old one first: never two cached buffers at once
  cached = at::empty({N, C, D}, opts);
  advise_huge_pages(cached);
  return at::alias(cached);
}

// Tensors kept alive (contiguous copies) for the duration of a kernel call.
struct Prepared {
  CrossEntropyArgs args{};
  Tensor target, weight;
};

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedloss_C CPU cross_entropy: ", name,
              " must be a CPU tensor, got one on ", t.device());
}

Prepared prepare(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& grad_scale, int64_t ignore_index,
                 double label_smoothing, double z_loss, double softcap) {
  check_cpu(input, "input");
  check_cpu(target, "target");
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
  a.in_sn = input.stride(0);
  a.in_sc = input.stride(1);
  a.in_sd = input.stride(2);

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
    a.tg_sn = target.stride(0);
    a.tg_sc = target.stride(1);
    a.tg_sd = target.stride(2);
  } else {
    TORCH_CHECK(false,
                "cross_entropy: target must be int64 class indices or floating-point class "
                "probabilities, got ", target.scalar_type());
  }

  a.weight_sum = static_cast<double>(C);
  if (weight.has_value() && weight->defined()) {
    check_cpu(*weight, "weight");
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C,
                "cross_entropy: weight must have shape (C,) = (", C, ",), got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == acc, "cross_entropy: weight must be ", acc,
                " (the accumulation dtype of ", input.scalar_type(), " input), got ",
                weight->scalar_type());
    p.weight = weight->contiguous();
    a.weight = p.weight.const_data_ptr();
    a.weight_sum = C > 0 ? p.weight.sum(at::kDouble).item<double>() : 0.0;
  }

  a.grad_scale = 1.0;
  if (grad_scale.has_value() && grad_scale->defined()) {
    check_cpu(*grad_scale, "grad_scale");
    TORCH_CHECK(grad_scale->numel() == 1, "cross_entropy: grad_scale must be a 0-d tensor, got "
                "shape ", grad_scale->sizes());
    TORCH_CHECK(grad_scale->scalar_type() == acc, "cross_entropy: grad_scale must be ", acc,
                ", got ", grad_scale->scalar_type());
    a.grad_scale = grad_scale->item<double>();
  }
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap > 0.0 ? softcap : 0.0;

  // Strides of size-1 dimensions are arbitrary; make them canonical so that layout tests see
  // the real layout.
  if (C == 1) a.in_sc = a.tg_sc = 1;
  if (D == 1) a.in_sd = a.tg_sd = 1;
  if (N == 1) a.in_sn = a.tg_sn = C * D;
  return p;
}

void set_grad(CrossEntropyArgs& a, const Tensor& g) {
  a.grad = g.data_ptr();
  a.gr_sn = a.N == 1 ? a.C * a.D : g.stride(0);
  a.gr_sc = a.C == 1 ? 1 : g.stride(1);
  a.gr_sd = a.D == 1 ? 1 : g.stride(2);
}

void run(CrossEntropyArgs& a, Tensor& loss, Tensor& lse) {
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  if (a.N * a.D == 0) return;
  FL_CPU_DISPATCH(cross_entropy_kernel, a);
}

std::tuple<Tensor, Tensor, Tensor> cross_entropy_fwd_cpu(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, bool compute_grad) {
  Prepared p = prepare(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                       softcap);
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  Tensor loss = at::empty({p.args.N, p.args.D}, acc);
  Tensor lse = at::empty({p.args.N, p.args.D}, acc);
  Tensor grad;
  if (compute_grad) {
    grad = new_grad_buffer(p.args.N, p.args.C, p.args.D, input.options());
    set_grad(p.args, grad);
  } else {
    grad = at::empty({0}, input.options());
  }
  run(p.args, loss, lse);
  return {loss, lse, grad};
}

std::tuple<Tensor, Tensor> cross_entropy_fwd_inplace_cpu(
    const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap) {
  Prepared p = prepare(input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
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
  const at::ScalarType acc = acc_type(grad.scalar_type());
  const bool scalar = grad_loss.numel() == 1 || (grad_loss.stride(0) == 0 && grad_loss.stride(1) == 0);
  ScaleGradArgs a{};
  a.dtype = grad.scalar_type();
  a.N = N;
  a.C = C;
  a.D = D;
  Tensor gl;
  if (scalar) {
    // The scalar lives on the host: read it, and skip the pass over grad when it is 1.
    a.scalar = grad_loss.scalar_type() == at::kDouble
                   ? *grad_loss.const_data_ptr<double>()
                   : static_cast<double>(*grad_loss.const_data_ptr<float>());
    if (acc == at::kFloat) a.scalar = static_cast<float>(a.scalar);
    if (a.scalar == 1.0) return;
    if (!grad.is_contiguous()) {
      const Tensor zero = grad == 0;  // stays 0 (see the kernel's scale_keep_zero)
      grad.mul_(a.scalar).masked_fill_(zero, 0);
      return;
    }
  } else {
    gl = grad_loss.to(acc).contiguous();
    if (!grad.is_contiguous()) {
      const Tensor zero = grad == 0;
      // computed in gl's dtype (float32 for half grads), rounded once
      grad.mul_(gl.unsqueeze(1)).masked_fill_(zero, 0);
      return;
    }
    a.grad_loss = gl.const_data_ptr();
  }
  a.grad = grad.data_ptr();
  FL_CPU_DISPATCH(scale_grad_kernel, a);
}

Tensor cross_entropy_mean_scale_cpu(const Tensor& target, const std::optional<Tensor>& weight,
                                    int64_t ignore_index, at::ScalarType dtype) {
  check_cpu(target, "target");
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy_mean_scale: target must be int64, "
              "got ", target.scalar_type());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "cross_entropy_mean_scale: dtype must be float32 or float64, got ", dtype);
  const Tensor y = target.contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const int64_t n = y.numel();
  double total = 0.0;  // summed in a fixed order: deterministic, and exact for counts < 2^53
  if (weight.has_value() && weight->defined()) {
    check_cpu(*weight, "weight");
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
  m.impl("scale_grad_", &fusedloss::cpu::scale_grad_cpu);
  m.impl("cross_entropy_mean_scale", &fusedloss::cpu::cross_entropy_mean_scale_cpu);
}
