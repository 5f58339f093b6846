// What the CPU bindings of every loss share (compiled once, without AVX flags; not for the
// *_kernel.cpp files): the accumulation dtype, the dtypes the kernels take, and the output buffers
// (huge-page advice, reuse of the last call's gradient buffer). See docs/KERNELS.md, "CPU memory
// traffic".
#pragma once

#include <ATen/ATen.h>

#include <mutex>

namespace fusedloss::cpu {

// A binding's device check of one tensor argument: "fusedloss_C CPU <op>: <name> must be a CPU
// tensor, got one on <device>".
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedloss_C CPU ", op, ": ", name,
              " must be a CPU tensor, got one on ", t.device());
}

// float32, or float64 for float64 tensors.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// float32, float64, float16, bfloat16: what the CPU kernels compute on.
inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The strides of an (N, C, D) tensor in elements, those of its size-1 dimensions made canonical
// (C * D, 1, 1): they are arbitrary there, and the kernels choose their path (rows, spatial,
// gathered) from the strides, so they see the real layout.
struct NcdStrides {
  int64_t n, c, d;
};
inline NcdStrides ncd_strides(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1), D = t.size(2);
  return {N == 1 ? C * D : t.stride(0), C == 1 ? 1 : t.stride(1), D == 1 ? 1 : t.stride(2)};
}

// A buffer of 4 MiB or more about to be written for the first time: back it with transparent huge
// pages where the system allows it on request (THP "madvise" mode); faulting it in 4 KiB pages
// costs about as much as a whole cross-entropy kernel. Harmless if it fails;
// FUSEDLOSS_CPU_HUGEPAGES=0 turns it off.
void advise_huge_pages(const at::Tensor& t);

// One loss's gradient buffer, kept between calls. get() hands the cached buffer out again when
// nothing but this slot still holds it (tensor and storage use count 1: the training step that
// used it is done with it) and it has the same sizes and dtype; otherwise it allocates a fresh one
// (advised to huge pages) and caches that. glibc returns a large freed buffer to the OS at once,
// so a fresh one page-faults anew on every call: in a long-lived process that costs more than the
// kernel. Buffers under 4 MiB always come fresh (glibc serves them from its heap without faults),
// and so does every buffer with FUSEDLOSS_CPU_GRAD_BUFFER=fresh. The returned tensor is a new
// alias of the storage, with no autograd state. Costs one gradient's worth of memory between
// calls. Use one slot per loss binding (two losses of one step each keep theirs):
//     static GradBufferSlot& slot = *new GradBufferSlot();  // never destroyed: no exit order
//     at::Tensor g = slot.get({N, C, D}, input.options());
class GradBufferSlot {
 public:
  at::Tensor get(at::IntArrayRef sizes, const at::TensorOptions& opts);

 private:
  std::mutex mu_;
  at::Tensor cached_;
};

}  // namespace fusedloss::cpu
