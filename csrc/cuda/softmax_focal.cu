// softmax_focal_fwd on CUDA (schema in csrc/registration.cpp, contract in docs/KERNELS.md): the
// focal policy of the softmax-row skeleton (softmax_rows.cuh), with the per-row math of
// csrc/include/fusedloss/softmax_focal.h, the functions the CPU kernel runs (so the CPU tests
// cover the formulas used here).
//
// No pass-1 sums besides (m, s). The epilogue: d = lse - x_y = (m - x_y) + log s,
// em1 = expm1(-d) = p_y - 1, loss = w_y q^gamma d and A (sfocal::focal_row); pass 2 writes
// A p_j, the target column A * em1, ignored rows 0. 'mean' and 'sum' (reduce) return the sums of
// the fixed blocks of rows of row_blocks.h (the skeleton's reduced output: no per-row tensor).
//
// Target values are checked on the device: y == ignore_index -> ignored row; otherwise y outside
// [0, C) fails CUDA_KERNEL_ASSERT, and x[y] / weight[y] are never read for such a y (where device
// asserts are compiled out the row gives NaN). loss_scale is read on the device (no host sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "common.cuh"
#include "fusedloss/row_blocks.h"
#include "fusedloss/softmax_focal.h"
#include "softmax_rows.cuh"

namespace fusedloss {
namespace cuda {
namespace {

// expm1 of the epilogue. float: expm1f. double: exp(u) - 1, an absolute error of one ulp of 1
// (relative 1e-16 / |u|: 1e-8 for p_y within 1e-8 of 1): double's expm1 is a called subroutine
// on sm_90 whose saved registers spilled in the strided kernel, and so did every inline series
// tried (.ci/check_cuda.sh). The CPU kernel (float64 gradcheck) uses the accurate vexpm1.
template <typename T>
__device__ __forceinline__ T epilogue_expm1(T u) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return fl_expm1(u);
  } else {
    return fl_exp(u) - T(1);
  }
}

template <typename scalar_t_, typename acc_t_>
struct FocalPolicy {
  using scalar_t = scalar_t_;
  using acc_t = acc_t_;
  using Extra = NoExtra;
  struct Row {
    int64_t y;
    bool ignored;
    acc_t x_y;  // target logit
    acc_t wy;   // weight of the target class
  };
  struct Coef {
    acc_t m, log_s;  // p_j = exp((x_j - m) - log_s)
    acc_t A, g_y;    // scaled: the gradient A p_j, the target column g_y
    acc_t loss;      // scaled row loss
  };
  static constexpr bool kAux = false;
  static constexpr bool kRowLoss = true;  // row_loss(): the skeleton's block sums

  const int64_t* y;  // (N, D) class indices
  int64_t yN, yD;
  const acc_t* w;           // class weights (C,), or null
  const acc_t* loss_scale;  // 0-d, or null (= 1)
  acc_t* loss;              // (N, D) contiguous per-row loss (not reduce)
  int64_t C;
  int64_t ignore_index;
  acc_t gamma;
  acc_t scale;  // *loss_scale, read on the device by prepare()

  __device__ __forceinline__ void prepare() {
    scale = loss_scale != nullptr ? *loss_scale : acc_t(1);
  }
  __device__ __forceinline__ acc_t logit(acc_t x) const { return x; }

  __device__ __forceinline__ Row row(int64_t n, int64_t d, const scalar_t* xrow, int64_t xC,
                                     bool leader) const {
    Row ti{y[n * yN + d * yD], false, acc_t(0), acc_t(1)};
    ti.ignored = ti.y == ignore_index;
    if (!ti.ignored) {
      const bool in_range = ti.y >= 0 && ti.y < C;
      if (leader) {
        CUDA_KERNEL_ASSERT(ti.y >= 0 && ti.y < C && "softmax_focal_loss: target out of bounds");
      }
      if (in_range) {  // only now x[y] and w[y]
        ti.x_y = static_cast<acc_t>(xrow[ti.y * xC]);
        ti.wy = w != nullptr ? w[ti.y] : acc_t(1);
      } else {
        ti.x_y = acc_t(NAN);
        ti.wy = acc_t(NAN);
      }
    }
    return ti;
  }

  __device__ __forceinline__ bool extra_sums(const Row&) const { return false; }
  __device__ __forceinline__ void accumulate(Extra&, const Row&, int64_t, acc_t, acc_t,
                                             acc_t) const {}

  __device__ __forceinline__ Coef epilogue(const Row& ti, const ce::OnlineLSE<acc_t>& st,
                                           const Extra&) const {
    Coef cf;
    cf.m = st.m;
    cf.log_s = fl_log(st.s);
    if (ti.ignored) {
      cf.A = cf.g_y = acc_t(0);
      cf.loss = acc_t(0) * scale;  // NaN for an all-ignored 'mean' (scale = inf), as torch
      return cf;
    }
    const acc_t d = (st.m - ti.x_y) + cf.log_s;  // lse - x_y
    const sfocal::FocalRow<acc_t> fr = sfocal::focal_row(d, epilogue_expm1(-d), ti.wy, gamma);
    cf.A = fr.A * scale;
    cf.g_y = fr.g_y * scale;
    cf.loss = fr.loss * scale;
    return cf;
  }

  __device__ __forceinline__ void store_row(int64_t r, const Coef& cf) const {
    loss[r] = cf.loss;
  }
  __device__ __forceinline__ acc_t row_loss(const Coef& cf) const { return cf.loss; }
  __device__ __forceinline__ bool zero_grad(const Row& ti, const Coef&) const {
    return ti.ignored;
  }
  __device__ __forceinline__ acc_t grad(const Coef& cf, const Row& ti, int64_t c, acc_t xs,
                                        acc_t) const {
    return c == ti.y ? cf.g_y : cf.A * fl_exp((xs - cf.m) - cf.log_s);
  }
};

std::tuple<at::Tensor, at::Tensor> softmax_focal_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight_opt,
    const std::optional<at::Tensor>& loss_scale_opt, double gamma, int64_t ignore_index,
    bool reduce, bool compute_grad) {
  const char* op = "fusedloss_C::softmax_focal_fwd";
  check_ncd_input(input, op);
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  TORCH_CHECK(gamma >= 0.0 && std::isfinite(gamma), op, ": gamma must be finite and >= 0, got ",
              gamma);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
              ": target must have shape (N, D) = (", N, ", ", D, "), got ", target.sizes());
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
                loss_scale.device(), ", input on ", input.device());
    if (loss_scale.scalar_type() != acc) loss_scale = loss_scale.to(acc);  // a device op
  }

  c10::cuda::CUDAGuard guard(input.device());
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor loss = reduce ? at::empty({loss_blocks(N, C, D)}, acc_opts)
                           : at::empty({N, D}, acc_opts);
  at::Tensor grad = compute_grad ? at::empty({N, C, D}, input.options())
                                 : at::empty({0}, input.options());
  const int64_t rows = N * D;
  if (rows == 0) return std::make_tuple(loss, grad);
  TORCH_CHECK(C > 0, op, ": input has no classes (C = 0)");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_softmax_focal_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        RowsArgs<scalar_t> a = input_rows_args<scalar_t>(input);
        if (compute_grad) {
          a.g = grad.mutable_data_ptr<scalar_t>();
          a.gN = C * D;
          a.gC = C == 1 ? 1 : D;
          a.gD = D == 1 ? 0 : 1;
        }
        FocalPolicy<scalar_t, acc_t> pol;
        pol.y = target.const_data_ptr<int64_t>();
        pol.yN = target.stride(0);
        pol.yD = D == 1 ? 0 : target.stride(1);
        pol.w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
        pol.loss_scale = loss_scale.defined() ? loss_scale.const_data_ptr<acc_t>() : nullptr;
        if (reduce) {
          a.block_loss = loss.mutable_data_ptr<acc_t>();
          pol.loss = nullptr;
        } else {
          pol.loss = loss.mutable_data_ptr<acc_t>();
        }
        pol.C = C;
        pol.ignore_index = ignore_index;
        pol.gamma = static_cast<acc_t>(gamma);
        pol.scale = acc_t(1);  // set on the device by prepare()
        launch_softmax_rows(a, pol);
      });
  return std::make_tuple(loss, grad);
}

}  // namespace
}  // namespace cuda
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("softmax_focal_fwd", &fusedloss::cuda::softmax_focal_fwd_cuda);
}
