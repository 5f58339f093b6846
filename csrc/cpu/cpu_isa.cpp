// Run-time instruction-set choice for the CPU kernels; see cpu_isa.h.
#include "cpu_isa.h"

#include <ATen/Version.h>

#include <string>

namespace fusedloss::cpu {

namespace {

Isa detect() {
  // at::get_cpu_capability() is what torch.backends.cpu.get_cpu_capability() returns: "DEFAULT",
  // "AVX2" or "AVX512" on x86 (cpuinfo's verdict, or ATEN_CPU_CAPABILITY); other names elsewhere.
  const std::string cap = at::get_cpu_capability();
#ifdef FUSEDLOSS_HAVE_AVX512
  if (cap == "AVX512") return Isa::AVX512;
#endif
#ifdef FUSEDLOSS_HAVE_AVX2
  if (cap == "AVX512" || cap == "AVX2") return Isa::AVX2;
#endif
  return Isa::DEFAULT;
}

}  // namespace

Isa isa() {
  static const Isa chosen = detect();
  return chosen;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512:
      return "AVX512";
    case Isa::AVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

}  // namespace fusedloss::cpu
