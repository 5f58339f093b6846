// Interface between the sigmoid focal binding (sigmoid_focal.cpp) and its kernel (sigmoid_focal_kernel.cpp,
// compiled once per instruction set; see cpu_isa.h).
#pragma once

#include "elementwise_args.h"

// Runs the loss over args' operands; returns the sum of the per-element losses for 'sum' and
// 'mean' (0 for 'none').
#define FUSEDLOSS_DECLARE_SIGMOID_FOCAL_KERNEL(ISA)                             \
  namespace fusedloss::cpu::ISA {                                     \
  double sigmoid_focal_kernel(const ::fusedloss::cpu::EwLossArgs& args);        \
  }

FUSEDLOSS_DECLARE_SIGMOID_FOCAL_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_SIGMOID_FOCAL_KERNEL(AVX2)
FUSEDLOSS_DECLARE_SIGMOID_FOCAL_KERNEL(AVX512)
