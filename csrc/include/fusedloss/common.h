// Shared by the CPU (.cpp) and CUDA (.cu) kernels: plain C++ with no ATen types, so the same
// inline functions run on the host in the CPU tests and on the device in the CUDA kernels.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fusedloss {

// Reductions as passed from Python (matching at::Reduction: none=0, mean=1, sum=2).
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

template <typename T>
FL_HOST_DEVICE T fl_exp(T x) { return ::exp(x); }
template <>
FL_HOST_DEVICE float fl_exp<float>(float x) { return ::expf(x); }

template <typename T>
FL_HOST_DEVICE T fl_log(T x) { return ::log(x); }
template <>
FL_HOST_DEVICE float fl_log<float>(float x) { return ::logf(x); }

template <typename T>
FL_HOST_DEVICE T fl_expm1(T x) { return ::expm1(x); }
template <>
FL_HOST_DEVICE float fl_expm1<float>(float x) { return ::expm1f(x); }

template <typename T>
FL_HOST_DEVICE T fl_tanh(T x) { return ::tanh(x); }
template <>
FL_HOST_DEVICE float fl_tanh<float>(float x) { return ::tanhf(x); }

// max that propagates NaN (std::max / fmaxf drop it), so a NaN logit gives a NaN loss.
template <typename T>
FL_HOST_DEVICE T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }

}  // namespace fusedloss
