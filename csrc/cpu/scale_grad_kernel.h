// Interface between the scale_grad_ binding (scale_grad.cpp) and its kernel (scale_grad_kernel.cpp,
// compiled once per instruction set; see cpu_isa.h).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// grad (N, C, D), any strides, *= grad_loss[n, d] (broadcast over C), or *= scalar; an element
// that is exactly 0 stays 0. See docs/KERNELS.md.
struct ScaleGradArgs {
  c10::ScalarType dtype;  // grad's dtype; grad_loss has the accumulation dtype
  void* grad;
  int64_t N, C, D;
  int64_t g_sn, g_sc, g_sd;  // grad's strides, in elements
  const void* grad_loss;     // (N, D); nullptr: multiply by `scalar`
  int64_t l_sn, l_sd;        // grad_loss's strides (0 where it is expanded)
  double scalar;
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_SCALE_GRAD_KERNEL(ISA) \
  namespace fusedloss::cpu::ISA {                \
  void scale_grad_kernel(const ::fusedloss::cpu::ScaleGradArgs& args); \
  }

FUSEDLOSS_DECLARE_SCALE_GRAD_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_SCALE_GRAD_KERNEL(AVX2)
FUSEDLOSS_DECLARE_SCALE_GRAD_KERNEL(AVX512)
