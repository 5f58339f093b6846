// Output buffers of the CPU bindings; see buffers.h.
#include "buffers.h"

#include <cstdint>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fusedloss::cpu {

namespace {
constexpr int64_t kBigBytes = int64_t(4) << 20;

bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == value;
}
}  // namespace

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool off = env_is("FUSEDLOSS_CPU_HUGEPAGES", "0");
  const uintptr_t nbytes = static_cast<uintptr_t>(t.nbytes());
  if (off || nbytes < static_cast<uintptr_t>(kBigBytes)) return;
  const uintptr_t page = 4096;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + page - 1) & ~(page - 1);
  const uintptr_t e = (p + nbytes) & ~(page - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor GradBufferSlot::get(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static const bool fresh = env_is("FUSEDLOSS_CPU_GRAD_BUFFER", "fresh");
  int64_t nbytes = static_cast<int64_t>(
      c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  for (const int64_t s : sizes) nbytes *= s;
  if (fresh || nbytes < kBigBytes) {
    at::Tensor g = at::empty(sizes, opts);
    advise_huge_pages(g);
    return g;
  }
  std::lock_guard<std::mutex> lock(mu_);
  // use_count 1 on both the tensor and its storage: no other tensor, view or autograd buffer
  // refers to the memory, so handing it out again cannot be observed.
  if (cached_.defined() && cached_.use_count() == 1 && cached_.storage().use_count() == 1 &&
      cached_.dtype() == opts.dtype() && cached_.sizes() == sizes) {
    return at::alias(cached_);  // a new tensor on the same storage, no autograd state carried
  }
  cached_ = at::Tensor();  // release the old one first: never two cached buffers at once
  cached_ = at::empty(sizes, opts);
  advise_huge_pages(cached_);
  return at::alias(cached_);
}

}  // namespace fusedloss::cpu
