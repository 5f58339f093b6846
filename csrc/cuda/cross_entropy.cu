// CUDA kernels for the cross-entropy ops (schemas in csrc/registration.cpp, contract in
// docs/KERNELS.md). Cross-entropy is a policy of the softmax-row skeleton (softmax_rows.cuh): the
// kernels, the head/body/tail vector I/O, the reductions and the launch shapes live there and in
// common.cuh; this file holds the CE math as the skeleton's policy, calling the per-row functions
// of csrc/include/fusedloss/cross_entropy.h, the same functions the CPU kernel runs, so the CPU
// tests cover the formulas used here.
//
// Pass-1 sums of the policy: with v_c = w_c t'_c (probability targets) or w_c (label smoothing;
// 1 without weight), omega = sum_c v_c and a = sum_c v_c (m - xs_c), non-negative terms relative
// to the running max m (see ce::dev_rebase).
//
// Target values are checked on the device: y == ignore_index -> ignored row; otherwise y outside
// [0, C) fails CUDA_KERNEL_ASSERT, and x[y] / weight[y] are never read for such a y (where device
// asserts are compiled out the row gives NaN). loss_scale is read on the device (no host sync).
// Offsets are 64-bit throughout. scale_grad_ is in scale_grad.cu.

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.cuh"
#include "fusedloss/cross_entropy.h"
#include "softmax_rows.cuh"

namespace fusedloss {
namespace cuda {
namespace {

// Pass-1 sums beyond the logsumexp (Extra of the policy).
template <typename acc_t>
struct CESums {
  acc_t omega;
  acc_t a;
  __device__ __forceinline__ CESums() : omega(acc_t(0)), a(acc_t(0)) {}
  __device__ __forceinline__ void rebase(acc_t m_old, acc_t m_new) {
    a = ce::dev_rebase(a, omega, m_old, m_new);
  }
  __device__ __forceinline__ void combine(const CESums& o) {
    omega += o.omega;
    a += o.a;
  }
};

// Row-level target information (class-index mode), read before pass 1 by every thread of the row
// (the same addresses: one broadcast transaction per warp).
template <typename acc_t>
struct TargetInfo {
  int64_t y;
  bool ignored;
  acc_t xs_y;  // softcapped target logit
  acc_t wy;    // weight of the target class
};

// Everything pass 2 needs about a row, computed identically by every thread of the row from the
// all-reduced state.
template <typename acc_t>
struct RowCoef {
  acc_t lse;
  acc_t d;  // lse - xs_y, as (m - xs_y) + log(s): keeps its digits for large logits
  ce::IndexRow<acc_t> ir;
  ce::ProbRow<acc_t> pr;
  acc_t loss;  // scaled row loss
};

// The cross-entropy policy: class-index targets (PROB = false) or probability targets of the
// input's shape (PROB = true, read by the skeleton as its aux operand).
template <typename scalar_t_, typename acc_t_, bool PROB>
struct CEPolicy {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using Extra = CESums<acc_t>;
  using Row = TargetInfo<acc_t>;
  using Coef = RowCoef<acc_t>;
  static constexpr bool kAux = PROB;

  const int64_t* y;  // class-index targets (N, D), or null
  int64_t yN, yD;
  const acc_t* w;           // class weights (C,), or null
  const acc_t* loss_scale;  // 0-d, or null (= 1)
  acc_t* loss;              // (N, D) contiguous
  acc_t* lse;               // (N, D) contiguous
  int64_t C;
  int64_t ignore_index;
  acc_t ls, z, softcap;
  acc_t scale;  // *loss_scale, read on the device by prepare()

  __device__ __forceinline__ void prepare() {
    scale = loss_scale != nullptr ? *loss_scale : acc_t(1);
  }

  __device__ __forceinline__ acc_t logit(acc_t x) const { return ce::softcap_fwd(x, softcap); }

  __device__ __forceinline__ Row row(int64_t n, int64_t d, const scalar_t* xrow, int64_t xC,
                                     bool leader) const {
    Row ti{0, false, acc_t(0), acc_t(1)};
    if constexpr (!PROB) {
      ti.y = y[n * yN + d * yD];
      ti.ignored = ti.y == ignore_index;
      if (!ti.ignored) {
        const bool in_range = ti.y >= 0 && ti.y < C;
        if (leader) {
          CUDA_KERNEL_ASSERT(ti.y >= 0 && ti.y < C && "cross_entropy: target out of bounds");
        }
        if (in_range) {
          ti.xs_y = logit(static_cast<acc_t>(xrow[ti.y * xC]));
          ti.wy = w != nullptr ? w[ti.y] : acc_t(1);
        } else {
          // Only reached where device asserts are compiled out: never read x[y] / w[y]; NaN row.
          ti.xs_y = acc_t(NAN);
          ti.wy = acc_t(NAN);
        }
      }
    }
    return ti;
  }

  __device__ __forceinline__ bool extra_sums(const Row&) const { return PROB || ls > acc_t(0); }

  // v_c = w_c t'_c or w_c (only called with label smoothing in class-index mode).
  __device__ __forceinline__ acc_t sum_weight(int64_t c, acc_t t) const {
    acc_t v;
    if constexpr (PROB) {
      v = ce::smoothed_prob(t, ls, static_cast<long>(C));
      if (w != nullptr) v *= w[c];
    } else {
      v = w != nullptr ? w[c] : acc_t(1);
    }
    return v;
  }

  __device__ __forceinline__ void accumulate(Extra& e, const Row&, int64_t c, acc_t xs, acc_t t,
                                             acc_t m) const {
    const acc_t v = sum_weight(c, t);
    e.omega += v;
    e.a += v * ce::dev_term(m, xs);
  }

  __device__ __forceinline__ Coef epilogue(const Row& ti, const ce::OnlineLSE<acc_t>& st,
                                           const Extra& e) const {
    Coef rc;
    rc.lse = st.lse();
    const acc_t log_s = fl_log(st.s);
    rc.d = acc_t(0);
    if constexpr (PROB) {
      rc.pr = ce::prob_row(rc.lse, log_s, e.omega, e.a, z);
      rc.loss = rc.pr.loss * scale;
    } else {
      if (ti.ignored) {
        rc.ir = ce::IndexRow<acc_t>{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        rc.loss = acc_t(0) * scale;  // NaN for an all-ignored 'mean' (scale = inf), as torch
      } else {
        const acc_t W = w != nullptr ? e.omega : static_cast<acc_t>(C);
        rc.d = (st.m - ti.xs_y) + log_s;
        rc.ir = ce::index_row_diff(rc.lse, log_s, rc.d, ti.wy, W, e.a, ls, z,
                                   static_cast<long>(C));
        rc.loss = rc.ir.loss * scale;
      }
    }
    return rc;
  }

  __device__ __forceinline__ void store_row(int64_t r, const Coef& rc) const {
    loss[r] = rc.loss;
    lse[r] = rc.lse;
  }

  __device__ __forceinline__ bool zero_grad(const Row& ti, const Coef&) const {
    if constexpr (PROB) {
      return false;
    } else {
      return ti.ignored;
    }
  }

  // d(scaled row loss)/d(x_c) for a non-ignored row.
  __device__ __forceinline__ acc_t grad(const Coef& rc, const Row& ti, int64_t c, acc_t xs,
                                        acc_t t) const {
    acc_t gr;
    if constexpr (PROB) {
      gr = ce::prob_grad(rc.pr, xs, rc.lse, sum_weight(c, t));
    } else {
      if (c == ti.y) {
        gr = ce::index_grad_target_diff(rc.ir, -rc.d, ti.wy);
      } else {
        // w_c only matters through the smoothing term.
        const acc_t wc = (w != nullptr && ls > acc_t(0)) ? w[c] : acc_t(1);
        gr = ce::index_grad(rc.ir, xs, rc.lse, wc);
      }
    }
    return gr * ce::softcap_grad(xs, softcap) * scale;
  }
};

// ------------------------------------------------------------------------------------------------
// Host side.

struct GradOut {
  void* ptr;  // null: no gradient
  int64_t sN, sC, sD;
};

// Launches the cross-entropy kernel for `input` with the gradient going to `gout`.
void launch_cross_entropy(const char* op, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight_opt,
                          const std::optional<at::Tensor>& loss_scale_opt, int64_t ignore_index,
                          double label_smoothing, double z_loss, double softcap,
                          const GradOut& gout, const at::Tensor& loss, const at::Tensor& lse) {
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const bool prob = at::isFloatingType(target.scalar_type());
  if (prob) {
    TORCH_CHECK(target.sizes() == input.sizes(), op,
                ": a probability target must have the input's shape ", input.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), op,
                ": a probability target must have the input's dtype ", input.scalar_type(),
                ", got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": class-index targets must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": class-index target must have shape (N, D) = (", N, ", ", D, "), got ",
                target.sizes());
  }
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              ", input on ", input.device());
  at::Tensor weight;
  if (weight_opt.has_value() && weight_opt->defined()) {
    weight = *weight_opt;
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, op, ": weight must have shape (C,) = (",
                C, ",), got ", weight.sizes());
    TORCH_CHECK(weight.scalar_type() == acc, op, ": weight must be ", acc, ", got ",
                weight.scalar_type());
    TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(),
                ", input on ", input.device());
    weight = weight.contiguous();
  }
  at::Tensor loss_scale;
  if (loss_scale_opt.has_value() && loss_scale_opt->defined()) {
    loss_scale = *loss_scale_opt;
    TORCH_CHECK(loss_scale.numel() == 1, op, ": loss_scale must hold one value, got shape ",
                loss_scale.sizes());
    TORCH_CHECK(loss_scale.device() == input.device(), op, ": loss_scale is on ",
                loss_scale.device(), ", input on ", input.device(),
                " (it is read on the device; no host sync)");
    if (loss_scale.scalar_type() != acc) loss_scale = loss_scale.to(acc);  // a device op
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);

  const int64_t rows = N * D;
  if (rows == 0) return;  // empty batch: launch nothing

  // Strides that cannot matter are normalised so the fast-path tests see through them (x's by
  // input_rows_args).
  GradOut g = gout;
  if (g.ptr != nullptr) {
    if (C == 1) g.sC = 1;
    if (D == 1) g.sD = 0;
  }
  c10::cuda::CUDAGuard guard(input.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_cross_entropy_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        RowsArgs<scalar_t> a = input_rows_args<scalar_t>(input);
        if (prob) {
          a.aux = target.const_data_ptr<scalar_t>();
          a.aN = target.stride(0);
          a.aC = C == 1 ? 1 : target.stride(1);
          a.aD = D == 1 ? 0 : target.stride(2);
        }
        a.g = static_cast<scalar_t*>(g.ptr);
        a.gN = g.sN;
        a.gC = g.sC;
        a.gD = g.sD;
        auto fill = [&](auto& pol) {
          pol.y = nullptr;
          pol.yN = pol.yD = 0;
          if (!prob) {
            pol.y = target.const_data_ptr<int64_t>();
            pol.yN = target.stride(0);
            pol.yD = D == 1 ? 0 : target.stride(1);
          }
          pol.w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
          pol.loss_scale = loss_scale.defined() ? loss_scale.const_data_ptr<acc_t>() : nullptr;
          pol.loss = loss.mutable_data_ptr<acc_t>();
          pol.lse = lse.mutable_data_ptr<acc_t>();
          pol.C = C;
          pol.ignore_index = ignore_index;
          pol.ls = static_cast<acc_t>(label_smoothing);
          pol.z = static_cast<acc_t>(z_loss);
          pol.softcap = softcap > 0.0 ? static_cast<acc_t>(softcap) : acc_t(0);
          pol.scale = acc_t(1);  // set on the device by prepare()
        };
        if (prob) {
          CEPolicy<scalar_t, acc_t, true> pol;
          fill(pol);
          launch_softmax_rows(a, pol);
        } else {
          CEPolicy<scalar_t, acc_t, false> pol;
          fill(pol);
          launch_softmax_rows(a, pol);
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& loss_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, bool compute_grad) {
  const char* op = "fusedloss_C::cross_entropy_fwd";
  check_ncd_input(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const auto acc_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({N, D}, acc_opts);
  at::Tensor lse = at::empty({N, D}, acc_opts);
  at::Tensor grad = compute_grad ? at::empty({N, C, D}, input.options())
                                 : at::empty({0}, input.options());
  GradOut gout{nullptr, 0, 0, 0};
  if (compute_grad) gout = GradOut{grad.data_ptr(), C * D, D, 1};
  launch_cross_entropy(op, input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                       softcap, gout, loss, lse);
  return std::make_tuple(loss, lse, grad);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& loss_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap) {
  const char* op = "fusedloss_C::cross_entropy_fwd_inplace";
  check_ncd_input(input, op);
  TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
              ": input has overlapping memory (an expanded tensor); the in-place gradient needs "
              "one element per position");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), D = input.size(2);
  const auto acc_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({N, D}, acc_opts);
  at::Tensor lse = at::empty({N, D}, acc_opts);
  const GradOut gout{input.numel() > 0 ? input.data_ptr() : nullptr, input.stride(0),
                     input.stride(1), input.stride(2)};
  launch_cross_entropy(op, input, target, weight, loss_scale, ignore_index, label_smoothing, z_loss,
                       softcap, gout, loss, lse);
  return std::make_tuple(loss, lse);
}


// The 'mean' factor (registration.cpp), as device ops: no host sync.
at::Tensor cross_entropy_mean_factor_cuda(const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight,
                                         int64_t ignore_index, at::ScalarType dtype) {
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy_mean_factor: target must be int64");
  const at::Tensor y = target.reshape({-1});
  const at::Tensor valid = y.ne(ignore_index);
  if (!weight.has_value() || !weight->defined()) return valid.sum(dtype).reciprocal();
  const int64_t C = weight->numel();
  // Out-of-range targets add nothing (the loss kernel traps on them); clamped only to gather.
  const at::Tensor in_range = valid.logical_and(y.ge(0)).logical_and(y.lt(C));
  const at::Tensor wy = weight->to(dtype).index_select(0, y.clamp(0, std::max<int64_t>(C - 1, 0)));
  // masked_fill, not a multiply by the mask: an inf weight times 0 would be NaN
  return wy.masked_fill(in_range.logical_not(), 0).sum(dtype).reciprocal();
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("cross_entropy_fwd", &fusedloss::cuda::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &fusedloss::cuda::cross_entropy_fwd_inplace_cuda);
  m.impl("cross_entropy_mean_factor", &fusedloss::cuda::cross_entropy_mean_factor_cuda);
}
