// What every CUDA kernel of fusedloss shares (no loss math here):
//   AlignedVec, load_vec, store_vec     one 128-bit load / store of 16 bytes of elements
//   pipelined_vecs                      a loop over a row's aligned vectors, loads U deep
//   row_split                           head / 16-byte-aligned body / tail of a row (index_math.h)
//   warp_allreduce, block_allreduce     all-reductions of a generic state (merge), e.g. the
//                                       online-softmax (m, s) state; warp_sum / block_sum for sums
//   launch helpers                      ceil_div / pow2 / capped_grid (index_math.h), sm_count,
//                                       acc_dtype, check_ncd_input, grid_1d
// A new loss's .cu includes this (and softmax_rows.cuh for a softmax over classes) and copies none
// of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "index_math.h"

namespace fusedloss {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// 128-bit vectors.

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_size() {
  static_assert(kVecBytes % sizeof(T) == 0, "element size must divide 16");
  return kVecBytes / static_cast<int>(sizeof(T));
}

// One 128-bit load from a 16-byte-aligned address (the in-place path writes the same memory
// later in the kernel, so a plain load, not ld.global.nc).
template <typename T>
__device__ __forceinline__ AlignedVec<T, vec_size<T>()> load_vec(const T* p) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  AlignedVec<T, vec_size<T>()> v;
  memcpy(&v, &raw, sizeof(raw));
  return v;
}

// One 128-bit store to a 16-byte-aligned global address (st.global.v4.b32). Written in PTX: from
// C++ (a uint4 store of the packed vector) NVVM splits it back into the elements' pieces,
// 4 x 32-bit for 16-bit types and 2 x 64-bit for float. .ci/check_cuda.sh checks the PTX for it.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const AlignedVec<T, vec_size<T>()>& v) {
  uint32_t w[4];
  memcpy(w, &v, sizeof(w));
#if defined(__CUDA_ARCH__)
  asm volatile(
      "{\n\t.reg .u64 ga;\n\tcvta.to.global.u64 ga, %0;\n\t"
      "st.global.v4.b32 [ga], {%1, %2, %3, %4};\n\t}" ::"l"(p),
      "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
      : "memory");
#else
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
#endif
}

// Visits the vectors v = first, first + step, ... < nvec of a 16-byte-aligned body (xb: its first
// vector; ab: a second operand's, read when AUX and a_vec), calling f(v, x vector, ab vector) in
// order. The loads run U deep: while one vector is processed the loads of the next U - 1 are in
// flight, and only one vector's math is live at a time (unrolling the math instead cost the
// softmax rows ~50 registers). In place (f stores where xb points) is fine: each vector is loaded
// before f sees it, and the loads ahead are of other vectors.
template <int U, bool AUX, typename T, typename F>
__device__ __forceinline__ void pipelined_vecs(const T* xb, const T* ab, bool a_vec, int64_t first,
                                               int64_t nvec, int64_t step, F&& f) {
  constexpr int VEC = vec_size<T>();
  using Vec = AlignedVec<T, VEC>;
  Vec xq[U] = {};
  Vec aq[U] = {};
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t v = first + static_cast<int64_t>(k) * step;
    if (v < nvec) {
      xq[k] = load_vec(xb + v * VEC);
      if constexpr (AUX) {
        if (a_vec) aq[k] = load_vec(ab + v * VEC);
      }
    }
  }
  for (int64_t v = first; v < nvec; v += step) {
    const Vec xc = xq[0];
    const Vec ac = aq[0];
#pragma unroll
    for (int k = 0; k + 1 < U; ++k) {
      xq[k] = xq[k + 1];
      if constexpr (AUX) aq[k] = aq[k + 1];
    }
    const int64_t vn = v + static_cast<int64_t>(U) * step;
    if (vn < nvec) {
      xq[U - 1] = load_vec(xb + vn * VEC);
      if constexpr (AUX) {
        if (a_vec) aq[U - 1] = load_vec(ab + vn * VEC);
      }
    }
    f(v, xc, ac);
  }
}

template <typename T>
__device__ __forceinline__ RowSplit row_split(const T* row, int64_t n) {
  return split_row(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(row)), n,
                   static_cast<int64_t>(sizeof(T)));
}

template <typename A, typename B>
__device__ __forceinline__ bool same_alignment(const A* a, const B* b) {
  return same_alignment(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(a)),
                        static_cast<uint64_t>(reinterpret_cast<uintptr_t>(b)));
}

// ------------------------------------------------------------------------------------------------
// Reductions over a generic state S: trivially copyable, default-constructed to the identity, with
// `void merge(const S& other)`. For the all-reductions to leave the same state in every thread the
// merge must be symmetric (merge(a, b) == merge(b, a)), as sums, maxima and the online-softmax
// merge are.

// The state of lane (lane ^ off), word by word. A state type may overload this (found by ADL) to
// skip padding or empty members.
template <typename S>
__device__ __forceinline__ S shfl_xor_state(const S& s, int off) {
  static_assert(std::is_trivially_copyable<S>::value, "reduction state must be trivially copyable");
  static_assert(sizeof(S) % 4 == 0, "reduction state must be a whole number of 32-bit words");
  constexpr int kWords = static_cast<int>(sizeof(S) / 4);
  uint32_t w[kWords];
  memcpy(w, &s, sizeof(S));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], off);
  S o;
  memcpy(&o, w, sizeof(S));
  return o;
}

// Butterfly all-reduce over the 32 lanes of a (fully active) warp.
template <typename S>
__device__ __forceinline__ void warp_allreduce(S& st) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) st.merge(shfl_xor_state(st, off));
}

// Shared memory of block_allreduce for blocks of up to kMaxThreads threads: raw bytes, since a
// __shared__ variable cannot have a constructor.
template <typename S, int kMaxThreads>
struct BlockReduceStorage {
  static constexpr int kMaxWarps = kMaxThreads / kWarpSize;
  alignas(alignof(S)) unsigned char bytes[sizeof(S) * (kMaxWarps + 1)];
  __device__ __forceinline__ S* part() { return reinterpret_cast<S*>(bytes); }
  __device__ __forceinline__ S* total() { return reinterpret_cast<S*>(bytes) + kMaxWarps; }
};

// All-reduce over a 1-D block (blockDim.x a multiple of 32, at most kMaxThreads): every thread
// ends with the merged state. Two barriers, and every thread must call it; safe to call once per
// row in a block-uniform loop (see the comments on the shared slots). The first barrier also
// orders every earlier global read of the block before any later write.
template <typename S, int kMaxThreads>
__device__ __forceinline__ void block_allreduce(S& st, BlockReduceStorage<S, kMaxThreads>& sh) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int wid = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  warp_allreduce(st);
  if (lane == 0) sh.part()[wid] = st;
  __syncthreads();
  if (wid == 0) {
    S w;
    if (lane < nwarps) w = sh.part()[lane];
    warp_allreduce(w);
    if (lane == 0) *sh.total() = w;
  }
  // The partials were read by warp 0 before this barrier, so the next call may overwrite them; the
  // total is rewritten only after the next call's first barrier, which every thread reaches after
  // reading it below.
  __syncthreads();
  st = *sh.total();
}

// Column reduction of a (TX, TY) block, TX * TY <= kThreads: thread (tx, ty) holds a partial of
// item tx; every thread of column tx ends with the merged state of its column. Same barrier
// discipline as block_allreduce.
template <typename S, int kThreads>
struct ColumnReduceStorage {
  alignas(alignof(S)) unsigned char part_bytes[sizeof(S) * kThreads];
  alignas(alignof(S)) unsigned char total_bytes[sizeof(S) * kThreads];
  __device__ __forceinline__ S* part() { return reinterpret_cast<S*>(part_bytes); }
  __device__ __forceinline__ S* total() { return reinterpret_cast<S*>(total_bytes); }
};

template <typename S, int kThreads>
__device__ __forceinline__ void column_allreduce(S& st, ColumnReduceStorage<S, kThreads>& sh) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  sh.part()[ty * TX + tx] = st;
  __syncthreads();
  if (ty == 0) {
    S tot;
    for (int k = 0; k < TY; ++k) tot.merge(sh.part()[k * TX + tx]);
    sh.total()[tx] = tot;
  }
  __syncthreads();
  st = sh.total()[tx];
}

// Plain sums as a reduction state.
template <typename T>
struct SumState {
  T v;
  __device__ __forceinline__ SumState() : v(T(0)) {}
  __device__ __forceinline__ explicit SumState(T x) : v(x) {}
  __device__ __forceinline__ void merge(const SumState& o) { v += o.v; }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  SumState<T> s(v);
  warp_allreduce(s);
  return s.v;
}

template <typename T, int kMaxThreads>
__device__ __forceinline__ T block_sum(T v, BlockReduceStorage<SumState<T>, kMaxThreads>& sh) {
  SumState<T> s(v);
  block_allreduce(s, sh);
  return s.v;
}

// ------------------------------------------------------------------------------------------------
// Host-side launch helpers.

// Streaming multiprocessors of a device (cached per device).
inline int sm_count(c10::DeviceIndex device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

// The accumulation dtype of a floating input: float64 for float64, else float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The (N, C, D) tensor every per-row op takes: CUDA, 3-D, a floating dtype the kernels support.
inline void check_ncd_input(const at::Tensor& input, const char* op, const char* name = "input") {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA ", name, ", got ", input.device());
  TORCH_CHECK(input.dim() == 3, op, ": expected ", name, " of shape (N, C, D), got ",
              input.sizes());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": ", name, " must be float32, float16, bfloat16 or float64, got ", st);
}

// A 1-D launch shape checked against CUDA's limits (an assert on our own arithmetic, not on input).
inline dim3 grid_1d(int64_t blocks) {
  TORCH_INTERNAL_ASSERT(blocks >= 1 && blocks <= kMaxGridX, "fusedloss: grid of ", blocks,
                        " blocks is outside CUDA's limits");
  return dim3(static_cast<unsigned>(blocks));
}

}  // namespace cuda
}  // namespace fusedloss
