// CUDA kernels for the cross-entropy ops (schemas in csrc/registration.cpp, contract in
// docs/KERNELS.md). All per-row math comes from csrc/include/fusedloss/cross_entropy.h, the same
// functions the CPU kernel runs, so the CPU tests cover the formulas used here.
//
// input (N, C, D) with any strides; a row is one (n, d) position, r = n * D + d.
//
// Kernels (one launch per call, nothing launched for an empty batch):
//   ce_warp_kernel    class dim contiguous, small C: one warp per row, 8 rows per block.
//   ce_block_kernel   class dim contiguous, large C: one block (128..512 threads) per row.
//   ce_strided_kernel class dim strided (segmentation (N, C, H*W), transposed (N, C)) or tiny C:
//                     threadIdx.x walks adjacent rows (coalesced when rows are adjacent in memory),
//                     threadIdx.y splits the classes of a row; partials are merged in shared memory.
// Each does two passes over its row(s):
//   pass 1: online max / sum of exp (ce::OnlineLSE) per thread, plus the sums label smoothing and
//           probability targets need; merged with warp shuffles (+ shared memory across warps).
//           The target logit x[y] is read here, before any thread writes the (in-place) gradient.
//   pass 2: the row is read again (from L2 for large rows) and the gradient written.
// On the contiguous path rows are read with 16-byte vector loads: a per-row scalar head up to the
// first 16-byte boundary, the aligned body in vectors, a scalar tail, so odd vocabularies (50257)
// and row offsets stay vectorised. The gradient (and a probability target) use vector accesses when
// their class stride is 1 and they have the input row's alignment, scalar accesses otherwise.
//
// Target values are checked on the device: y == ignore_index -> ignored row; otherwise y outside
// [0, C) fails CUDA_KERNEL_ASSERT, and x[y] / weight[y] are never read for such a y (where device
// asserts are compiled out the row gives NaN). grad_scale is read on the device (no host sync).
// Offsets are 64-bit throughout.

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fusedloss/cross_entropy.h"

namespace fusedloss {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpKernelThreads = 256;     // 8 rows (warps) per block
constexpr int kStridedKernelThreads = 256;  // TX rows x TY class slices
constexpr int kBlockKernelMaxThreads = 512;
constexpr int kScaleThreads = 256;

// ------------------------------------------------------------------------------------------------
// Small device helpers.

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// Number of leading elements before ptr reaches a 16-byte boundary (at most n).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_elems(const scalar_t* ptr, int64_t n) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr) & 15u);
  const int64_t head = ((16 - mis) & 15) / static_cast<int64_t>(sizeof(scalar_t));
  return head < n ? head : n;
}

template <typename A, typename B>
__device__ __forceinline__ bool same_alignment(const A* a, const B* b) {
  return (reinterpret_cast<uintptr_t>(a) & 15u) == (reinterpret_cast<uintptr_t>(b) & 15u);
}

template <typename acc_t>
__device__ __forceinline__ acc_t softcap_of(acc_t x, acc_t softcap) {
  return ce::softcap_fwd(x, softcap);
}

// Fold VEC values into an online logsumexp state with one rescale: VEC + 1 exps.
template <typename acc_t, int VEC>
__device__ __forceinline__ void lse_update_chunk(ce::OnlineLSE<acc_t>& st, const acc_t (&xs)[VEC]) {
  acc_t cm = xs[0];
#pragma unroll
  for (int i = 1; i < VEC; ++i) cm = nan_max(cm, xs[i]);
  const acc_t m_new = nan_max(st.m, cm);
  if (m_new == -INFINITY) return;  // everything so far is -inf: keep s = 0
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum += fl_exp(xs[i] - m_new);
  st.s = st.s * fl_exp(st.m - m_new) + sum;
  st.m = m_new;
}

// Per-thread partial state of pass 1: the online lse and, with v_c = w_c t'_c (probability
// targets) or w_c (label smoothing; 1 without weight), omega = sum_c v_c and
// a = sum_c v_c (lse.m - xs_c): non-negative terms, see ce::dev_rebase.
template <typename acc_t>
struct RowState {
  ce::OnlineLSE<acc_t> lse;
  acc_t omega;
  acc_t a;
  __device__ __forceinline__ RowState() : lse(), omega(acc_t(0)), a(acc_t(0)) {}
  // After lse moved from the max m_old to lse.m.
  __device__ __forceinline__ void rebase(acc_t m_old) {
    a = ce::dev_rebase(a, omega, m_old, lse.m);
  }
  __device__ __forceinline__ void merge(acc_t m2, acc_t s2, acc_t omega2, acc_t a2) {
    const acc_t m1 = lse.m;
    lse.merge(m2, s2);
    a = ce::dev_rebase(a, omega, m1, lse.m) + ce::dev_rebase(a2, omega2, m2, lse.m);
    omega += omega2;
  }
};

// Butterfly all-reduce over the 32 lanes of a warp. Every lane ends with the same state (the
// merge is symmetric: nan_max and + commute, and both sides are rebased to the common max).
template <typename acc_t>
__device__ __forceinline__ void warp_allreduce(RowState<acc_t>& st) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, st.lse.m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, st.lse.s, off);
    const acc_t o2 = __shfl_xor_sync(0xffffffffu, st.omega, off);
    const acc_t a2 = __shfl_xor_sync(0xffffffffu, st.a, off);
    st.merge(m2, s2, o2, a2);
  }
}

template <typename acc_t>
struct BlockReduceShared {
  acc_t m[kBlockKernelMaxThreads / kWarpSize];
  acc_t s[kBlockKernelMaxThreads / kWarpSize];
  acc_t o[kBlockKernelMaxThreads / kWarpSize];
  acc_t a[kBlockKernelMaxThreads / kWarpSize];
  acc_t fm, fs, fo, fa;
};

// All-reduce over the block (blockDim.x a multiple of 32, at most 512). Two barriers; safe to
// call once per row in a loop over rows (see the comments on the shared slots).
template <typename acc_t>
__device__ __forceinline__ void block_allreduce(RowState<acc_t>& st, BlockReduceShared<acc_t>& sh) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int wid = threadIdx.x / kWarpSize;
  const int nwarps = blockDim.x / kWarpSize;
  warp_allreduce(st);
  if (lane == 0) {
    sh.m[wid] = st.lse.m;
    sh.s[wid] = st.lse.s;
    sh.o[wid] = st.omega;
    sh.a[wid] = st.a;
  }
  __syncthreads();  // partials visible; also orders every pass-1 read before any pass-2 write
  if (wid == 0) {
    RowState<acc_t> w;
    if (lane < nwarps) {
      w.lse.m = sh.m[lane];
      w.lse.s = sh.s[lane];
      w.omega = sh.o[lane];
      w.a = sh.a[lane];
    }
    warp_allreduce(w);
    if (lane == 0) {
      sh.fm = w.lse.m;
      sh.fs = w.lse.s;
      sh.fo = w.omega;
      sh.fa = w.a;
    }
  }
  // Partials were read by warp 0 before this barrier, so the next row may overwrite them; the
  // final slot is rewritten only after the next row's first barrier, which every thread reaches
  // after reading it below.
  __syncthreads();
  st.lse.m = sh.fm;
  st.lse.s = sh.fs;
  st.omega = sh.fo;
  st.a = sh.fa;
}

// ------------------------------------------------------------------------------------------------
// Kernel arguments and the per-row pieces shared by all three CE kernels.

template <typename scalar_t, typename acc_t>
struct CEParams {
  const scalar_t* x;  // input (N, C, D); not const-restrict: the in-place path writes it via g
  int64_t xN, xC, xD;
  const int64_t* y;  // class-index targets (N, D), or null
  int64_t yN, yD;
  const scalar_t* t;  // probability targets (N, C, D), or null
  int64_t tN, tC, tD;
  const acc_t* w;           // class weights (C,), or null
  const acc_t* grad_scale;  // 0-d, or null (= 1)
  scalar_t* g;              // gradient (N, C, D), or null (no gradient)
  int64_t gN, gC, gD;
  acc_t* loss;  // (N, D) contiguous
  acc_t* lse;   // (N, D) contiguous
  int64_t C, D, rows;
  int64_t ignore_index;
  acc_t ls, z, softcap;
};

// Row-level target information (class-index mode), read in pass 1 by every thread of the row
// (the same addresses: one broadcast transaction per warp).
template <typename acc_t>
struct TargetInfo {
  int64_t y;
  bool ignored;
  acc_t xs_y;  // softcapped target logit
  acc_t wy;    // weight of the target class
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ TargetInfo<acc_t> load_target(const CEParams<scalar_t, acc_t>& p,
                                                          int64_t n, int64_t d, const scalar_t* xrow,
                                                          bool leader) {
  TargetInfo<acc_t> ti;
  ti.y = p.y[n * p.yN + d * p.yD];
  ti.ignored = ti.y == p.ignore_index;
  ti.xs_y = acc_t(0);
  ti.wy = acc_t(1);
  if (!ti.ignored) {
    const bool in_range = ti.y >= 0 && ti.y < p.C;
    if (leader) {
      CUDA_KERNEL_ASSERT(ti.y >= 0 && ti.y < p.C && "cross_entropy: target out of bounds");
    }
    if (in_range) {
      ti.xs_y = softcap_of(static_cast<acc_t>(xrow[ti.y * p.xC]), p.softcap);
      ti.wy = p.w != nullptr ? p.w[ti.y] : acc_t(1);
    } else {
      // Only reached where device asserts are compiled out: never read x[y] / w[y]; NaN row.
      ti.xs_y = acc_t(NAN);
      ti.wy = acc_t(NAN);
    }
  }
  return ti;
}

// Everything pass 2 needs about a row, computed identically by every thread of the row from the
// all-reduced state.
template <typename acc_t>
struct RowCoef {
  acc_t lse;
  acc_t d;  // lse - xs_y, as (m - xs_y) + log(s): keeps its digits for large logits
  acc_t scale;
  ce::IndexRow<acc_t> ir;
  ce::ProbRow<acc_t> pr;
  acc_t loss;  // scaled row loss
};

template <bool PROB, typename acc_t>
__device__ __forceinline__ RowCoef<acc_t> row_coef(const RowState<acc_t>& st,
                                                   const TargetInfo<acc_t>& ti, bool has_w,
                                                   acc_t ls, acc_t z, int64_t C, acc_t scale) {
  RowCoef<acc_t> rc;
  rc.lse = st.lse.lse();
  const acc_t log_s = fl_log(st.lse.s);
  rc.d = acc_t(0);
  rc.scale = scale;
  if constexpr (PROB) {
    rc.pr = ce::prob_row(rc.lse, log_s, st.omega, st.a, z);
    rc.loss = rc.pr.loss * scale;
  } else {
    if (ti.ignored) {
      rc.ir = ce::IndexRow<acc_t>{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      rc.loss = acc_t(0) * scale;  // NaN for an all-ignored 'mean' (scale = inf), as torch
    } else {
      const acc_t W = has_w ? st.omega : static_cast<acc_t>(C);
      rc.d = (st.lse.m - ti.xs_y) + log_s;
      rc.ir = ce::index_row_diff(rc.lse, log_s, rc.d, ti.wy, W, st.a, ls, z,
                                 static_cast<long>(C));
      rc.loss = rc.ir.loss * scale;
    }
  }
  return rc;
}

// Pass-1 contribution of one element beyond the logsumexp, after st.lse took it in (and
// st.rebase moved a to the new max).
template <bool PROB, typename scalar_t, typename acc_t>
__device__ __forceinline__ void pass1_sums(RowState<acc_t>& st, const CEParams<scalar_t, acc_t>& p,
                                           int64_t c, acc_t xs, acc_t tv) {
  acc_t v;
  if constexpr (PROB) {
    v = ce::smoothed_prob(tv, p.ls, static_cast<long>(p.C));
    if (p.w != nullptr) v *= p.w[c];
  } else {
    v = p.w != nullptr ? p.w[c] : acc_t(1);  // only called with label smoothing
  }
  st.omega += v;
  st.a += v * ce::dev_term(st.lse.m, xs);
}

// d(scaled row loss)/d(x_c) for a non-ignored row.
template <bool PROB, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_elem(const CEParams<scalar_t, acc_t>& p,
                                           const RowCoef<acc_t>& rc, const TargetInfo<acc_t>& ti,
                                           int64_t c, acc_t xs, acc_t tv) {
  acc_t gr;
  if constexpr (PROB) {
    acc_t wt = ce::smoothed_prob(tv, p.ls, static_cast<long>(p.C));
    if (p.w != nullptr) wt *= p.w[c];
    gr = ce::prob_grad(rc.pr, xs, rc.lse, wt);
  } else {
    if (c == ti.y) {
      gr = ce::index_grad_target_diff(rc.ir, -rc.d, ti.wy);
    } else {
      // w_c only matters through the smoothing term.
      const acc_t wc = (p.w != nullptr && p.ls > acc_t(0)) ? p.w[c] : acc_t(1);
      gr = ce::index_grad(rc.ir, xs, rc.lse, wc);
    }
  }
  return gr * ce::softcap_grad(xs, p.softcap) * rc.scale;
}

// ------------------------------------------------------------------------------------------------
// Contiguous class dim: one row per warp (BLOCK = false) or per block (BLOCK = true).

template <bool PROB, bool BLOCK, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void contiguous_row(const CEParams<scalar_t, acc_t>& p, int64_t r,
                                               int tid, int nt, acc_t scale,
                                               BlockReduceShared<acc_t>* sh) {
  using Vec = AlignedVec<scalar_t, VEC>;
  const int64_t C = p.C;
  const int64_t n = r / p.D;
  const int64_t d = r - n * p.D;
  const scalar_t* xrow = p.x + n * p.xN + d * p.xD;
  const int64_t head = head_elems(xrow, C);
  const int64_t nvec = (C - head) / VEC;
  const int64_t tail = head + nvec * VEC;

  const scalar_t* trow = nullptr;
  bool t_vec = false;
  if constexpr (PROB) {
    trow = p.t + n * p.tN + d * p.tD;
    t_vec = p.tC == 1 && same_alignment(trow, xrow);
  }
  auto load_t = [&](int64_t c) -> acc_t {
    if constexpr (PROB) {
      return static_cast<acc_t>(trow[c * p.tC]);
    } else {
      return acc_t(0);
    }
  };
  auto load_t_vec = [&](int64_t c0, acc_t (&tv)[VEC]) {
    if constexpr (PROB) {
      if (t_vec) {
        const Vec v = *reinterpret_cast<const Vec*>(trow + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) tv[i] = static_cast<acc_t>(v.val[i]);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) tv[i] = static_cast<acc_t>(trow[(c0 + i) * p.tC]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) tv[i] = acc_t(0);
    }
  };

  TargetInfo<acc_t> ti{};
  if constexpr (!PROB) ti = load_target(p, n, d, xrow, tid == 0);

  // ---- pass 1
  const bool need_sums = PROB || p.ls > acc_t(0);
  RowState<acc_t> st;
  if (tid < head) {
    const acc_t xs = softcap_of(static_cast<acc_t>(xrow[tid]), p.softcap);
    st.lse.update(xs);  // the first update: nothing to rebase
    if (need_sums) pass1_sums<PROB>(st, p, tid, xs, load_t(tid));
  }
  for (int64_t v = tid; v < nvec; v += nt) {
    const int64_t c0 = head + v * VEC;
    const Vec xv = *reinterpret_cast<const Vec*>(xrow + c0);
    acc_t xs[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) xs[i] = softcap_of(static_cast<acc_t>(xv.val[i]), p.softcap);
    const acc_t m_old = st.lse.m;
    lse_update_chunk(st.lse, xs);
    if (need_sums) {
      st.rebase(m_old);
      acc_t tv[VEC];
      load_t_vec(c0, tv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) pass1_sums<PROB>(st, p, c0 + i, xs[i], tv[i]);
    }
  }
  for (int64_t c = tail + tid; c < C; c += nt) {
    const acc_t xs = softcap_of(static_cast<acc_t>(xrow[c]), p.softcap);
    const acc_t m_old = st.lse.m;
    st.lse.update(xs);
    if (need_sums) {
      st.rebase(m_old);
      pass1_sums<PROB>(st, p, c, xs, load_t(c));
    }
  }

  if constexpr (BLOCK) {
    block_allreduce(st, *sh);  // its barriers order pass-1 reads before pass-2 writes
  } else {
    warp_allreduce(st);
    __syncwarp();  // memory ordering: every lane's pass-1 reads (x[y]) before any pass-2 write
  }

  const RowCoef<acc_t> rc = row_coef<PROB>(st, ti, p.w != nullptr, p.ls, p.z, C, scale);
  if (tid == 0) {
    p.loss[r] = rc.loss;
    p.lse[r] = rc.lse;
  }
  if (p.g == nullptr) return;

  // ---- pass 2
  scalar_t* grow = p.g + n * p.gN + d * p.gD;
  const bool g_vec = p.gC == 1 && same_alignment(grow, xrow);
  bool zero = false;
  if constexpr (!PROB) zero = ti.ignored;

  if (tid < head) {
    const int64_t c = tid;
    acc_t gr = acc_t(0);
    if (!zero) {
      const acc_t xs = softcap_of(static_cast<acc_t>(xrow[c]), p.softcap);
      gr = grad_elem<PROB>(p, rc, ti, c, xs, load_t(c));
    }
    grow[c * p.gC] = static_cast<scalar_t>(gr);
  }
  for (int64_t v = tid; v < nvec; v += nt) {
    const int64_t c0 = head + v * VEC;
    acc_t gr[VEC];
    if (zero) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) gr[i] = acc_t(0);
    } else {
      const Vec xv = *reinterpret_cast<const Vec*>(xrow + c0);
      acc_t tv[VEC];
      load_t_vec(c0, tv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t xs = softcap_of(static_cast<acc_t>(xv.val[i]), p.softcap);
        gr[i] = grad_elem<PROB>(p, rc, ti, c0 + i, xs, tv[i]);
      }
    }
    if (g_vec) {
      Vec out;
#pragma unroll
      for (int i = 0; i < VEC; ++i) out.val[i] = static_cast<scalar_t>(gr[i]);
      *reinterpret_cast<Vec*>(grow + c0) = out;
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) grow[(c0 + i) * p.gC] = static_cast<scalar_t>(gr[i]);
    }
  }
  for (int64_t c = tail + tid; c < C; c += nt) {
    acc_t gr = acc_t(0);
    if (!zero) {
      const acc_t xs = softcap_of(static_cast<acc_t>(xrow[c]), p.softcap);
      gr = grad_elem<PROB>(p, rc, ti, c, xs, load_t(c));
    }
    grow[c * p.gC] = static_cast<scalar_t>(gr);
  }
}

template <typename scalar_t, typename acc_t, bool PROB, int VEC>
__global__ void __launch_bounds__(kWarpKernelThreads, 4)
    ce_warp_kernel(const CEParams<scalar_t, acc_t> p) {
  const acc_t scale = p.grad_scale != nullptr ? *p.grad_scale : acc_t(1);
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps_per_block;
  // Warp-uniform loop: every lane of a warp works on the same row.
  for (int64_t r = first; r < p.rows; r += step) {
    contiguous_row<PROB, false, VEC>(p, r, lane, kWarpSize, scale,
                                     static_cast<BlockReduceShared<acc_t>*>(nullptr));
  }
}

template <typename scalar_t, typename acc_t, bool PROB, int VEC>
__global__ void __launch_bounds__(kBlockKernelMaxThreads)
    ce_block_kernel(const CEParams<scalar_t, acc_t> p) {
  __shared__ BlockReduceShared<acc_t> sh;
  const acc_t scale = p.grad_scale != nullptr ? *p.grad_scale : acc_t(1);
  // Block-uniform loop over rows.
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    contiguous_row<PROB, true, VEC>(p, r, threadIdx.x, blockDim.x, scale, &sh);
  }
}

// ------------------------------------------------------------------------------------------------
// Strided class dim (or tiny C): block (TX, TY), TX * TY = 256. Thread (tx, ty) owns row
// tile * TX + tx and the classes ty, ty + TY, ...

template <typename acc_t>
struct StridedShared {
  acc_t m[kStridedKernelThreads];
  acc_t s[kStridedKernelThreads];
  acc_t o[kStridedKernelThreads];
  acc_t a[kStridedKernelThreads];
};

template <typename scalar_t, typename acc_t, bool PROB>
__global__ void __launch_bounds__(kStridedKernelThreads)
    ce_strided_kernel(const CEParams<scalar_t, acc_t> p) {
  __shared__ StridedShared<acc_t> part;   // per-thread partials, index ty * TX + tx
  __shared__ StridedShared<acc_t> total;  // per-row totals, index tx
  const acc_t scale = p.grad_scale != nullptr ? *p.grad_scale : acc_t(1);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t C = p.C;

  for (int64_t tile = blockIdx.x; tile * TX < p.rows; tile += gridDim.x) {  // block-uniform
    const int64_t r = tile * TX + tx;
    const bool active = r < p.rows;
    int64_t n = 0, d = 0;
    const scalar_t* xrow = p.x;
    const scalar_t* trow = nullptr;
    TargetInfo<acc_t> ti{};
    RowState<acc_t> st;
    if (active) {
      n = r / p.D;
      d = r - n * p.D;
      xrow = p.x + n * p.xN + d * p.xD;
      if constexpr (PROB) {
        trow = p.t + n * p.tN + d * p.tD;
      } else {
        ti = load_target(p, n, d, xrow, ty == 0);
      }
      const bool need_sums = PROB || p.ls > acc_t(0);
      for (int64_t c = ty; c < C; c += TY) {
        const acc_t xs = softcap_of(static_cast<acc_t>(xrow[c * p.xC]), p.softcap);
        const acc_t m_old = st.lse.m;
        st.lse.update(xs);
        if (need_sums) {
          st.rebase(m_old);
          acc_t tv = acc_t(0);
          if constexpr (PROB) tv = static_cast<acc_t>(trow[c * p.tC]);
          pass1_sums<PROB>(st, p, c, xs, tv);
        }
      }
    }
    const int idx = ty * TX + tx;
    part.m[idx] = st.lse.m;
    part.s[idx] = st.lse.s;
    part.o[idx] = st.omega;
    part.a[idx] = st.a;
    __syncthreads();  // also orders every pass-1 read (x[y]) before any pass-2 write
    if (ty == 0) {
      RowState<acc_t> tot;
      for (int k = 0; k < TY; ++k) {
        const int j = k * TX + tx;
        tot.merge(part.m[j], part.s[j], part.o[j], part.a[j]);
      }
      total.m[tx] = tot.lse.m;
      total.s[tx] = tot.lse.s;
      total.o[tx] = tot.omega;
      total.a[tx] = tot.a;
    }
    // Partials are reused by the next tile only after this barrier; totals are rewritten only
    // after the next tile's first barrier, which every thread reaches after reading them below.
    __syncthreads();
    if (!active) continue;
    st.lse.m = total.m[tx];
    st.lse.s = total.s[tx];
    st.omega = total.o[tx];
    st.a = total.a[tx];
    const RowCoef<acc_t> rc = row_coef<PROB>(st, ti, p.w != nullptr, p.ls, p.z, C, scale);
    if (ty == 0) {
      p.loss[r] = rc.loss;
      p.lse[r] = rc.lse;
    }
    if (p.g == nullptr) continue;
    scalar_t* grow = p.g + n * p.gN + d * p.gD;
    bool zero = false;
    if constexpr (!PROB) zero = ti.ignored;
    for (int64_t c = ty; c < C; c += TY) {
      acc_t gr = acc_t(0);
      if (!zero) {
        const acc_t xs = softcap_of(static_cast<acc_t>(xrow[c * p.xC]), p.softcap);
        acc_t tv = acc_t(0);
        if constexpr (PROB) tv = static_cast<acc_t>(trow[c * p.tC]);
        gr = grad_elem<PROB>(p, rc, ti, c, xs, tv);
      }
      grow[c * p.gC] = static_cast<scalar_t>(gr);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// scale_grad_ kernels. With a scalar upstream gradient every block reads it first and returns
// when it is 1, before touching grad.

// g == 0 stays 0: a NaN / inf upstream gradient must not reach ignored rows (torch gives 0).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t scale_keep_zero(scalar_t g, acc_t s) {
  const acc_t v = static_cast<acc_t>(g);
  return static_cast<scalar_t>(v == acc_t(0) ? acc_t(0) : v * s);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kScaleThreads)
    scale_flat_kernel(scalar_t* g, int64_t numel, const acc_t* sp) {
  using Vec = AlignedVec<scalar_t, VEC>;
  const acc_t s = *sp;
  if (s == acc_t(1)) return;
  const int64_t head = head_elems(g, numel);
  const int64_t nvec = (numel - head) / VEC;
  const int64_t tail = head + nvec * VEC;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nt = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (tid < head) g[tid] = scale_keep_zero<scalar_t>(g[tid], s);
  for (int64_t v = tid; v < nvec; v += nt) {
    Vec* ptr = reinterpret_cast<Vec*>(g + head + v * VEC);
    Vec val = *ptr;
#pragma unroll
    for (int i = 0; i < VEC; ++i) val.val[i] = scale_keep_zero<scalar_t>(val.val[i], s);
    *ptr = val;
  }
  for (int64_t i = tail + tid; i < numel; i += nt) {
    g[i] = scale_keep_zero<scalar_t>(g[i], s);
  }
}

// grad (N, C, D) with any strides, walked in logical order (d fastest). SCALAR: one factor *gl;
// else grad[n, c, d] *= gl[n * lN + d * lD].
template <typename scalar_t, typename acc_t, bool SCALAR, typename index_t>
__global__ void __launch_bounds__(kScaleThreads)
    scale_strided_kernel(scalar_t* g, index_t numel, index_t CD, index_t D, int64_t gN, int64_t gC,
                         int64_t gD, const acc_t* gl, int64_t lN, int64_t lD) {
  acc_t s = acc_t(1);
  if constexpr (SCALAR) {
    s = *gl;
    if (s == acc_t(1)) return;
  }
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    const index_t n = i / CD;
    const index_t rem = i - n * CD;
    index_t c = rem, d = 0;
    if (D != 1) {
      c = rem / D;
      d = rem - c * D;
    }
    acc_t f = s;
    if constexpr (!SCALAR) f = gl[static_cast<int64_t>(n) * lN + static_cast<int64_t>(d) * lD];
    scalar_t* ptr = g + static_cast<int64_t>(n) * gN + static_cast<int64_t>(c) * gC +
                    static_cast<int64_t>(d) * gD;
    *ptr = scale_keep_zero<scalar_t>(*ptr, f);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

int64_t prev_pow2(int64_t v) {
  int64_t p = 1;
  while (p * 2 <= v) p <<= 1;
  return p;
}

int sm_count(c10::DeviceIndex device) {
  static int cache[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

struct GradOut {
  void* ptr;  // null: no gradient
  int64_t sN, sC, sD;
};

void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected a CUDA input, got ", input.device());
  TORCH_CHECK(input.dim() == 3, op, ": expected input of shape (N, C, D), got ", input.sizes());
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": input must be float32, float16, bfloat16 or float64, got ", st);
}

// Launches the cross-entropy kernel for `input` with the gradient going to `gout`.
void launch_cross_entropy(const char* op, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight_opt,
                          const std::optional<at::Tensor>& grad_scale_opt, int64_t ignore_index,
                          double label_smoothing, double z_loss, double softcap,
                          const GradOut& gout, const at::Tensor& loss, const at::Tensor& lse) {
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const at::ScalarType acc = acc_dtype(input.scalar_type());
  const bool prob = at::isFloatingType(target.scalar_type());
  if (prob) {
    TORCH_CHECK(target.sizes() == input.sizes(), op,
                ": a probability target must have the input's shape ", input.sizes(), ", got ",
                target.sizes());
    TORCH_CHECK(target.scalar_type() == input.scalar_type(), op,
                ": a probability target must have the input's dtype ", input.scalar_type(),
                ", got ", target.scalar_type());
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong, op,
                ": class-index targets must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == N && target.size(1) == D, op,
                ": class-index target must have shape (N, D) = (", N, ", ", D, "), got ",
                target.sizes());
  }
  TORCH_CHECK(target.device() == input.device(), op, ": target is on ", target.device(),
              ", input on ", input.device());
  at::Tensor weight;
  if (weight_opt.has_value() && weight_opt->defined()) {
    weight = *weight_opt;
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, op, ": weight must have shape (C,) = (",
                C, ",), got ", weight.sizes());
    TORCH_CHECK(weight.scalar_type() == acc, op, ": weight must be ", acc, ", got ",
                weight.scalar_type());
    TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(),
                ", input on ", input.device());
    weight = weight.contiguous();
  }
  at::Tensor grad_scale;
  if (grad_scale_opt.has_value() && grad_scale_opt->defined()) {
    grad_scale = *grad_scale_opt;
    TORCH_CHECK(grad_scale.numel() == 1, op, ": grad_scale must hold one value, got shape ",
                grad_scale.sizes());
    TORCH_CHECK(grad_scale.device() == input.device(), op, ": grad_scale is on ",
                grad_scale.device(), ", input on ", input.device(),
                " (it is read on the device; no host sync)");
    if (grad_scale.scalar_type() != acc) grad_scale = grad_scale.to(acc);  // a device op
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0, op, ": z_loss must be >= 0, got ", z_loss);

  const int64_t rows = N * D;
  if (rows == 0) return;  // empty batch: launch nothing

  // Strides that cannot matter are normalised so the fast-path tests see through them.
  int64_t xN = input.stride(0), xC = input.stride(1), xD = input.stride(2);
  if (C == 1) xC = 1;
  if (D == 1) xD = 0;
  GradOut g = gout;
  if (g.ptr != nullptr) {
    if (C == 1) g.sC = 1;
    if (D == 1) g.sD = 0;
  }

  c10::cuda::CUDAGuard guard(input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.get_device());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedloss_cross_entropy_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int VEC = 16 / sizeof(scalar_t);
        CEParams<scalar_t, acc_t> p;
        p.x = input.const_data_ptr<scalar_t>();
        p.xN = xN;
        p.xC = xC;
        p.xD = xD;
        p.y = nullptr;
        p.yN = p.yD = 0;
        p.t = nullptr;
        p.tN = p.tC = p.tD = 0;
        if (prob) {
          p.t = target.const_data_ptr<scalar_t>();
          p.tN = target.stride(0);
          p.tC = C == 1 ? 1 : target.stride(1);
          p.tD = D == 1 ? 0 : target.stride(2);
        } else {
          p.y = target.const_data_ptr<int64_t>();
          p.yN = target.stride(0);
          p.yD = D == 1 ? 0 : target.stride(1);
        }
        p.w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
        p.grad_scale = grad_scale.defined() ? grad_scale.const_data_ptr<acc_t>() : nullptr;
        p.g = static_cast<scalar_t*>(g.ptr);
        p.gN = g.sN;
        p.gC = g.sC;
        p.gD = g.sD;
        p.loss = loss.mutable_data_ptr<acc_t>();
        p.lse = lse.mutable_data_ptr<acc_t>();
        p.C = C;
        p.D = D;
        p.rows = rows;
        p.ignore_index = ignore_index;
        p.ls = static_cast<acc_t>(label_smoothing);
        p.z = static_cast<acc_t>(z_loss);
        p.softcap = softcap > 0.0 ? static_cast<acc_t>(softcap) : acc_t(0);

        // Contiguous class dim -> a warp or a block per row. A gradient with strided classes
        // (channels-last input, new contiguous grad) and small C goes to the strided kernel,
        // whose stores are coalesced across rows and whose row reads stay in L1.
        const bool contiguous =
            xC == 1 && C >= kWarpSize && (p.g == nullptr || p.gC == 1 || C > 256);
        if (contiguous) {
          const int64_t nvec = ceil_div(C, VEC);
          if (nvec <= 8 * kWarpSize) {
            const int64_t rows_per_block = kWarpKernelThreads / kWarpSize;
            const int64_t grid = std::min(ceil_div(rows, rows_per_block), kMaxGrid);
            if (prob) {
              ce_warp_kernel<scalar_t, acc_t, true, VEC>
                  <<<static_cast<unsigned>(grid), kWarpKernelThreads, 0, stream>>>(p);
            } else {
              ce_warp_kernel<scalar_t, acc_t, false, VEC>
                  <<<static_cast<unsigned>(grid), kWarpKernelThreads, 0, stream>>>(p);
            }
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          } else {
            // ~8 vectors per thread, 128..512 threads.
            const int64_t threads =
                std::min<int64_t>(kBlockKernelMaxThreads,
                                  std::max<int64_t>(128, next_pow2(ceil_div(nvec, 8))));
            const int64_t grid = std::min(rows, kMaxGrid);
            if (prob) {
              ce_block_kernel<scalar_t, acc_t, true, VEC><<<static_cast<unsigned>(grid), static_cast<unsigned>(threads), 0, stream>>>(p);
            } else {
              ce_block_kernel<scalar_t, acc_t, false, VEC><<<static_cast<unsigned>(grid), static_cast<unsigned>(threads), 0, stream>>>(p);
            }
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        } else {
          // More class slices per row for many classes, and more still when rows are few.
          const int64_t max_ty = rows <= 8192 ? 16 : 8;
          const int64_t ty = std::min<int64_t>(max_ty, prev_pow2(std::max<int64_t>(1, C / 16)));
          const int64_t tx = kStridedKernelThreads / ty;
          const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
          const int64_t grid = std::min(ceil_div(rows, tx), kMaxGrid);
          if (prob) {
            ce_strided_kernel<scalar_t, acc_t, true><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
          } else {
            ce_strided_kernel<scalar_t, acc_t, false><<<static_cast<unsigned>(grid), block, 0, stream>>>(p);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap, bool compute_grad) {
  const char* op = "fusedloss_C::cross_entropy_fwd";
  check_input(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), C = input.size(1), D = input.size(2);
  const auto acc_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({N, D}, acc_opts);
  at::Tensor lse = at::empty({N, D}, acc_opts);
  at::Tensor grad = compute_grad ? at::empty({N, C, D}, input.options())
                                 : at::empty({0}, input.options());
  GradOut gout{nullptr, 0, 0, 0};
  if (compute_grad) gout = GradOut{grad.data_ptr(), C * D, D, 1};
  launch_cross_entropy(op, input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                       softcap, gout, loss, lse);
  return std::make_tuple(loss, lse, grad);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_inplace_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing,
    double z_loss, double softcap) {
  const char* op = "fusedloss_C::cross_entropy_fwd_inplace";
  check_input(input, op);
  TORCH_CHECK(at::has_internal_overlap(input) != at::MemOverlap::Yes, op,
              ": input has overlapping memory (an expanded tensor); the in-place gradient needs "
              "one element per position");
  c10::cuda::CUDAGuard guard(input.device());
  const int64_t N = input.size(0), D = input.size(2);
  const auto acc_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor loss = at::empty({N, D}, acc_opts);
  at::Tensor lse = at::empty({N, D}, acc_opts);
  const GradOut gout{input.numel() > 0 ? input.data_ptr() : nullptr, input.stride(0),
                     input.stride(1), input.stride(2)};
  launch_cross_entropy(op, input, target, weight, grad_scale, ignore_index, label_smoothing, z_loss,
                       softcap, gout, loss, lse);
  return std::make_tuple(loss, lse);
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& grad_loss) {
  const char* op = "fusedloss_C::scale_grad_";
  check_input(grad, op);
  TORCH_CHECK(grad_loss.device() == grad.device(), op, ": grad_loss is on ", grad_loss.device(),
              ", grad on ", grad.device(), " (the scalar is read on the device; no host sync)");
  TORCH_CHECK(grad_loss.scalar_type() == at::kFloat || grad_loss.scalar_type() == at::kDouble, op,
              ": grad_loss must be float32 or float64, got ", grad_loss.scalar_type());
  const int64_t N = grad.size(0), C = grad.size(1), D = grad.size(2);
  bool all_zero_strides = true;
  for (int64_t i = 0; i < grad_loss.dim(); ++i) all_zero_strides &= grad_loss.stride(i) == 0;
  const bool scalar = grad_loss.numel() == 1 || (grad_loss.numel() > 0 && all_zero_strides);
  if (!scalar) {
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == N && grad_loss.size(1) == D, op,
                ": grad_loss must have shape (N, D) = (", N, ", ", D, ") or be a scalar, got ",
                grad_loss.sizes());
  }
  if (grad.numel() == 0) return;
  at::assert_no_internal_overlap(grad);

  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device());
  const at::ScalarType acc = acc_dtype(grad.scalar_type());
  at::Tensor gl = grad_loss;
  if (scalar) {
    gl = grad_loss.as_strided({}, {}, grad_loss.storage_offset());  // the one value, as 0-d
  }
  if (gl.scalar_type() != acc) gl = gl.to(acc);  // a device op, no sync
  const int64_t numel = grad.numel();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "fusedloss_scale_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
    const acc_t* lp = gl.const_data_ptr<acc_t>();
    const int64_t max_blocks = static_cast<int64_t>(sm_count(grad.get_device())) * 8;
    if (scalar && grad.is_non_overlapping_and_dense()) {
      // The elements fill [data_ptr, data_ptr + numel) in some order: scale them flat.
      const int64_t grid = std::max<int64_t>(
          1, std::min(ceil_div(ceil_div(numel, VEC), kScaleThreads), max_blocks));
      scale_flat_kernel<scalar_t, acc_t, VEC><<<static_cast<unsigned>(grid), kScaleThreads, 0, stream>>>(gp, numel, lp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t grid = std::max<int64_t>(1, std::min(ceil_div(numel, kScaleThreads), max_blocks));
    const int64_t lN = scalar ? 0 : gl.stride(0);
    const int64_t lD = scalar ? 0 : (D == 1 ? 0 : gl.stride(1));
    const int64_t gN = grad.stride(0), gC = grad.stride(1), gD = grad.stride(2);
    const bool small = numel < (int64_t(1) << 31);
    if (small) {
      using index_t = uint32_t;
      const index_t n = static_cast<index_t>(numel), cd = static_cast<index_t>(C * D),
                    dd = static_cast<index_t>(D);
      if (scalar) {
        scale_strided_kernel<scalar_t, acc_t, true, index_t>
            <<<static_cast<unsigned>(grid), kScaleThreads, 0, stream>>>(gp, n, cd, dd, gN, gC, gD, lp, lN, lD);
      } else {
        scale_strided_kernel<scalar_t, acc_t, false, index_t>
            <<<static_cast<unsigned>(grid), kScaleThreads, 0, stream>>>(gp, n, cd, dd, gN, gC, gD, lp, lN, lD);
      }
    } else {
      using index_t = uint64_t;
      const index_t n = static_cast<index_t>(numel), cd = static_cast<index_t>(C * D),
                    dd = static_cast<index_t>(D);
      if (scalar) {
        scale_strided_kernel<scalar_t, acc_t, true, index_t>
            <<<static_cast<unsigned>(grid), kScaleThreads, 0, stream>>>(gp, n, cd, dd, gN, gC, gD, lp, lN, lD);
      } else {
        scale_strided_kernel<scalar_t, acc_t, false, index_t>
            <<<static_cast<unsigned>(grid), kScaleThreads, 0, stream>>>(gp, n, cd, dd, gN, gC, gD, lp, lN, lD);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The 'mean' factor (registration.cpp), as device ops: no host sync.
at::Tensor cross_entropy_mean_scale_cuda(const at::Tensor& target,
                                         const std::optional<at::Tensor>& weight,
                                         int64_t ignore_index, at::ScalarType dtype) {
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy_mean_scale: target must be int64");
  const at::Tensor y = target.reshape({-1});
  const at::Tensor valid = y.ne(ignore_index);
  if (!weight.has_value() || !weight->defined()) return valid.sum(dtype).reciprocal();
  const int64_t C = weight->numel();
  // Out-of-range targets add nothing (the loss kernel traps on them); clamped only to gather.
  const at::Tensor in_range = valid.logical_and(y.ge(0)).logical_and(y.lt(C));
  const at::Tensor wy = weight->to(dtype).index_select(0, y.clamp(0, std::max<int64_t>(C - 1, 0)));
  // masked_fill, not a multiply by the mask: an inf weight times 0 would be NaN
  return wy.masked_fill(in_range.logical_not(), 0).sum(dtype).reciprocal();
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss_C, CUDA, m) {
  m.impl("cross_entropy_fwd", &fusedloss::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_fwd_inplace", &fusedloss::cross_entropy_fwd_inplace_cuda);
  m.impl("scale_grad_", &fusedloss::scale_grad_cuda);
  m.impl("cross_entropy_mean_scale", &fusedloss::cross_entropy_mean_scale_cuda);
}
