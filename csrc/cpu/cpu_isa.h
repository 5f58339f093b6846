// Run-time choice between the instruction-set copies of the CPU kernels.
//
// setup.py compiles every csrc/cpu/*_kernel.cpp once per instruction set, with
// -DCPU_CAPABILITY=<ISA> -DCPU_CAPABILITY_<ISA> and the ISA's -m flags, as ATen compiles its own
// kernels; each copy puts its functions in namespace fusedloss::cpu::<ISA>, and defines
// FUSEDLOSS_HAVE_<ISA> for every copy it built. The bindings (compiled without AVX flags, and
// never executing AVX code themselves) call FL_CPU_DISPATCH(fn, args...), which runs the copy that
// matches torch's own CPU capability: the best the CPU supports, or the one forced with
// ATEN_CPU_CAPABILITY=default|avx2|avx512 (how the tests exercise every copy on one machine).
#pragma once

namespace fusedloss::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The copy to run: torch's CPU capability, lowered to the best copy that was compiled in.
// Read once (like ATen, which also reads ATEN_CPU_CAPABILITY once).
Isa isa();
const char* isa_name(Isa isa);

}  // namespace fusedloss::cpu

#ifdef FUSEDLOSS_HAVE_AVX512
#define FL_CPU_CASE_AVX512(FN, ...) \
  case ::fusedloss::cpu::Isa::AVX512: \
    return ::fusedloss::cpu::AVX512::FN(__VA_ARGS__);
#else
#define FL_CPU_CASE_AVX512(FN, ...)
#endif
#ifdef FUSEDLOSS_HAVE_AVX2
#define FL_CPU_CASE_AVX2(FN, ...) \
  case ::fusedloss::cpu::Isa::AVX2: \
    return ::fusedloss::cpu::AVX2::FN(__VA_ARGS__);
#else
#define FL_CPU_CASE_AVX2(FN, ...)
#endif

// Calls fusedloss::cpu::<ISA>::FN(args...) for the ISA chosen by isa().
#define FL_CPU_DISPATCH(FN, ...)                              \
  [&]() {                                                     \
    switch (::fusedloss::cpu::isa()) {                        \
      FL_CPU_CASE_AVX512(FN, __VA_ARGS__)                     \
      FL_CPU_CASE_AVX2(FN, __VA_ARGS__)                       \
      default:                                                \
        return ::fusedloss::cpu::DEFAULT::FN(__VA_ARGS__);    \
    }                                                         \
  }()
