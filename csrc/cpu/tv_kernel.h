// Interface between the total-variation binding (tv.cpp) and its kernel (tv_kernel.cpp, compiled
// once per instruction set; see cpu_isa.h): the stencil skeleton (stencil.h) with the policy of
// csrc/include/fusedloss/tv.h.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// Images (P, Q, H, W), any strides, in elements. See docs/KERNELS.md, "Total variation".
struct TvArgs {
  c10::ScalarType dtype;       // input's (and the gradient's) dtype
  int64_t P, Q, H, W;
  const void* input;
  int64_t xs[4];
  const void* weight;          // nullptr, or (P, Q, H, W) of any floating dtype, 0 strides where
  c10::ScalarType w_dtype;     // broadcast
  int64_t ws[4];
  int norm;                    // tv::Norm: 0 l1, 1 l2_squared, 2 isotropic
  double eps;                  // isotropic only, >= 0
  double scale;                // multiplies every image's loss and the gradient
  void* loss;                  // (P * Q,) contiguous, accumulation dtype
  void* grad;                  // nullptr, or (P, Q, H, W) of dtype, strides gs
  int64_t gs[4];
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_TV_KERNEL(ISA) \
  namespace fusedloss::cpu::ISA {        \
  void tv_kernel(const ::fusedloss::cpu::TvArgs& args); \
  }

FUSEDLOSS_DECLARE_TV_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_TV_KERNEL(AVX2)
FUSEDLOSS_DECLARE_TV_KERNEL(AVX512)
