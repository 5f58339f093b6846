// Interface between the cross-entropy CPU bindings (cross_entropy.cpp: checks, allocation,
// dispatch) and the kernels (cross_entropy_kernel.cpp, compiled once per instruction set; see
// cpu_isa.h). Plain data only, so the copies share no code but these declarations.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// One cross_entropy_fwd / cross_entropy_fwd_inplace call on an (N, C, D) input. Strides are in
// elements; rows are the N*D positions (n, d), row r = n*D + d. See docs/KERNELS.md.
struct CrossEntropyArgs {
  c10::ScalarType dtype;  // input, gradient and probability-target dtype
  int64_t N, C, D;
  const void* input;
  int64_t in_sn, in_sc, in_sd;
  const int64_t* target_index;  // (N, D) contiguous class indices; nullptr in probability mode
  const void* target_prob;      // (N, C, D) probabilities of input's dtype; nullptr in index mode
  int64_t tg_sn, tg_sc, tg_sd;
  const void* weight;  // (C,) contiguous, accumulation dtype; nullptr: every class weighs 1
  double weight_sum;   // sum of weight (C without weight)
  double loss_scale;   // multiplies every row's loss and gradient
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;  // softcap <= 0: off
  void* grad;  // gradient (may be input itself, in place); nullptr: not computed
  int64_t gr_sn, gr_sc, gr_sd;
  void* loss;  // (N, D) contiguous, accumulation dtype
  void* lse;   // (N, D) contiguous, accumulation dtype
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_CE_KERNELS(ISA)                          \
  namespace fusedloss::cpu::ISA {                                  \
  void cross_entropy_kernel(const ::fusedloss::cpu::CrossEntropyArgs& args); \
  }

FUSEDLOSS_DECLARE_CE_KERNELS(DEFAULT)
FUSEDLOSS_DECLARE_CE_KERNELS(AVX2)
FUSEDLOSS_DECLARE_CE_KERNELS(AVX512)
