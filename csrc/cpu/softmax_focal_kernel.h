// Interface between the softmax focal loss CPU binding (softmax_focal.cpp: checks, allocation,
// dispatch) and its kernel (softmax_focal_kernel.cpp, compiled once per instruction set; see
// cpu_isa.h). Plain data only.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// One softmax_focal_fwd call on an (N, C, D) input (strides in elements; row r = n*D + d). See
// docs/KERNELS.md.
struct SoftmaxFocalArgs {
  c10::ScalarType dtype;  // input and gradient dtype
  int64_t N, C, D;
  const void* input;
  int64_t in_sn, in_sc, in_sd;
  const int64_t* target;  // (N, D) contiguous class indices
  const void* weight;     // (C,) contiguous, accumulation dtype; nullptr: every class weighs 1
  double gamma;           // >= 0
  double loss_scale;      // multiplies every row's loss and gradient
  int64_t ignore_index;
  void* grad;  // gradient; nullptr: not computed
  int64_t gr_sn, gr_sc, gr_sd;
  void* row_loss;    // (N, D) contiguous, accumulation dtype ('none'), or nullptr
  void* block_loss;  // (loss_blocks(N, C, D),) block sums (row_blocks.h), or nullptr
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_SOFTMAX_FOCAL_KERNEL(ISA) \
  namespace fusedloss::cpu::ISA {                     \
  void softmax_focal_kernel(const ::fusedloss::cpu::SoftmaxFocalArgs& args); \
  }

FUSEDLOSS_DECLARE_SOFTMAX_FOCAL_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_SOFTMAX_FOCAL_KERNEL(AVX2)
FUSEDLOSS_DECLARE_SOFTMAX_FOCAL_KERNEL(AVX512)
