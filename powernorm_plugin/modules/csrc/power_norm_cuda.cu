// PowerNorm's training step on a CUDA device in four kernel launches (six in warm-up and PN-V).
//
// On a GPU, at the sizes of NMT training, a normalization layer's cost is its host time, and
// that is mostly one driver call per kernel: LayerNorm launches five. A step on ATen's
// operators launches about forty; here each direction is one sweep over the rows and one
// small kernel that finishes the statistics:
//
//   forward   rows:    y_n = z_n w / sqrt(psi^2 + eps) + b; per block of rows, the column sums
//                      sum_n m_n z_n^2 (and sum_n z_n^2)
//             finish:  psi_B^2 = (block sums) / N; ok = psi_B^2 finite; psi^2 moved (EMA, or
//                      the warm-up mean) where ok; num_steps += ok
//   backward  rows:    dz_n = a dy_n - b m_n z_n, dx_n = dz_n (or r_n (dz_n - z_n mean_g(dz z))
//                      with groups); per block, sum_n dy_n z_n, sum_n dy_n (sum_n m_n dy_n z_n)
//             finish:  dL/dgamma = inv sum dy z, dL/dbeta = sum dy, nu moved where finite
//
// with z = x, or x r_n per channel group g: r_{n,g} = 1 / sqrt(mean_{c in g} x_{n,c}^2 + eps).
// Where the scale needs this batch's psi_B (warm-up, PN-V) the rows kernel runs twice (sums,
// then output). The equations and the per-mode a, b, Gamma and Lambda are those of
// power_norm.py's docstring and power_norm_step.cpp.
//
// Every sum is taken in a fixed order (per block of rows, in row order; then over the blocks
// in block order; group sums by a fixed warp tree), so results do not vary from run to run.
//
// With POWERNORM_CUDA_MERGED_FINISH=1 in the environment (read once, at the first CUDA step),
// each finish runs inside the rows kernel before it instead, in the last of its blocks to
// finish (last_to_arrive): two launches a step instead of four (four instead of six in
// warm-up and PN-V). That path has not yet run on a GPU, so it is not the default.
#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "power_norm_fused.h"

namespace powernorm_plugin {
namespace {

using at::Tensor;

constexpr int kPerThread = 8;         // columns one thread keeps in registers
constexpr int kMaxColumns = 4096;     // = kPerThread * the largest block (512 threads)
constexpr int64_t kMaxBlocks = 128;   // row blocks: column partial sums per block
constexpr int64_t kMinBlockRows = 4;
constexpr int kFinishThreads = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // a block's dynamic shared memory by default

// Per group g of a row held in shared memory (vals: C entries), out[g] = mean over the
// group's S entries, summed by one warp in a fixed order; with `rms`, 1 / sqrt(mean + eps).
template <typename A>
__device__ void group_means(const A* vals, A* out, int G, int S, A eps, bool rms) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int g = warp; g < G; g += warps) {
    A s = 0;
    for (int i = lane; i < S; i += 32) s += vals[g * S + i];
    for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) out[g] = rms ? rsqrt_(s / S + eps) : s / S;
  }
}

// Rows of a block: [first, last). Row blocks depend on the row count alone.
struct RowBlocks {
  int64_t rows, count;
};

RowBlocks row_blocks(int64_t N) {
  const int64_t rows = std::max(kMinBlockRows, (N + kMaxBlocks - 1) / kMaxBlocks);
  return {rows, (N + rows - 1) / rows};
}

int row_threads(int64_t C) { return C <= 256 * kPerThread ? 256 : 512; }

// Threads of the one-block finish kernels: a column each, up to kFinishThreads.
int finish_block(int64_t C) {
  return static_cast<int>(std::min<int64_t>(kFinishThreads, (C + 31) / 32 * 32));
}

// Sum over the blocks, in block order, of part `part` of their column sums. The loads bypass
// L1 (__ldcg): in the merged finish the sums were written by other blocks of the same kernel.
template <typename A>
__device__ __forceinline__ A block_sum(const A* partial, int64_t blocks, int parts, int part,
                                       int C, int c) {
  A s = 0;
  for (int64_t blk = 0; blk < blocks; ++blk) s += __ldcg(partial + (blk * parts + part) * C + c);
  return s;
}

// Whether this block is the last of its kernel to get here (every thread gets the answer).
// Each block counts itself in `arrivals` once its column sums are written and fenced, so the
// last one sees every block's sums; it sets the count back to zero for the next launch. (No
// shared memory: the answer reaches the block's threads through __syncthreads_or.)
__device__ bool last_to_arrive(unsigned int* arrivals) {
  __threadfence();
  __syncthreads();
  bool last = false;
  if (threadIdx.x == 0) {
    last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
    if (last) *arrivals = 0u;
  }
  last = __syncthreads_or(last);
  if (last) __threadfence();  // the other blocks' sums are read after the count
  return last;
}

// The forward's statistics, by the threads of one block: psi_B^2, whether it is finite, inv
// (of psi_{t-1}, or of psi_B with use_batch), inv_b (official), all_sq (official), psi^2 and
// num_steps moved. A kernel of its own (finish_forward), or the end of forward_rows.
template <typename A>
struct ForwardFinish {
  const A* partial;
  int64_t blocks;
  int parts, C;
  A count, eps;
  A* phi;
  int64_t* num_steps;
  bool* ok_out;
  A *psi_b, *all_sq, *inv, *inv_b;
  int64_t mode;
  bool warm, use_batch;
  A mean_rate, ema_rate;

  __device__ void operator()() const {
    bool finite = true;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const A token = block_sum(partial, blocks, parts, 0, C, c);
      const A psi = token / count;
      psi_b[c] = psi;
      if (all_sq != nullptr) {
        all_sq[c] = parts == 2 ? block_sum(partial, blocks, parts, 1, C, c) : token;
      }
      finite = finite && finite_(psi);
    }
    const bool ok = __syncthreads_and(finite);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const A psi = psi_b[c];
      const A p = phi[c];
      inv[c] = rsqrt_((use_batch ? psi : p) + eps);
      if (inv_b != nullptr) inv_b[c] = rsqrt_(psi + eps);
      if (ok) phi[c] = moved_phi(p, psi, warm, mode, mean_rate, ema_rate);
    }
    if (threadIdx.x == 0) {
      *ok_out = ok;
      *num_steps += ok ? 1 : 0;
    }
  }
};

template <typename A>
__global__ void finish_forward(ForwardFinish<A> finish) {
  finish();
}

// The forward's sweep. With `norm`, writes y = z * w * inv + b, inv = 1/sqrt(norm + eps)
// (norm_is_phi) or norm itself; with `partial`, the block's column sums: part 0 the token sum
// of z^2, part 1 (only with a mask and all_rows) the all-row sum. With `arrivals`, the last
// block runs `finish` on them. (`norm` may be the psi^2 that finish moves: not __restrict__.)
template <typename T, typename A>
__global__ void __launch_bounds__(512, 1)
    forward_rows(const T* __restrict__ x, const A* __restrict__ m, int64_t N, int C, int G,
                 A eps, const A* __restrict__ w, const A* __restrict__ b, const A* norm,
                 bool norm_is_phi, T* __restrict__ y, A* __restrict__ r_out, A* partial,
                 bool all_rows, int64_t block_rows, ForwardFinish<A> finish,
                 unsigned int* arrivals) {
  extern __shared__ unsigned char shared_bytes[];
  A* sq = reinterpret_cast<A*>(shared_bytes);  // the row's z^2 (groups only)
  A* rs = sq + C;                               // the row's r per group
  const int tid = threadIdx.x, nt = blockDim.x, S = G ? C / G : 1;
  const int64_t first = blockIdx.x * block_rows, last = min(N, first + block_rows);
  A scale[kPerThread], shift[kPerThread], tok[kPerThread], all[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int c = tid + k * nt;
    tok[k] = all[k] = scale[k] = shift[k] = A(0);
    if (norm != nullptr && c < C) {
      const A inv = norm_is_phi ? rsqrt_(norm[c] + eps) : norm[c];
      scale[k] = (w != nullptr ? w[c] : A(1)) * inv;
      shift[k] = b != nullptr ? b[c] : A(0);
    }
  }
  for (int64_t n = first; n < last; ++n) {
    A z[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int c = tid + k * nt;
      z[k] = c < C ? static_cast<A>(x[n * C + c]) : A(0);
    }
    if (G) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int c = tid + k * nt;
        if (c < C) sq[c] = z[k] * z[k];
      }
      __syncthreads();
      group_means(sq, rs, G, S, eps, /*rms=*/true);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int c = tid + k * nt;
        if (c < C) z[k] *= rs[c / S];
      }
      if (r_out != nullptr) {
        for (int g = tid; g < G; g += nt) r_out[n * G + g] = rs[g];
      }
    }
    if (norm != nullptr) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int c = tid + k * nt;
        if (c < C) y[n * C + c] = static_cast<T>(z[k] * scale[k] + shift[k]);
      }
    }
    if (partial != nullptr) {
      const A token = m != nullptr ? m[n] : A(1);
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const A q = z[k] * z[k];
        tok[k] += token * q;
        all[k] += q;
      }
    }
  }
  if (partial != nullptr) {
    const int parts = (m != nullptr && all_rows) ? 2 : 1;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int c = tid + k * nt;
      if (c < C) {
        partial[(blockIdx.x * parts) * C + c] = tok[k];
        if (parts == 2) partial[(blockIdx.x * parts + 1) * C + c] = all[k];
      }
    }
    if (arrivals != nullptr && last_to_arrive(arrivals)) finish();
  }
}

// Per-column coefficients of dz = a dy - b m z (dz_coefficients).
template <typename A>
struct Coefficients {
  const A *w, *inv, *inv_b, *nu, *b_given;
  int64_t mode;
  __device__ void at(int c, A& a, A& b) const {
    dz_coefficients(mode, w != nullptr ? w[c] : A(1), inv[c], inv_b != nullptr ? inv_b[c] : A(0),
                    nu != nullptr ? nu[c] : A(0), b_given != nullptr ? b_given[c] : A(0), &a, &b);
  }
};

// The backward's statistics, by the threads of one block: the parameter gradients; nu moved
// where finite (paper, official), or PN-V's b = gamma inv^3 (1/N) sum dy z for the second
// sweep. A kernel of its own (finish_backward), or the end of backward_rows.
template <typename A>
struct BackwardFinish {
  const A* partial;
  int64_t blocks;
  int parts, C;
  const A *w, *inv, *psi_b, *all_sq;
  A *nu, *grad_w, *grad_b, *b_given;
  int64_t mode;
  A count, rows, rate;

  __device__ void operator()() const {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const A sum_dz = block_sum(partial, blocks, parts, 0, C, c);
      if (grad_w != nullptr) grad_w[c] = sum_dz * inv[c];
      if (grad_b != nullptr) grad_b[c] = block_sum(partial, blocks, parts, 1, C, c);
      const A gamma = w != nullptr ? w[c] : A(1);
      if (mode == kVanilla) {
        b_given[c] = vanilla_b(gamma, inv[c], sum_dz, count);
      } else if (mode == kPaper) {  // over tokens
        const A token_dz = parts == 3 ? block_sum(partial, blocks, parts, 2, C, c) : sum_dz;
        nu[c] = moved_nu(mode, nu[c], gamma, inv[c], psi_b[c], A(0), token_dz, sum_dz, count,
                         rows, rate);
      } else {  // official: over every row
        nu[c] = moved_nu(mode, nu[c], gamma, inv[c], A(0), all_sq[c], sum_dz, sum_dz, count,
                         rows, rate);
      }
    }
  }
};

template <typename A>
__global__ void finish_backward(BackwardFinish<A> finish) {
  finish();
}

// The backward's sweep. With `dx`, writes the input gradient (the b term on token rows, or on
// every row with b_all_rows); with `partial`, the block's column sums: part 0 sum dy z,
// part 1 sum dy, part 2 (with token_rows and a mask) the token sum of dy z. With `arrivals`,
// the last block runs `finish` on them.
template <typename T, typename A>
__global__ void __launch_bounds__(512, 1)
    backward_rows(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ r,
                  const A* __restrict__ m, int64_t N, int C, int G, Coefficients<A> coef,
                  bool b_all_rows, T* __restrict__ dx, A* partial, bool token_rows,
                  int64_t block_rows, BackwardFinish<A> finish, unsigned int* arrivals) {
  extern __shared__ unsigned char shared_bytes[];
  A* prod = reinterpret_cast<A*>(shared_bytes);  // the row's dz z (groups only)
  A* q = prod + C;                                // the row's mean of dz z per group
  const int tid = threadIdx.x, nt = blockDim.x, S = G ? C / G : 1;
  const int64_t first = blockIdx.x * block_rows, last = min(N, first + block_rows);
  A a[kPerThread], b[kPerThread], sum_dz[kPerThread], sum_dy[kPerThread], tok_dz[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int c = tid + k * nt;
    a[k] = b[k] = sum_dz[k] = sum_dy[k] = tok_dz[k] = A(0);
    if (dx != nullptr && c < C) coef.at(c, a[k], b[k]);
  }
  for (int64_t n = first; n < last; ++n) {
    const A token = m != nullptr ? m[n] : A(1);
    A z[kPerThread], g[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int c = tid + k * nt;
      z[k] = g[k] = A(0);
      if (c < C) {
        z[k] = static_cast<A>(x[n * C + c]);
        if (G) z[k] *= r[n * G + c / S];
        g[k] = static_cast<A>(dy[n * C + c]);
      }
    }
    if (partial != nullptr) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        sum_dz[k] += g[k] * z[k];
        tok_dz[k] += token * g[k] * z[k];
        sum_dy[k] += g[k];
      }
    }
    if (dx == nullptr) continue;
    const A row_b = b_all_rows ? A(1) : token;
    A dz[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) dz[k] = a[k] * g[k] - b[k] * row_b * z[k];
    if (G) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int c = tid + k * nt;
        if (c < C) prod[c] = dz[k] * z[k];
      }
      __syncthreads();
      group_means(prod, q, G, S, A(0), /*rms=*/false);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int c = tid + k * nt;
        if (c < C) dz[k] = (dz[k] - z[k] * q[c / S]) * r[n * G + c / S];
      }
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int c = tid + k * nt;
      if (c < C) dx[n * C + c] = static_cast<T>(dz[k]);
    }
  }
  if (partial != nullptr) {
    const int parts = (m != nullptr && token_rows) ? 3 : 2;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int c = tid + k * nt;
      if (c < C) {
        partial[(blockIdx.x * parts) * C + c] = sum_dz[k];
        partial[(blockIdx.x * parts + 1) * C + c] = sum_dy[k];
        if (parts == 3) partial[(blockIdx.x * parts + 2) * C + c] = tok_dz[k];
      }
    }
    if (arrivals != nullptr && last_to_arrive(arrivals)) finish();
  }
}

size_t group_shared_bytes(int64_t C, int64_t G, size_t element) {
  return G ? static_cast<size_t>(C + G) * element : 0;
}

// A batch of padding only (count 0) is left to the Python step, and so is a row with its
// group factors that does not fit in the shared memory a kernel gets without asking for more
// (fp64 with C + groups > 6144).
bool supports(const Tensor& x, const Tensor& running_phi, const Tensor& running_nu,
              int64_t groups, int64_t count) {
  const size_t acc_size = compute_dtype(x) == at::kDouble ? sizeof(double) : sizeof(float);
  return count > 0 && x.is_cuda() && x.size(-1) <= kMaxColumns && x.numel() > 0 &&
         group_shared_bytes(x.size(-1), groups, acc_size) <= kMaxSharedBytes &&
         buffers_fit(x, running_phi, running_nu);
}

// Whether each finish runs at the end of its rows kernel (see the top of this file).
bool merged_finish() {
  static const bool merged = [] {
    const char* v = std::getenv("POWERNORM_CUDA_MERGED_FINISH");
    return v != nullptr && std::string(v) == "1";
  }();
  return merged;
}

// The arrival count of the merged finish for the current stream, or null where the finish
// is a kernel of its own. A count per device and stream (two kernels running at once on
// different streams must not share one), made zero once, kept for the life of the process:
// each kernel's last block leaves it at zero again. Not while a CUDA graph is captured: its
// zeroing would only be recorded, and a graph replayed on other streams would share it.
unsigned int* arrivals(const c10::cuda::CUDAStream& stream) {
  if (!merged_finish() ||
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return nullptr;
  }
  static std::mutex mutex;
  static auto* counts = new std::map<std::pair<int, c10::StreamId>, Tensor>();  // never freed:
  // a tensor freed after CUDA's own teardown at exit would crash there
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& count = (*counts)[{stream.device_index(), stream.id()}];
  if (!count.defined()) {
    count = at::zeros({1}, at::TensorOptions().device(stream.device()).dtype(at::kInt));
  }
  return reinterpret_cast<unsigned int*>(count.data_ptr<int>());
}

FusedForward forward(const Tensor& x, const Tensor& m, const Tensor& w, const Tensor& b,
                     Tensor& running_phi, Tensor& num_steps, int64_t mode, int64_t groups,
                     double eps, double count, bool warm, bool use_batch, int64_t step,
                     double alpha_fwd) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = x.size(-1), N = x.numel() / C;  // x: (..., C), its rows the positions
  const auto acc = running_phi.scalar_type();
  const auto opts = x.options().dtype(acc);
  const RowBlocks blocks = row_blocks(N);
  const bool all_rows = mode == kOfficial;
  const int parts = (m.defined() && all_rows) ? 2 : 1;
  const int threads = row_threads(C);
  FusedForward out;
  out.y = at::empty_like(x);
  out.inv = at::empty({C}, opts);
  out.psi_b = at::empty({C}, opts);
  out.ok = at::empty({}, x.options().dtype(at::kBool));
  if (groups) out.r = at::empty({N, groups}, opts);
  if (mode == kOfficial) {
    out.all_sq = at::empty({C}, opts);
    out.inv_b = at::empty({C}, opts);
  }
  Tensor partial = at::empty({blocks.count * parts * C}, opts);
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "powernorm_cuda_forward", [&] {
    using A = at::acc_type<scalar_t, true>;
    const size_t shm = group_shared_bytes(C, groups, sizeof(A));
    const A eps_a = static_cast<A>(eps);
    const ForwardFinish<A> finish{
        partial.data_ptr<A>(), blocks.count, parts, static_cast<int>(C), static_cast<A>(count), eps_a,
        running_phi.data_ptr<A>(), num_steps.data_ptr<int64_t>(), out.ok.data_ptr<bool>(),
        out.psi_b.data_ptr<A>(), ptr<A>(out.all_sq), out.inv.data_ptr<A>(),
        ptr<A>(out.inv_b), mode, warm, use_batch,
        static_cast<A>(warm ? 1.0 / static_cast<double>(step) : 0.0),
        static_cast<A>(1.0 - alpha_fwd)};
    unsigned int* arrived = arrivals(stream);
    auto rows = [&](const A* norm, bool norm_is_phi, scalar_t* y, A* r_out, A* part) {
      forward_rows<scalar_t, A><<<blocks.count, threads, shm, stream>>>(
          x.data_ptr<scalar_t>(), ptr<A>(m), N, C, groups, eps_a, ptr<A>(w), ptr<A>(b), norm,
          norm_is_phi, y, r_out, part, all_rows, blocks.rows, finish,
          part != nullptr ? arrived : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (use_batch) {  // sums first, output second
      rows(nullptr, false, nullptr, ptr<A>(out.r), partial.data_ptr<A>());
    } else {  // psi_{t-1}: running_phi as it is before this call's update
      rows(running_phi.data_ptr<A>(), true, out.y.data_ptr<scalar_t>(), ptr<A>(out.r),
           partial.data_ptr<A>());
    }
    if (arrived == nullptr) {
      finish_forward<A><<<1, finish_block(C), 0, stream>>>(finish);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (use_batch) rows(out.inv.data_ptr<A>(), false, out.y.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  bump_version(running_phi);
  bump_version(num_steps);
  return out;
}

FusedBackward backward(const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& m,
                       const Tensor& w, const Tensor& inv, const Tensor& psi_b,
                       const Tensor& all_sq, const Tensor& inv_b, Tensor& running_nu,
                       int64_t mode, int64_t groups, double count, double rows, double alpha_bkw,
                       bool has_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = x.size(-1), N = x.numel() / C;  // x: (..., C), its rows the positions
  const auto opts = inv.options();
  const RowBlocks blocks = row_blocks(N);
  const bool token_rows = mode == kPaper;
  const int parts = (m.defined() && token_rows) ? 3 : 2;
  const int threads = row_threads(C);
  FusedBackward out;
  out.dx = at::empty_like(x);
  if (w.defined()) out.grad_w = at::empty({C}, opts);
  if (has_bias) out.grad_b = at::empty({C}, opts);
  Tensor partial = at::empty({blocks.count * parts * C}, opts);
  Tensor b_given = mode == kVanilla ? at::empty({C}, opts) : Tensor();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "powernorm_cuda_backward", [&] {
    using A = at::acc_type<scalar_t, true>;
    const size_t shm = group_shared_bytes(C, groups, sizeof(A));
    const Coefficients<A> coef{ptr<A>(w), ptr<A>(inv), ptr<A>(inv_b), ptr<A>(running_nu),
                               ptr<A>(b_given), mode};
    const BackwardFinish<A> finish{
        partial.data_ptr<A>(), blocks.count, parts, static_cast<int>(C), ptr<A>(w), inv.data_ptr<A>(),
        ptr<A>(psi_b), ptr<A>(all_sq), running_nu.data_ptr<A>(), ptr<A>(out.grad_w),
        ptr<A>(out.grad_b), ptr<A>(b_given), mode, static_cast<A>(count),
        static_cast<A>(rows), static_cast<A>(1.0 - alpha_bkw)};
    unsigned int* arrived = arrivals(stream);
    auto sweep = [&](scalar_t* dx, A* part) {
      backward_rows<scalar_t, A><<<blocks.count, threads, shm, stream>>>(
          dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), ptr<A>(r), ptr<A>(m), N, C, groups,
          coef, /*b_all_rows=*/mode == kOfficial, dx, part, token_rows, blocks.rows, finish,
          part != nullptr ? arrived : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // PN-V's b needs the sums: sums first, input gradient second
    const bool vanilla = mode == kVanilla;
    sweep(vanilla ? nullptr : out.dx.data_ptr<scalar_t>(), partial.data_ptr<A>());
    if (arrived == nullptr) {
      finish_backward<A><<<1, finish_block(C), 0, stream>>>(finish);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (vanilla) sweep(out.dx.data_ptr<scalar_t>(), nullptr);
  });
  if (mode != kVanilla) bump_version(running_nu);
  return out;
}

const FusedStep kCudaStep{&supports, &forward, &backward};

// Fills in cuda_step() when the library is loaded.
struct Register {
  Register() { cuda_step() = &kCudaStep; }
} const register_cuda_step;

}  // namespace
}  // namespace powernorm_plugin
