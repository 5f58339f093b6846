// The softmax-row skeleton: kernels that take a loss's math as a policy.
//
// Input (N, C, D) with any strides; a row is one (n, d) position, r = n * D + d, and holds C logits
// x[n, c, d]. For every row the skeleton
//   pass 1: reads the row once, keeping the online logsumexp state (m, s) of the policy's logits
//           xs_c = pol.logit(x_c) and the policy's own pass-1 sums (P::Extra), per thread, then
//           all-reduces the state over the threads of the row;
//   epilogue: pol.epilogue(row, lse state, sums) -> per-row coefficients (every thread of the row
//           computes them from the same state); the row's first thread calls pol.store_row;
//   pass 2 (when a gradient is requested): reads the row again and stores
//           g[n, c, d] = pol.grad(coef, row, c, xs_c, aux_c), or 0 where pol.zero_grad says so.
// An optional second operand `aux` of the input's shape and dtype (e.g. probability targets) is
// read alongside x in both passes (vectorised when its class stride is 1 and its rows have the
// input's alignment).
//
// Kernels (plan_softmax_rows in index_math.h picks one):
//   softmax_rows_warp_kernel     class dim contiguous, small C: one warp per row, 8 rows per block.
//   softmax_rows_block_kernel    class dim contiguous, large C: one block (128..512) per row.
//   softmax_rows_strided_kernel  class dim strided (segmentation (N, C, H*W), transposed (N, C)) or
//                                tiny C: threadIdx.x walks adjacent rows (coalesced when rows are
//                                adjacent in memory), threadIdx.y splits a row's classes.
// On the contiguous path a row is split into a scalar head up to the first 16-byte boundary, an
// aligned body read with 128-bit loads (several independent loads in flight per thread) and a
// scalar tail, so odd vocabularies (50257) and row offsets stay vectorised; the gradient is stored
// with 128-bit stores when its class stride is 1 and its rows have the input's alignment.
// Offsets are 64-bit. Every pass-1 read of a row happens before any pass-2 write of that row (the
// all-reduce's barrier / __syncwarp), so the gradient may overwrite the input (in place).
//
// ---- The policy: what a loss writes (a struct P, passed by value to the kernels) ----
//   using scalar_t = ...;            element type of x, aux and g
//   using acc_t = ...;               float (double for float64)
//   using Extra = ...;               pass-1 sums besides (m, s); NoExtra when none. Trivially
//                                    copyable, default-constructed to zero, with
//                                      void rebase(acc_t m_old, acc_t m_new)  sums taken relative
//                                        to the max m_old moved to the new max m_new > m_old
//                                        (m_old may be -inf),
//                                      void combine(const Extra& o)  add another thread's sums,
//                                        already rebased to the same max (must be symmetric).
//   using Row = ...;                 per-row data read before pass 1 (target, its logit, weight);
//                                    default-constructible.
//   using Coef = ...;                per-row results of the epilogue, read by pass 2.
//   static constexpr bool kAux;      read the aux operand.
//   __device__ void prepare();                      once per thread at kernel start (read device
//                                                   scalars such as a grad scale; no host sync)
//   __device__ acc_t logit(acc_t x) const;          x -> xs (softcap, or the identity)
//   __device__ Row row(int64_t n, int64_t d, const scalar_t* xrow, int64_t x_class_stride,
//                      bool leader) const;          leader: the one thread of the row that may
//                                                   CUDA_KERNEL_ASSERT on a bad target
//   __device__ bool extra_sums(const Row&) const;   does pass 1 accumulate Extra for this row
//   __device__ void accumulate(Extra&, const Row&, int64_t c, acc_t xs, acc_t aux, acc_t m) const;
//                                                   one element, m the running max (>= xs)
//   __device__ Coef epilogue(const Row&, const ce::OnlineLSE<acc_t>&, const Extra&) const;
//   __device__ void store_row(int64_t r, const Coef&) const;
//   __device__ bool zero_grad(const Row&, const Coef&) const;   the row's gradient is exactly 0
//   __device__ acc_t grad(const Coef&, const Row&, int64_t c, acc_t xs, acc_t aux) const;
//                                                   d(returned loss)/d(x_c), chain rule included
//   optional: static constexpr bool kRowLoss = true and
//   __device__ acc_t row_loss(const Coef&) const;   the row's loss, for the reduced output below
// The host calls launch_softmax_rows(args, policy) under a CUDAGuard of the input's device.
//
// Reduced output (row_blocks.h; policies with kRowLoss = true and row_loss(coef) -> its loss):
// with RowsArgs::block_loss set, the kernels sum the rows' losses over the fixed blocks of rows
// that every backend uses ('mean' / 'sum' without a per-row tensor) instead of calling store_row.
// A thread block owns whole loss blocks (the grid-stride loop runs over them); inside one, each
// row goes to a fixed thread (warp, or column) that adds its rows in order, and the threads'
// sums are added in thread order: the result depends on neither the grid nor the timing.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "common.cuh"
#include "fusedloss/cross_entropy.h"  // ce::OnlineLSE
#include "fusedloss/row_blocks.h"

namespace fusedloss {
namespace cuda {

// Depth of the 128-bit load pipeline of x (and aux) per thread in the vectorised body: pass 1 (the
// row comes from DRAM) and pass 2 (it comes back from L2 for large rows).
// Half as deep when an aux operand is read alongside (as many loads in flight, fewer registers).
template <bool AUX>
constexpr int rows_unroll_pass1() { return AUX ? 2 : 4; }
template <bool AUX>
constexpr int rows_unroll_pass2() { return AUX ? 1 : 2; }

// Pass-1 sums of a policy that needs none.
struct NoExtra {
  template <typename T>
  __device__ __forceinline__ void rebase(T, T) {}
  __device__ __forceinline__ void combine(const NoExtra&) {}
};

// Per-thread pass-1 state: the online logsumexp and the policy's sums relative to its max.
template <typename acc_t, typename Extra>
struct SoftmaxState {
  ce::OnlineLSE<acc_t> lse;
  Extra ex;
  __device__ __forceinline__ SoftmaxState() : lse(), ex() {}
  // Symmetric: both sides are rebased to the common max, then added.
  __device__ __forceinline__ void merge(const SoftmaxState& o) {
    const acc_t m1 = lse.m;
    lse.merge(o.lse.m, o.lse.s);
    Extra e2 = o.ex;
    if (lse.m > m1) ex.rebase(m1, lse.m);
    if (lse.m > o.lse.m) e2.rebase(o.lse.m, lse.m);
    ex.combine(e2);
  }
};

// Without sums only (m, s) travel through the shuffles.
template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t, NoExtra> shfl_xor_state(
    const SoftmaxState<acc_t, NoExtra>& st, int off) {
  SoftmaxState<acc_t, NoExtra> o;
  o.lse.m = __shfl_xor_sync(0xffffffffu, st.lse.m, off);
  o.lse.s = __shfl_xor_sync(0xffffffffu, st.lse.s, off);
  return o;
}

// Fold N values into an online logsumexp state with one rescale: N + 1 exps.
template <int N, typename acc_t>
__device__ __forceinline__ void lse_update_chunk(ce::OnlineLSE<acc_t>& st, const acc_t* xs) {
  acc_t cm = xs[0];
#pragma unroll
  for (int i = 1; i < N; ++i) cm = nan_max(cm, xs[i]);
  const acc_t m_new = nan_max(st.m, cm);
  if (m_new == -INFINITY) return;  // everything so far is -inf: keep s = 0
  acc_t sum = acc_t(0);
#pragma unroll
  for (int i = 0; i < N; ++i) sum += fl_exp(xs[i] - m_new);
  st.s = st.s * fl_exp(st.m - m_new) + sum;
  st.m = m_new;
}

// The geometry of a launch: input, optional aux operand and gradient, with their strides.
template <typename scalar_t>
struct RowsArgs {
  const scalar_t* x;  // (N, C, D); not restrict: the in-place gradient writes it through g
  int64_t xN, xC, xD;
  const scalar_t* aux;  // (N, C, D) or null (read only when P::kAux)
  int64_t aN, aC, aD;
  scalar_t* g;  // (N, C, D) gradient, or null: no pass 2
  int64_t gN, gC, gD;
  int64_t C, D, rows;  // rows = N * D
  void* block_loss;    // acc_t (loss_blocks(N, C, D),): the reduced output (kRowLoss), or null
};

// Whether policy P has kRowLoss = true (row_loss(coef) gives a row's loss for the block sums).
template <typename P, typename = void>
struct row_loss_policy : std::false_type {};
template <typename P>
struct row_loss_policy<P, std::void_t<decltype(P::kRowLoss)>>
    : std::integral_constant<bool, P::kRowLoss> {};

// RowsArgs for an (N, C, D) input on the host: x with its strides (those that cannot matter
// normalised, C == 1 -> 1 and D == 1 -> 0, so that the fast-path tests see through them), no aux
// operand and no gradient; a policy that reads aux or writes g fills those in.
template <typename scalar_t>
RowsArgs<scalar_t> input_rows_args(const at::Tensor& input) {
  RowsArgs<scalar_t> a;
  a.C = input.size(1);
  a.D = input.size(2);
  a.rows = input.size(0) * a.D;
  a.x = input.const_data_ptr<scalar_t>();
  a.xN = input.stride(0);
  a.xC = a.C == 1 ? 1 : input.stride(1);
  a.xD = a.D == 1 ? 0 : input.stride(2);
  a.aux = nullptr;
  a.aN = a.aC = a.aD = 0;
  a.g = nullptr;
  a.gN = a.gC = a.gD = 0;
  a.block_loss = nullptr;
  return a;
}

template <typename P>
using StateOf = SoftmaxState<typename P::acc_t, typename P::Extra>;

// One row on the contiguous path (x class stride 1): a warp (BLOCK = false, tid = lane, nt = 32)
// or the whole block (BLOCK = true, tid = threadIdx.x, nt = blockDim.x) works on it.
// A row's loss for the block sums (0 for a policy without kRowLoss: never called then).
template <typename P>
__device__ __forceinline__ typename P::acc_t row_loss_of(const P& pol, const typename P::Coef& cf) {
  if constexpr (row_loss_policy<P>::value) {
    return pol.row_loss(cf);
  } else {
    return typename P::acc_t(0);
  }
}

// Returns the row's loss for the reduced output (row_loss_of; 0 without kRowLoss), on every thread
// of the row.
template <bool BLOCK, typename P>
__device__ __forceinline__ typename P::acc_t softmax_row_contiguous(
    const RowsArgs<typename P::scalar_t>& a, const P& pol, int64_t r, int tid, int nt,
    BlockReduceStorage<StateOf<P>, kRowsBlockMaxThreads>* sh) {
  using scalar_t = typename P::scalar_t;
  using acc_t = typename P::acc_t;
  constexpr int VEC = vec_size<scalar_t>();
  using Vec = AlignedVec<scalar_t, VEC>;
  const int64_t C = a.C;
  const int64_t n = r / a.D;
  const int64_t d = r - n * a.D;
  const scalar_t* xrow = a.x + n * a.xN + d * a.xD;
  const RowSplit sp = row_split(xrow, C);

  const scalar_t* arow = nullptr;
  bool a_vec = false;
  if constexpr (P::kAux) {
    arow = a.aux + n * a.aN + d * a.aD;
    a_vec = a.aC == 1 && same_alignment(arow, xrow);
  }
  auto aux_at = [&](int64_t c) -> acc_t {
    if constexpr (P::kAux) {
      return static_cast<acc_t>(arow[c * a.aC]);
    } else {
      return acc_t(0);
    }
  };
  // The aux values of the vector at c0 (av: its 128-bit load when a_vec).
  auto aux_vec = [&](int64_t c0, const Vec& av, acc_t (&tv)[VEC]) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      if constexpr (P::kAux) {
        tv[i] = a_vec ? static_cast<acc_t>(av.val[i]) : static_cast<acc_t>(arow[(c0 + i) * a.aC]);
      } else {
        tv[i] = acc_t(0);
      }
    }
  };

  const typename P::Row row = pol.row(n, d, xrow, a.xC, tid == 0);
  const bool extra = pol.extra_sums(row);

  // ---- pass 1
  StateOf<P> st;
  if (tid < sp.head) {
    const acc_t xs = pol.logit(static_cast<acc_t>(xrow[tid]));
    st.lse.update(xs);  // the first update: nothing to rebase
    if (extra) pol.accumulate(st.ex, row, tid, xs, aux_at(tid), st.lse.m);
  }
  pipelined_vecs<rows_unroll_pass1<P::kAux>(), P::kAux>(
      xrow + sp.head, P::kAux ? arow + sp.head : nullptr, a_vec, tid, sp.nvec, nt,
      [&](int64_t v, const Vec& xv, const Vec& av) {
        const int64_t c0 = sp.head + v * VEC;
        acc_t xs[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) xs[i] = pol.logit(static_cast<acc_t>(xv.val[i]));
        const acc_t m_old = st.lse.m;
        lse_update_chunk<VEC>(st.lse, xs);  // VEC + 1 exps
        if (extra) {
          if (st.lse.m > m_old) st.ex.rebase(m_old, st.lse.m);
          acc_t tv[VEC];
          aux_vec(c0, av, tv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) pol.accumulate(st.ex, row, c0 + i, xs[i], tv[i], st.lse.m);
        }
      });
  for (int64_t c = sp.tail + tid; c < C; c += nt) {
    const acc_t xs = pol.logit(static_cast<acc_t>(xrow[c]));
    const acc_t m_old = st.lse.m;
    st.lse.update(xs);
    if (extra) {
      if (st.lse.m > m_old) st.ex.rebase(m_old, st.lse.m);
      pol.accumulate(st.ex, row, c, xs, aux_at(c), st.lse.m);
    }
  }

  if constexpr (BLOCK) {
    block_allreduce(st, *sh);  // its barriers order pass-1 reads before pass-2 writes
  } else {
    warp_allreduce(st);
    __syncwarp();  // memory ordering: every lane's pass-1 reads before any pass-2 write
  }

  const typename P::Coef cf = pol.epilogue(row, st.lse, st.ex);
  if (tid == 0 && (!row_loss_policy<P>::value || a.block_loss == nullptr)) pol.store_row(r, cf);
  if (a.g == nullptr) return row_loss_of(pol, cf);

  // ---- pass 2
  scalar_t* grow = a.g + n * a.gN + d * a.gD;
  const bool g_vec = a.gC == 1 && same_alignment(grow, xrow);
  const bool zero = pol.zero_grad(row, cf);
  auto grad_at = [&](int64_t c) -> acc_t {
    if (zero) return acc_t(0);
    const acc_t xs = pol.logit(static_cast<acc_t>(xrow[c]));
    return pol.grad(cf, row, c, xs, aux_at(c));
  };

  if (tid < sp.head) grow[tid * a.gC] = static_cast<scalar_t>(grad_at(tid));
  auto store = [&](int64_t c0, const Vec& out) {
    if (g_vec) {
      store_vec(grow + c0, out);  // one 128-bit store
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) grow[(c0 + i) * a.gC] = out.val[i];
    }
  };
  if (zero) {
    Vec out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.val[i] = static_cast<scalar_t>(acc_t(0));
    for (int64_t v = tid; v < sp.nvec; v += nt) store(sp.head + v * VEC, out);
  } else {
    pipelined_vecs<rows_unroll_pass2<P::kAux>(), P::kAux>(
        xrow + sp.head, P::kAux ? arow + sp.head : nullptr, a_vec, tid, sp.nvec, nt,
        [&](int64_t v, const Vec& xv, const Vec& av) {
          const int64_t c0 = sp.head + v * VEC;
          acc_t tv[VEC];
          aux_vec(c0, av, tv);
          Vec out;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const acc_t xs = pol.logit(static_cast<acc_t>(xv.val[i]));
            out.val[i] = static_cast<scalar_t>(pol.grad(cf, row, c0 + i, xs, tv[i]));
          }
          store(c0, out);
        });
  }
  for (int64_t c = sp.tail + tid; c < C; c += nt) {
    grow[c * a.gC] = static_cast<scalar_t>(grad_at(c));
  }
  return row_loss_of(pol, cf);
}

// Block sums: thread block loops over the loss blocks of the reduced output; part[] holds one sum
// per worker (warp or column), added in worker order by thread 0.
template <typename A>
__device__ __forceinline__ void store_block_sum(A* out, int64_t b, A* part, int workers) {
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    A t = A(0);
    for (int w = 0; w < workers; ++w) t += part[w];
    out[b] = t;
  }
  __syncthreads();  // part[] is reused by the next block
}

// Register budgets: a min-blocks bound caps registers at 64K / (threads x min-blocks) (rounded
// down to a multiple of 8); .ci/check_cuda.sh fails on any spill, so a bound is only as tight as
// the ptxas table allows. Without one ptxas picks its own target, and may spill to reach it.
// Warp kernel (256 threads): 3 blocks (80 registers) for float32 math without an aux operand,
// else 2 (128). Block kernel (512 threads): 2 blocks (64 registers), else 1 for float64 math.
template <typename P>
constexpr int rows_warp_min_blocks() {
  return (P::kAux || sizeof(typename P::acc_t) > 4) ? 2 : 3;
}
template <typename P>
constexpr int rows_block_min_blocks() {
  return sizeof(typename P::acc_t) > 4 ? 1 : 2;
}

template <typename P>
__global__ void __launch_bounds__(kRowsWarpThreads, rows_warp_min_blocks<P>())
    softmax_rows_warp_kernel(const RowsArgs<typename P::scalar_t> a, const P pol_in) {
  P pol = pol_in;
  pol.prepare();
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t warps_per_block = blockDim.x / kWarpSize;
  if constexpr (row_loss_policy<P>::value) {
    // Units: groups of warps_per_block rows, or (reduced output) loss blocks; one loop, so that
    // the row's code is inlined once.
    using acc_t = typename P::acc_t;
    __shared__ acc_t part[kRowsWarpThreads / kWarpSize];
    const int warp = threadIdx.x / kWarpSize;
    const bool reduced = a.block_loss != nullptr;
    const int64_t N = a.rows / a.D;
    const int64_t units =
        reduced ? loss_blocks(N, a.C, a.D) : ceil_div(a.rows, warps_per_block);
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // block-uniform
      int64_t r0 = u * warps_per_block, r1 = r0 + warps_per_block;
      if (reduced) loss_block_range(u, N, a.C, a.D, &r0, &r1);
      if (r1 > a.rows) r1 = a.rows;
      acc_t sum = acc_t(0);
#pragma unroll 1
      for (int64_t r = r0 + warp; r < r1; r += warps_per_block) {  // warp-uniform
        sum += softmax_row_contiguous<false, P>(a, pol, r, lane, kWarpSize, nullptr);
      }
      if (reduced) {
        if (lane == 0) part[warp] = sum;
        store_block_sum(static_cast<acc_t*>(a.block_loss), u, part,
                        static_cast<int>(warps_per_block));
      }
    }
  } else {
    const int64_t first =
        static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarpSize;
    const int64_t step = static_cast<int64_t>(gridDim.x) * warps_per_block;
    // Warp-uniform loop: every lane of a warp works on the same row.
    for (int64_t r = first; r < a.rows; r += step) {
      softmax_row_contiguous<false, P>(a, pol, r, lane, kWarpSize, nullptr);
    }
  }
}

template <typename P>
__global__ void __launch_bounds__(kRowsBlockMaxThreads, rows_block_min_blocks<P>())
    softmax_rows_block_kernel(const RowsArgs<typename P::scalar_t> a, const P pol_in) {
  __shared__ BlockReduceStorage<StateOf<P>, kRowsBlockMaxThreads> sh;
  P pol = pol_in;
  pol.prepare();
  if constexpr (row_loss_policy<P>::value) {
    // Units: rows, or (reduced output) loss blocks of rows. One loop, so that the row's code is
    // inlined once (twice spills at this kernel's register bound).
    using acc_t = typename P::acc_t;
    const bool reduced = a.block_loss != nullptr;
    const int64_t N = a.rows / a.D;
    const int64_t units = reduced ? loss_blocks(N, a.C, a.D) : a.rows;
    __shared__ acc_t part[1];
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // block-uniform
      int64_t r0 = u, r1 = u + 1;
      if (reduced) loss_block_range(u, N, a.C, a.D, &r0, &r1);
      acc_t sum = acc_t(0);
#pragma unroll 1
      for (int64_t r = r0; r < r1; ++r) {
        sum += softmax_row_contiguous<true>(a, pol, r, threadIdx.x, blockDim.x, &sh);
      }
      if (reduced) {
        if (threadIdx.x == 0) part[0] = sum;
        store_block_sum(static_cast<acc_t*>(a.block_loss), u, part, 1);
      }
    }
  } else {
    // Block-uniform loop over rows.
    for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
      softmax_row_contiguous<true>(a, pol, r, threadIdx.x, blockDim.x, &sh);
    }
  }
}

// Block (TX, TY), TX * TY = 256. Thread (tx, ty) owns row tile * TX + tx and the classes
// ty, ty + TY, ...
template <typename P>
__global__ void __launch_bounds__(kRowsStridedThreads)
    softmax_rows_strided_kernel(const RowsArgs<typename P::scalar_t> a, const P pol_in) {
  using scalar_t = typename P::scalar_t;
  using acc_t = typename P::acc_t;
  __shared__ ColumnReduceStorage<StateOf<P>, kRowsStridedThreads> sh;
  P pol = pol_in;
  pol.prepare();
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t C = a.C;

  // One tile: this thread's row r (if active); returns the row's loss (kRowLoss; 0 if inactive).
  // Called block-uniformly: every thread takes part in the column all-reduce.
  auto one_tile = [&](const int64_t r, const bool active) -> acc_t {
    int64_t n = 0, d = 0;
    const scalar_t* xrow = a.x;
    const scalar_t* arow = nullptr;
    typename P::Row row{};
    StateOf<P> st;
    if (active) {
      n = r / a.D;
      d = r - n * a.D;
      xrow = a.x + n * a.xN + d * a.xD;
      if constexpr (P::kAux) arow = a.aux + n * a.aN + d * a.aD;
      row = pol.row(n, d, xrow, a.xC, ty == 0);
      const bool extra = pol.extra_sums(row);
      for (int64_t c = ty; c < C; c += TY) {
        const acc_t xs = pol.logit(static_cast<acc_t>(xrow[c * a.xC]));
        const acc_t m_old = st.lse.m;
        st.lse.update(xs);
        if (extra) {
          if (st.lse.m > m_old) st.ex.rebase(m_old, st.lse.m);
          acc_t tv = acc_t(0);
          if constexpr (P::kAux) tv = static_cast<acc_t>(arow[c * a.aC]);
          pol.accumulate(st.ex, row, c, xs, tv, st.lse.m);
        }
      }
    }
    // Every thread takes part (inactive ones with the identity); the first barrier also orders
    // every pass-1 read before any pass-2 write.
    column_allreduce(st, sh);
    if (!active) return acc_t(0);
    const typename P::Coef cf = pol.epilogue(row, st.lse, st.ex);
    if (ty == 0 && (!row_loss_policy<P>::value || a.block_loss == nullptr)) pol.store_row(r, cf);
    const acc_t loss = row_loss_of(pol, cf);
    if (a.g == nullptr) return loss;
    scalar_t* grow = a.g + n * a.gN + d * a.gD;
    const bool zero = pol.zero_grad(row, cf);
    for (int64_t c = ty; c < C; c += TY) {
      acc_t gr = acc_t(0);
      if (!zero) {
        const acc_t xs = pol.logit(static_cast<acc_t>(xrow[c * a.xC]));
        acc_t tv = acc_t(0);
        if constexpr (P::kAux) tv = static_cast<acc_t>(arow[c * a.aC]);
        gr = pol.grad(cf, row, c, xs, tv);
      }
      grow[c * a.gC] = static_cast<scalar_t>(gr);
    }
    return loss;
  };

  if constexpr (row_loss_policy<P>::value) {
    // Units: tiles, or (reduced output) loss blocks; one loop, so that the tile's code is inlined
    // once.
    __shared__ acc_t part[kRowsStridedThreads];
    const bool reduced = a.block_loss != nullptr;
    const int64_t N = a.rows / a.D;
    const int64_t units = reduced ? loss_blocks(N, a.C, a.D) : ceil_div(a.rows, TX);
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {  // block-uniform
      int64_t r0 = u * TX, r1 = r0 + TX;
      if (reduced) loss_block_range(u, N, a.C, a.D, &r0, &r1);
      if (r1 > a.rows) r1 = a.rows;
      acc_t sum = acc_t(0);
#pragma unroll 1
      for (int64_t t0 = r0; t0 < r1; t0 += TX) sum += one_tile(t0 + tx, t0 + tx < r1);
      if (reduced) {
        if (ty == 0) part[tx] = sum;
        store_block_sum(static_cast<acc_t*>(a.block_loss), u, part, TX);
      }
    }
  } else {
    for (int64_t tile = blockIdx.x; tile * TX < a.rows; tile += gridDim.x) {  // block-uniform
      const int64_t r = tile * TX + tx;
      one_tile(r, r < a.rows);
    }
  }
}

// Launches the kernel plan_softmax_rows picks, on the current stream (the caller holds a
// CUDAGuard of the input's device). Nothing is launched for zero rows.
template <typename P>
void launch_softmax_rows(const RowsArgs<typename P::scalar_t>& a, const P& pol) {
  using scalar_t = typename P::scalar_t;
  if (a.rows <= 0) return;
  RowsLaunch l = plan_softmax_rows(a.rows, a.C, vec_size<scalar_t>(), a.xC == 1,
                                   a.g != nullptr && a.gC != 1);
  if (row_loss_policy<P>::value && a.block_loss != nullptr) {  // one thread block per loss block
    l.grid = capped_grid(loss_blocks(a.rows / a.D, a.C, a.D), 1, 0);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (l.kind) {
    case RowsKernel::Warp:
      softmax_rows_warp_kernel<P><<<grid_1d(l.grid), dim3(l.tx), 0, stream>>>(a, pol);
      break;
    case RowsKernel::Block:
      softmax_rows_block_kernel<P><<<grid_1d(l.grid), dim3(l.tx), 0, stream>>>(a, pol);
      break;
    case RowsKernel::Strided:
      softmax_rows_strided_kernel<P><<<grid_1d(l.grid), dim3(l.tx, l.ty), 0, stream>>>(a, pol);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fusedloss
