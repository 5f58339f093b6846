// Interface between the Dice device ops' CPU binding (dice.cpp: checks, allocation, dispatch) and
// their kernels (dice_kernel.cpp, compiled once per instruction set; see cpu_isa.h). Plain data
// only. Contract: docs/KERNELS.md, "Dice".
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

// One dice_fwd or dice_bwd call on an (N, C, D) input (strides in elements).
struct DiceArgs {
  c10::ScalarType dtype;  // input (and sigmoid target, gradient) dtype
  int64_t N, C, D;
  const void* input;
  int64_t in_sn, in_sc, in_sd;
  // softmax: int64 (N, D) class indices, read by strides t_sn, t_sd (t_sc unused);
  // sigmoid: (N, C, D) of the input's dtype, read by strides.
  const void* target;
  int64_t t_sn, t_sc, t_sd;
  int64_t ignore_index;
  bool sigmoid, squared_pred, with_ce, with_smoothing;
  // dice_fwd: sums (N, C, 5) contiguous, accumulation dtype; lse (N, D) contiguous (softmax).
  // partials: (N * dice_blocks_along(C, D), C, 5) block sums when a row has more than one block,
  // else nullptr (the one block writes sums directly).
  void* sums;
  void* lse_out;
  void* partials;
  // dice_bwd: grad_sums (N, C, 5) contiguous and lse (N, D) contiguous, accumulation dtype; grad
  // of the input's shape and dtype, strides g_*.
  const void* grad_sums;
  const void* lse_in;
  void* grad;
  int64_t g_sn, g_sc, g_sd;
};

// The fixed blocks of positions of the forward's partial sums (the same for every thread count):
// K consecutive d of one n, K a power of two, 4096 for C <= 16, halved while K * C > 65536, at
// least 64 (a multiple of every vector tile).
inline int64_t dice_block_positions(int64_t C) {
  int64_t k = 4096;
  while (k > 64 && k * C > 65536) k >>= 1;
  return k;
}

inline int64_t dice_blocks_along(int64_t C, int64_t D) {
  const int64_t K = dice_block_positions(C);
  return (D + K - 1) / K;
}

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_DICE_KERNELS(ISA)                         \
  namespace fusedloss::cpu::ISA {                                   \
  void dice_fwd_kernel(const ::fusedloss::cpu::DiceArgs& args);     \
  void dice_bwd_kernel(const ::fusedloss::cpu::DiceArgs& args);     \
  }

FUSEDLOSS_DECLARE_DICE_KERNELS(DEFAULT)
FUSEDLOSS_DECLARE_DICE_KERNELS(AVX2)
FUSEDLOSS_DECLARE_DICE_KERNELS(AVX512)
