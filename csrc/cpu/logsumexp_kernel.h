// The row logsumexp of an (N, C, D) input and nothing else: the lse-only policy of the softmax-row
// skeleton (softmax_rows.h), the partial logsumexp of a vocabulary-parallel shard. Compiled once
// per instruction set (see cpu_isa.h); the binding (logsumexp.cpp) allocates lse (N, D) in the
// accumulation dtype and calls FL_CPU_DISPATCH(logsumexp_kernel, args).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fusedloss::cpu {

struct LogsumexpArgs {
  c10::ScalarType dtype;  // input's dtype
  int64_t N, C, D;
  const void* input;
  int64_t in_sn, in_sc, in_sd;  // any strides, in elements
  double softcap;               // > 0: lse of softcap * tanh(x / softcap); <= 0: off
  void* lse;                    // (N, D) contiguous, accumulation dtype
};

}  // namespace fusedloss::cpu

#define FUSEDLOSS_DECLARE_LOGSUMEXP_KERNEL(ISA) \
  namespace fusedloss::cpu::ISA {                 \
  void logsumexp_kernel(const ::fusedloss::cpu::LogsumexpArgs& args); \
  }

FUSEDLOSS_DECLARE_LOGSUMEXP_KERNEL(DEFAULT)
FUSEDLOSS_DECLARE_LOGSUMEXP_KERNEL(AVX2)
FUSEDLOSS_DECLARE_LOGSUMEXP_KERNEL(AVX512)
