// The row logsumexp of an (N, C, D) input and nothing else: the lse-only policy of the softmax-row
// skeleton (softmax_rows.h), e.g. the partial logsumexp of a vocabulary-parallel shard (which
// today calls cross-entropy with every row ignored). Compiled once per instruction set (see
// cpu_isa.h); no op is bound to it yet: a binding allocates lse (N, D) in the accumulation dtype
// and calls FL_CPU_DISPATCH(softmax_lse_kernel, args).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

struct SoftmaxLseArgs {
  c10::ScalarType dtype;  // input's dtype
  int64_t N, C, D;
  const void* input;
  int64_t in_sn, in_sc, in_sd;  // any strides, in elements
  double softcap;               // > 0: lse of softcap * tanh(x / softcap); <= 0: off
  void* lse;                    // (N, D) contiguous, accumulation dtype
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_SOFTMAX_LSE_KERNEL(ISA) \
  namespace fusedloss::cpu::ISA {                 \
  void softmax_lse_kernel(const ::fusedloss::cpu::SoftmaxLseArgs& args); \
  }

FUSEDLOSS_DECLARE_SOFTMAX_LSE_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_SOFTMAX_LSE_KERNEL(AVX2)
FUSEDLOSS_DECLARE_SOFTMAX_LSE_KERNEL(AVX512)
