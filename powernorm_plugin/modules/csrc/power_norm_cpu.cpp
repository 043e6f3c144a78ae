// PowerNorm's training-mode passes on the CPU, each a single sweep over the activations.
//
// A row is one position (T*B rows), a column one feature. With optional per-token group RMS
// scaling (groups > 0, C / groups channels per group):
//
//   r_{n,g} = 1 / sqrt(mean_{c in g} x_{n,c}^2 + eps),   z_{n,c} = x_{n,c} r_{n,g(c)}
//   (groups == 0: z = x, r = 1)
//
// forward:  y_n = scale * z_n + shift, with the column sums sum_n m_n z_n^2 and sum_n z_n^2
// backward: dz_n = a * dy_n - b * w_n * z_n        (w_n = m_n, or 1 with b_all_rows)
//           dx_n = r_n (dz_n - z_n mean_g(dz_n z_n)) with groups, dz_n without
//           with the column sums sum_n m_n dy_n z_n, sum_n dy_n z_n and sum_n dy_n
//
// m_n is 1 for a token and 0 for padding (no mask: all 1). Reading each row once, and writing
// once, is what keeps the layer as cheap as LayerNorm's fused kernel: the per-feature sums are
// accumulated from the row while it is in cache, instead of in separate passes.
//
// Column sums are accumulated per block of rows and the block partials added in block order.
// The blocks depend on the row count alone, so the result does not depend on the number of
// threads (bitwise-reproducible runs and resumes), and fp32 sums lose little precision.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "power_norm_cpu.h"

namespace powernorm_plugin {
namespace {

using at::Tensor;

constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlocks = 64;

// Where a sweep keeps its C-long working vectors, as bytes past a 4 KiB boundary. A sweep
// loads and stores them column by column in step, and the CPU first matches a load against
// the pending stores by the low 12 bits of the address: a load from one vector at the same
// offset modulo 4 KiB as a column just stored to another waits for that store ("4K
// aliasing"). Vectors 512 bytes apart modulo 4 KiB never meet that way. Left to the
// allocator they did (C = 1024 floats: every vector at one offset), and a pass took up to
// twice as long, by an amount that changed from process to process (benchmarks/README.md).
constexpr int64_t kPage = 4096;
constexpr int64_t kPartSkew = 0;       // the column sums: part p at kPartSkew + p * kPartSpacing
constexpr int64_t kPartSpacing = 512;
constexpr int64_t kGroupSkew = 1536;   // a group's dz (backward, with groups)
constexpr int64_t kRowSkew = 2048;     // the output row

// Rounds n (elements of T) up so that n * sizeof(T) is `skew` bytes past a multiple of 4 KiB.
template <typename T>
int64_t skewed_length(int64_t n, int64_t skew) {
  const int64_t size = sizeof(T);
  return n + ((skew - n * size % kPage + kPage) % kPage) / size;
}

// This thread's kept buffer (kept_buffer) of n elements, starting `skew` bytes past a 4 KiB
// boundary.
template <typename T, typename Use>
T* skewed_buffer(int64_t n, int64_t skew) {
  T* kept = kept_buffer<T, Use>(n + 2 * kPage / static_cast<int64_t>(sizeof(T)));
  const auto base = reinterpret_cast<std::uintptr_t>(kept);
  return reinterpret_cast<T*>((base + kPage - 1) / kPage * kPage + skew);
}

// A pass's rows, cut into at most kMaxBlocks blocks of at least kMinBlockRows rows (fixed by
// the row count alone), and the column sums accumulated per block: `parts` sums of C columns
// each (none with parts == 0), part p of a block at block + p * stride(), kPartSpacing bytes
// past the part before it modulo 4 KiB (see kPartSkew). reduce() adds the blocks in block order, so
// the sums do not depend on how the blocks were shared among threads.
template <typename acc_t>
class BlockSums {
 public:
  BlockSums(int64_t N, int64_t C, int64_t parts)
      : N_(N),
        C_(C),
        parts_(parts),
        rows_(std::max(kMinBlockRows, (N + kMaxBlocks - 1) / kMaxBlocks)),
        count_((N + rows_ - 1) / rows_),
        stride_(skewed_length<acc_t>(C, kPartSpacing)),
        block_(skewed_length<acc_t>(parts * stride_, 0)),
        partial_(parts ? skewed_buffer<acc_t, BlockSums>(count_ * block_, kPartSkew) : nullptr) {}

  int64_t count() const { return count_; }
  int64_t first(int64_t blk) const { return blk * rows_; }
  int64_t end(int64_t blk) const { return std::min(N_, (blk + 1) * rows_); }
  int64_t stride() const { return stride_; }

  // Block blk's partials, each part zeroed; nullptr without sums.
  acc_t* start(int64_t blk) const {
    if (!parts_) return nullptr;
    acc_t* block = partial_ + blk * block_;
    for (int64_t p = 0; p < parts_; ++p) std::fill_n(block + p * stride_, C_, acc_t(0));
    return block;
  }

  // out[p] = the sum over blocks, in block order, of part p (not computed where out[p] is
  // nullptr).
  void reduce(std::initializer_list<acc_t*> out) const {
    for (int64_t p = 0; p < parts_; ++p) {
      acc_t* dst = out.begin()[p];
      if (dst == nullptr) continue;
      std::fill(dst, dst + C_, acc_t(0));
      for (int64_t blk = 0; blk < count_; ++blk) {
        const acc_t* src = partial_ + blk * block_ + p * stride_;
        for (int64_t c = 0; c < C_; ++c) dst[c] += src[c];
      }
    }
  }

 private:
  int64_t N_, C_, parts_, rows_, count_, stride_, block_;  // stride_, block_: in elements
  acc_t* partial_;
};

// sum_i u_i v_i over a group's span of one row, at compute precision, in eight independent
// lanes: the compiler vectorizes that, not a single running sum (one long dependency chain).
template <typename acc_t, typename U, typename V>
inline acc_t dot(const U* __restrict__ u, const V* __restrict__ v, int64_t len) {
  acc_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int k = 0; k < 8; ++k)
      lane[k] += static_cast<acc_t>(u[i + k]) * static_cast<acc_t>(v[i + k]);
  }
  acc_t total = 0;
  if (len % 8) {  // (guarded: for a constant length GCC would warn about the unused tail)
    for (; i < len; ++i) total += static_cast<acc_t>(u[i]) * static_cast<acc_t>(v[i]);
  }
  for (int k = 0; k < 8; ++k) total += lane[k];
  return total;
}

// Outputs of at least this size are written with non-temporal stores (see OutputRows).
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// Where a pass writes its output (y or dx): each row is computed into a small buffer in L1
// and then copied to its place. A large output is copied with non-temporal stores, where the
// CPU has them: written through the caches, every line of it would first be read from memory
// (read-for-ownership), a third more memory traffic, and it would evict the inputs the pass
// and the next pass still read. An output that fits the caches is copied normally, so the
// layer that consumes it next finds it there.
template <typename scalar_t>
class OutputRows {
 public:
  // out: the (N, C) output, or nullptr where the pass writes none.
  OutputRows(scalar_t* out, int64_t N, int64_t C)
      : out_(out),
        C_(C),
        stream_(out != nullptr && N * C * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes),
        row_(out != nullptr ? skewed_buffer<scalar_t, OutputRows>(C, kRowSkew) : nullptr) {}
  scalar_t* row() { return row_; }
  void store(int64_t n) {
    char* dst = reinterpret_cast<char*>(out_ + n * C_);
    const char* src = reinterpret_cast<const char*>(row_);
    int64_t bytes = C_ * static_cast<int64_t>(sizeof(scalar_t));
#if defined(__SSE2__)
    if (stream_) {
      const int64_t head =
          std::min<int64_t>(bytes, (32 - reinterpret_cast<std::uintptr_t>(dst) % 32) % 32);
      std::memcpy(dst, src, head);
      dst += head, src += head, bytes -= head;
#if defined(__AVX__)
      for (; bytes >= 32; dst += 32, src += 32, bytes -= 32)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(dst),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
#endif
      for (; bytes >= 16; dst += 16, src += 16, bytes -= 16)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    }
#endif
    std::memcpy(dst, src, bytes);
  }
  // Orders this thread's non-temporal stores before the output is handed on.
  ~OutputRows() {
#if defined(__SSE2__)
    if (stream_) _mm_sfence();
#endif
  }

 private:
  scalar_t* out_;
  int64_t C_;
  bool stream_;
  scalar_t* row_;
};

// Every row is handled one channel group at a time (no groups: one group of C channels with
// r = 1), in one sweep over the group's span while it is in cache. kSpan: the channels per
// group as a compile-time constant (see with_span), or 0 to read C / groups at run time.
template <typename scalar_t, bool kMask, bool kSums, bool kOut, int64_t kSpan>
void forward_impl(const scalar_t* xp, int64_t N, int64_t C, int64_t groups, double eps_d,
                  const ForwardSweep<at::opmath_type<scalar_t>>& s, scalar_t* yp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = groups == 0 ? 1 : groups;
  const int64_t cg = kSpan ? kSpan : C / G;
  const acc_t eps = static_cast<acc_t>(eps_d), inv_cg = acc_t(1) / static_cast<acc_t>(cg);
  const acc_t* mp = s.mask;
  const acc_t* __restrict__ sc = s.scale;
  const acc_t* __restrict__ sh = s.shift;
  acc_t* rp = s.r;
  // parts: token sum of z^2, and (with a mask, where asked for) the all-row sum of z^2
  const bool all_rows = kMask && s.all_sq != nullptr;
  const BlockSums<acc_t> blocks(N, C, kSums ? (all_rows ? 2 : 1) : 0);

  at::parallel_for(0, blocks.count(), 1, [&](int64_t b0, int64_t b1) {
    OutputRows<scalar_t> out(yp, N, C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      acc_t* block = blocks.start(blk);
      for (int64_t n = blocks.first(blk), end = blocks.end(blk); n < end; ++n) {
        const acc_t mn = kMask ? mp[n] : acc_t(1);
        acc_t* rn = groups ? rp + n * G : nullptr;
        if (groups) {  // all the row's factors first, so that their square roots overlap
          for (int64_t g = 0; g < G; ++g) {
            const scalar_t* xg = xp + n * C + g * cg;
            rn[g] = dot<acc_t>(xg, xg, cg);
          }
          for (int64_t g = 0; g < G; ++g) rn[g] = acc_t(1) / std::sqrt(rn[g] * inv_cg + eps);
        }
        for (int64_t g = 0; g < G; ++g) {
          const int64_t lo = g * cg;
          const scalar_t* __restrict__ xg = xp + n * C + lo;
          const acc_t rg = groups ? rn[g] : acc_t(1);
          acc_t* __restrict__ tok = kSums ? block + lo : nullptr;
          acc_t* __restrict__ all = kSums && all_rows ? block + blocks.stride() + lo : nullptr;
          scalar_t* __restrict__ yg = kOut ? out.row() + lo : nullptr;
#pragma omp simd
          for (int64_t c = 0; c < cg; ++c) {
            const acc_t z = static_cast<acc_t>(xg[c]) * rg;
            if (kSums) {
              tok[c] += kMask ? mn * z * z : z * z;
              if (all_rows) all[c] += z * z;
            }
            if (kOut) yg[c] = static_cast<scalar_t>(z * sc[lo + c] + sh[lo + c]);
          }
        }
        if (kOut) out.store(n);
      }
    }
  });
  blocks.reduce({s.token_sq, s.all_sq});
}

template <typename scalar_t, bool kMask, bool kSums, bool kGrad, int64_t kSpan>
void backward_impl(const scalar_t* dyp, const scalar_t* xp, int64_t N, int64_t C,
                   int64_t groups, const BackwardSweep<at::opmath_type<scalar_t>>& s,
                   scalar_t* dxp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = groups == 0 ? 1 : groups;
  const int64_t cg = kSpan ? kSpan : C / G;
  const acc_t* rp = s.r;
  const acc_t* mp = s.mask;
  const acc_t* __restrict__ ap = s.a;
  const acc_t* __restrict__ bp = s.b;
  const bool b_all_rows = s.b_all_rows, token_rows = kMask && s.token_dz != nullptr;
  // parts: token sum of dy z (computed where asked for), all-row sum of dy z, all-row sum of dy
  const BlockSums<acc_t> blocks(N, C, kSums ? 3 : 0);

  at::parallel_for(0, blocks.count(), 1, [&](int64_t b0, int64_t b1) {
    struct GroupDz;  // a group's dz, kept for its second sweep
    acc_t* dz_buffer = groups ? skewed_buffer<acc_t, GroupDz>(cg, kGroupSkew) : nullptr;
    OutputRows<scalar_t> out(dxp, N, C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      acc_t* block = blocks.start(blk);
      for (int64_t n = blocks.first(blk), end = blocks.end(blk); n < end; ++n) {
        const acc_t mn = kMask ? mp[n] : acc_t(1);
        const acc_t w = b_all_rows ? acc_t(1) : mn;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t lo = g * cg;
          const scalar_t* __restrict__ xg = xp + n * C + lo;
          const scalar_t* __restrict__ dyg = dyp + n * C + lo;
          const acc_t rg = groups ? rp[n * G + g] : acc_t(1);
          acc_t* __restrict__ tok = kSums ? block + lo : nullptr;
          acc_t* __restrict__ all = kSums ? block + blocks.stride() + lo : nullptr;
          acc_t* __restrict__ dsum = kSums ? block + 2 * blocks.stride() + lo : nullptr;
          scalar_t* __restrict__ dxg = kGrad ? out.row() + lo : nullptr;
          // One sweep for the sums and dz = a * dy - w * b * z; with groups, dz is kept for
          // dx = r (dz - z q), q = mean(dz * z) = r mean(dz * x), and a second sweep.
          acc_t* __restrict__ dzg = dz_buffer;
          const acc_t* __restrict__ ag = kGrad ? ap + lo : nullptr;
          const acc_t* __restrict__ bg = kGrad ? bp + lo : nullptr;
#pragma omp simd
          for (int64_t c = 0; c < cg; ++c) {
            const acc_t z = static_cast<acc_t>(xg[c]) * rg;
            const acc_t d = static_cast<acc_t>(dyg[c]);
            if (kSums) {
              all[c] += d * z;
              if (token_rows) tok[c] += mn * d * z;
              dsum[c] += d;
            }
            if (kGrad) {
              const acc_t dz = ag[c] * d - w * bg[c] * z;
              if (groups) dzg[c] = dz;
              else dxg[c] = static_cast<scalar_t>(dz);
            }
          }
          if (kGrad && groups) {
            const acc_t q = rg * dot<acc_t>(dzg, xg, cg) / acc_t(cg);
#pragma omp simd
            for (int64_t c = 0; c < cg; ++c)
              dxg[c] = static_cast<scalar_t>(rg * (dzg[c] - static_cast<acc_t>(xg[c]) * rg * q));
          }
        }
        if (kGrad) out.store(n);
      }
    }
  });
  blocks.reduce({s.token_dz, s.all_dz, s.dy_sum});
}

// Checks a pass's input, (..., C) with C > 0, contiguous, on the CPU; returns its rows.
int64_t check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "powernorm_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() >= 2 && t.size(-1) > 0 && t.is_contiguous(), "powernorm_cpu: ", name,
              " must be a contiguous (..., features) tensor, got shape ", t.sizes());
  return t.numel() / t.size(-1);
}

void check_groups(int64_t groups, int64_t C) {
  TORCH_CHECK(groups >= 0 && (groups == 0 || C % groups == 0), "powernorm_cpu: groups=", groups,
              " must be 0 or divide the ", C, " features");
}

void check_output(const Tensor& out, const Tensor& x, const char* name) {
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.is_contiguous() && out.device().is_cpu(),
              "powernorm_cpu: ", name, " must be a contiguous CPU tensor like x");
}

// Calls f with std::integral_constant<int64_t, span>: span the channels per group where the
// input is float and that is 32, 64 or 128 (group_num is the number of attention heads, and
// these are the head sizes of fairseq's transformers), else 0. With the span a constant the
// compiler lays out each group's short loops without run-time trip counts: the group-scaled
// passes are about a quarter faster, with the same results (benchmarks/README.md).
template <typename scalar_t, typename F>
void with_span(int64_t groups, int64_t C, F&& f) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    const int64_t span = groups ? C / groups : 0;
    if (span == 32) return f(std::integral_constant<int64_t, 32>());
    if (span == 64) return f(std::integral_constant<int64_t, 64>());
    if (span == 128) return f(std::integral_constant<int64_t, 128>());
  }
  f(std::integral_constant<int64_t, 0>());
}

// Dispatches a kernel over the input dtype (those whose accumulation type is A), its group
// span and the three compile-time switches.
#define POWERNORM_DISPATCH(A, DTYPE, GROUPS, C, B1, B2, B3, KERNEL, ...)                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, "powernorm_cpu", [&] {      \
    if constexpr (!std::is_same<at::opmath_type<scalar_t>, A>::value) {                       \
      TORCH_CHECK(false, "powernorm_cpu: ", DTYPE, " input needs ",                           \
                  c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value, " statistics"); \
    } else {                                                                                  \
      with_span<scalar_t>(GROUPS, C, [&](auto span) {                                         \
        constexpr int64_t S = decltype(span)::value;                                          \
        if (B1 && B2 && B3) KERNEL<scalar_t, true, true, true, S>(__VA_ARGS__);               \
        else if (B1 && B2) KERNEL<scalar_t, true, true, false, S>(__VA_ARGS__);               \
        else if (B1 && B3) KERNEL<scalar_t, true, false, true, S>(__VA_ARGS__);               \
        else if (B1) KERNEL<scalar_t, true, false, false, S>(__VA_ARGS__);                    \
        else if (B2 && B3) KERNEL<scalar_t, false, true, true, S>(__VA_ARGS__);               \
        else if (B2) KERNEL<scalar_t, false, true, false, S>(__VA_ARGS__);                    \
        else if (B3) KERNEL<scalar_t, false, false, true, S>(__VA_ARGS__);                    \
      });                                                                                     \
    }                                                                                         \
  })

template <typename A>
A* data_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<A>() : nullptr;
}

void check_vector(const c10::optional<Tensor>& t, int64_t len, at::ScalarType acc,
                  const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len && t->is_contiguous() &&
                  t->scalar_type() == acc && t->device().is_cpu(),
              "powernorm_cpu: ", name, " must be a contiguous CPU ", acc, " vector of length ",
              len, ", got ", t->scalar_type(), " of shape ", t->sizes());
}

// What both operators take: an (..., C) input, its groups and its token mask; returns the
// compute dtype.
at::ScalarType check_common(const Tensor& x, int64_t groups, const c10::optional<Tensor>& mask) {
  const int64_t N = check_rows(x, "x");
  check_groups(groups, x.size(-1));
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_vector(mask, N, acc, "mask");
  return acc;
}

}  // namespace

template <typename A>
void forward_sweep(const Tensor& x, int64_t groups, double eps, const ForwardSweep<A>& s,
                   const Tensor& y) {
  const int64_t N = check_rows(x, "x"), C = x.size(-1);
  check_groups(groups, C);
  const bool sums = s.token_sq != nullptr, out = s.scale != nullptr;
  TORCH_CHECK(sums || out, "powernorm_cpu: a forward sweep with nothing to compute");
  TORCH_CHECK((s.scale != nullptr) == (s.shift != nullptr) && (groups == 0 || s.r != nullptr) &&
                  (s.all_sq == nullptr || (sums && s.mask != nullptr)),
              "powernorm_cpu: inconsistent forward sweep");
  if (out) check_output(y, x, "y");
  POWERNORM_DISPATCH(A, x.scalar_type(), groups, C, s.mask != nullptr, sums, out, forward_impl,
                     x.data_ptr<scalar_t>(), N, C, groups, eps, s,
                     out ? y.data_ptr<scalar_t>() : nullptr);
}

template <typename A>
void backward_sweep(const Tensor& dy, const Tensor& x, int64_t groups, const BackwardSweep<A>& s,
                    const Tensor& dx) {
  const int64_t N = check_rows(x, "x"), C = x.size(-1);
  check_groups(groups, C);
  check_rows(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "powernorm_cpu: dy must match x in shape and dtype");
  const bool sums = s.all_dz != nullptr, grad = s.a != nullptr;
  TORCH_CHECK(sums || grad, "powernorm_cpu: a backward sweep with nothing to compute");
  TORCH_CHECK((s.a != nullptr) == (s.b != nullptr) && (groups == 0 || s.r != nullptr) &&
                  (s.all_dz != nullptr) == (s.dy_sum != nullptr) &&
                  (s.token_dz == nullptr || (sums && s.mask != nullptr)),
              "powernorm_cpu: inconsistent backward sweep");
  if (grad) check_output(dx, x, "dx");
  POWERNORM_DISPATCH(A, x.scalar_type(), groups, C, s.mask != nullptr, sums, grad, backward_impl,
                     dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), N, C, groups, s,
                     grad ? dx.data_ptr<scalar_t>() : nullptr);
}

template void forward_sweep<float>(const Tensor&, int64_t, double, const ForwardSweep<float>&,
                                   const Tensor&);
template void forward_sweep<double>(const Tensor&, int64_t, double, const ForwardSweep<double>&,
                                    const Tensor&);
template void backward_sweep<float>(const Tensor&, const Tensor&, int64_t,
                                    const BackwardSweep<float>&, const Tensor&);
template void backward_sweep<double>(const Tensor&, const Tensor&, int64_t,
                                     const BackwardSweep<double>&, const Tensor&);

namespace {

// The operators, for PowerNorm's Python step (the C++ step calls the sweeps). Tensors a call
// does not compute are returned empty, each its own tensor: an operator's results must not
// alias one another for torch.compile to trace it (through the fake kernels that
// native_kernels.py registers, which state the same shapes).

// Returns (y, token sum of z^2, all-row sum of z^2, r). y is computed where scale and shift
// are given, the token sum where `sums` is true and the all-row sum where `all_rows` is true
// as well (without a mask the all-row sum is left empty: it equals the token sum), r
// (rows x groups) where groups > 0.
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& mask, int64_t groups,
                            double eps, const c10::optional<Tensor>& scale,
                            const c10::optional<Tensor>& shift, bool sums, bool all_rows) {
  const auto acc = check_common(x, groups, mask);
  const int64_t C = x.size(-1), N = x.numel() / C;
  check_vector(scale, C, acc, "scale");
  check_vector(shift, C, acc, "shift");
  TORCH_CHECK(scale.has_value() == shift.has_value(),
              "powernorm_cpu: give scale and shift together");
  const bool out = scale.has_value();
  TORCH_CHECK(sums || out, "powernorm_cpu.forward: nothing to compute");
  const auto opts = x.options().dtype(acc);
  all_rows = sums && mask.has_value() && all_rows;
  const Tensor y = out ? at::empty_like(x) : at::empty({0}, x.options());
  const Tensor r = at::empty({groups ? N : 0, groups}, opts);
  const Tensor token = at::empty({sums ? C : 0}, opts);
  const Tensor all = at::empty({all_rows ? C : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "powernorm_cpu_forward", [&] {
    ForwardSweep<scalar_t> s;
    s.mask = data_or_null<scalar_t>(mask);
    s.scale = data_or_null<scalar_t>(scale);
    s.shift = data_or_null<scalar_t>(shift);
    s.r = groups ? r.data_ptr<scalar_t>() : nullptr;
    s.token_sq = sums ? token.data_ptr<scalar_t>() : nullptr;
    s.all_sq = all_rows ? all.data_ptr<scalar_t>() : nullptr;
    forward_sweep<scalar_t>(x, groups, eps, s, y);
  });
  return {y, token, all, r};
}

// Returns (dx, token sum of dy z, all-row sum of dy z, all-row sum of dy). dx is computed where
// a and b are given, the sums where `sums` is true, the token sum only where `token_rows` is
// true and there is a mask as well (without one it is the all-row sum).
std::vector<Tensor> backward(const Tensor& dy, const Tensor& x, const c10::optional<Tensor>& r,
                             const c10::optional<Tensor>& mask, int64_t groups,
                             const c10::optional<Tensor>& a, const c10::optional<Tensor>& b,
                             bool b_all_rows, bool sums, bool token_rows) {
  const auto acc = check_common(x, groups, mask);
  const int64_t C = x.size(-1), N = x.numel() / C;
  check_vector(a, C, acc, "a");
  check_vector(b, C, acc, "b");
  TORCH_CHECK(a.has_value() == b.has_value(), "powernorm_cpu: give a and b together");
  TORCH_CHECK(groups == 0 || (r.has_value() && r->is_contiguous() && r->scalar_type() == acc &&
                              r->numel() == N * groups),
              "powernorm_cpu: groups > 0 needs the forward's r of shape (rows, groups)");
  const bool grad = a.has_value();
  TORCH_CHECK(sums || grad, "powernorm_cpu.backward: nothing to compute");
  const auto opts = x.options().dtype(acc);
  token_rows = sums && token_rows && mask.has_value();
  const Tensor dx = grad ? at::empty_like(x) : at::empty({0}, x.options());
  const Tensor token = at::empty({token_rows ? C : 0}, opts);
  const Tensor all = at::empty({sums ? C : 0}, opts);
  const Tensor dsum = at::empty({sums ? C : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "powernorm_cpu_backward", [&] {
    BackwardSweep<scalar_t> s;
    s.r = groups ? r->data_ptr<scalar_t>() : nullptr;
    s.mask = data_or_null<scalar_t>(mask);
    s.a = data_or_null<scalar_t>(a);
    s.b = data_or_null<scalar_t>(b);
    s.b_all_rows = b_all_rows;
    s.token_dz = token_rows ? token.data_ptr<scalar_t>() : nullptr;
    s.all_dz = sums ? all.data_ptr<scalar_t>() : nullptr;
    s.dy_sum = sums ? dsum.data_ptr<scalar_t>() : nullptr;
    backward_sweep<scalar_t>(dy, x, groups, s, dx);
  });
  return {dx, token, all, dsum};
}

}  // namespace
}  // namespace powernorm_plugin

// Registered as the operators torch.ops.powernorm_plugin.forward / .backward, CPU kernels.
TORCH_LIBRARY(powernorm_plugin, m) {
  m.def("forward(Tensor x, Tensor? mask, int groups, float eps, Tensor? scale, Tensor? shift, "
        "bool sums, bool all_rows) -> Tensor[]");
  m.def("backward(Tensor dy, Tensor x, Tensor? r, Tensor? mask, int groups, Tensor? a, "
        "Tensor? b, bool b_all_rows, bool sums, bool token_rows) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(powernorm_plugin, CPU, m) {
  m.impl("forward", &powernorm_plugin::forward);
  m.impl("backward", &powernorm_plugin::backward);
}
