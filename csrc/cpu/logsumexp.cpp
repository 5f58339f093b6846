// CPU binding of logsumexp_fwd (schema in csrc/registration.cpp, contract in docs/KERNELS.md): the
// softmax-row skeleton's lse-only policy (logsumexp_kernel.cpp), for fusedloss.distributed's
// partial logsumexp. Checks, the output, and the call into the instruction-set copy of the kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "buffers.h"
#include "cpu_isa.h"
#include "logsumexp_kernel.h"

namespace fusedloss::cpu {
namespace {

at::Tensor logsumexp_fwd_cpu(const at::Tensor& input, double softcap) {
  TORCH_CHECK(input.device().is_cpu(), "logsumexp_fwd: input must be a CPU tensor, got one on ",
              input.device());
  TORCH_CHECK(input.dim() == 3, "logsumexp_fwd: input must have shape (N, C, D), got ",
              input.sizes());
  TORCH_CHECK(supported_dtype(input.scalar_type()),
              "logsumexp_fwd: input must be float32, float16, bfloat16 or float64, got ",
              input.scalar_type());
  TORCH_CHECK(!std::isnan(softcap), "logsumexp_fwd: softcap must not be NaN");
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  at::Tensor lse = at::empty({N, D}, input.options().dtype(acc_type(input.scalar_type())));
  if (N * D == 0) return lse;
  TORCH_CHECK(C > 0, "logsumexp_fwd: input has no classes (C = 0)");
  LogsumexpArgs a{};
  a.dtype = input.scalar_type();
  a.N = N;
  a.C = C;
  a.D = D;
  a.input = input.const_data_ptr();
  const NcdStrides xs = ncd_strides(input);
  a.in_sn = xs.n;
  a.in_sc = xs.c;
  a.in_sd = xs.d;
  a.softcap = softcap > 0.0 ? softcap : 0.0;
  a.lse = lse.data_ptr();
  FL_CPU_DISPATCH(logsumexp_kernel, a);
  return lse;
}

}  // namespace
}  // namespace fusedloss::cpu

TORCH_LIBRARY_IMPL(fusedloss_C, CPU, m) {
  m.impl("logsumexp_fwd", &fusedloss::cpu::logsumexp_fwd_cpu);
}
