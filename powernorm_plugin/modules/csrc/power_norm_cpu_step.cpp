// PowerNorm's fused training step on the CPU (see power_norm_fused.h): the one-sweep passes of
// power_norm_cpu.cpp, and the per-feature statistics of power_norm_columns.h in plain loops
// over the C features. A step on tensor operators runs a few dozen of those on C-long
// vectors, each costing microseconds of dispatch, which at fairseq's sizes is more than the
// loops' arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>

#include "power_norm_cpu.h"
#include "power_norm_fused.h"

namespace powernorm_plugin {
namespace {

using at::Tensor;

bool supports(const Tensor& x, const Tensor& running_phi, const Tensor& running_nu,
              int64_t /*groups*/, int64_t /*count*/) {
  return x.is_cpu() && buffers_fit(x, running_phi, running_nu);
}

// scale = gamma * inv, shift = beta (1 and 0 without them): the affine map of the output.
template <typename A>
void affine(const A* w, const A* b, const A* inv, int64_t C, A* scale, A* shift) {
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = (w != nullptr ? w[c] : A(1)) * inv[c];
    shift[c] = b != nullptr ? b[c] : A(0);
  }
}

// Whether every v[c] is finite (a loop without an early exit, so that it vectorizes).
template <typename A>
bool all_finite(const A* v, int64_t C) {
  int ok = 1;
  for (int64_t c = 0; c < C; ++c) ok &= int(finite_(v[c]));
  return ok != 0;
}

// The step's per-feature scratch vectors (n of C entries each), kept from call to call: only
// what the backward keeps, or the caller gets, is a tensor.
struct StepScratch;
template <typename A>
A* scratch(int64_t n, int64_t C) {
  return kept_buffer<A, StepScratch>(n * C);
}

template <typename A>
FusedForward forward_impl(const Tensor& x, const Tensor& m, const Tensor& w, const Tensor& b,
                          Tensor& running_phi, Tensor& num_steps, int64_t mode, int64_t groups,
                          double eps, double count, bool warm, bool use_batch, int64_t step,
                          double alpha_fwd) {
  const int64_t C = x.size(-1), N = x.numel() / C;
  const auto opts = running_phi.options();
  const bool all_rows = mode == kOfficial, has_mask = m.defined();
  const A eps_a = static_cast<A>(eps);
  FusedForward out;
  out.inv = at::empty({C}, opts);
  A* phi = running_phi.data_ptr<A>();
  A* inv = out.inv.data_ptr<A>();
  A* work = scratch<A>(4, C);  // scale, shift, token sum of z^2, psi_B^2 (unless kept)
  A *scale = work, *shift = work + C, *token_sq = work + 2 * C;
  if (groups) out.r = at::empty({N, groups}, opts);
  if (all_rows && count > 0) out.all_sq = at::empty({C}, opts);
  // the all-row sum (official): its own with a mask, else the token sum
  A* all_sq = all_rows && has_mask && count > 0 ? out.all_sq.data_ptr<A>() : nullptr;
  ForwardSweep<A> sweep;
  sweep.mask = ptr<A>(m);
  sweep.r = ptr<A>(out.r);
  if (count > 0) {
    sweep.token_sq = token_sq;
    sweep.all_sq = all_sq;
  }
  if (use_batch && count > 0) {  // the scale needs this batch's psi_B: sums first, output second
    forward_sweep<A>(x, groups, eps, sweep, Tensor());
  } else {  // psi_{t-1}: running_phi as it is before this call's update (a batch of padding
            // only has no psi_B, and then nothing moves)
    for (int64_t c = 0; c < C; ++c) inv[c] = rsqrt_(phi[c] + eps_a);
    affine<A>(ptr<A>(w), ptr<A>(b), inv, C, scale, shift);
    sweep.scale = scale;
    sweep.shift = shift;
    out.y = at::empty_like(x);
    forward_sweep<A>(x, groups, eps, sweep, out.y);
  }
  if (count == 0) return out;
  if (all_rows && !has_mask) std::copy(token_sq, token_sq + C, out.all_sq.data_ptr<A>());
  if (mode == kPaper) out.psi_b = at::empty({C}, opts);  // the paper's backward keeps it
  if (all_rows) out.inv_b = at::empty({C}, opts);
  A* psi_b = mode == kPaper ? out.psi_b.data_ptr<A>() : work + 3 * C;
  A* inv_b = all_rows ? out.inv_b.data_ptr<A>() : nullptr;
  // (one loop for each result, none with a branch inside: each vectorizes)
  for (int64_t c = 0; c < C; ++c) psi_b[c] = token_sq[c] / static_cast<A>(count);
  const bool ok = all_finite(psi_b, C);
  if (use_batch) {
    for (int64_t c = 0; c < C; ++c) inv[c] = rsqrt_(psi_b[c] + eps_a);
  }
  if (inv_b != nullptr) {
    for (int64_t c = 0; c < C; ++c) inv_b[c] = rsqrt_(psi_b[c] + eps_a);
  }
  const A mean_rate = static_cast<A>(warm ? 1.0 / static_cast<double>(step) : 0.0);
  const A ema_rate = static_cast<A>(1.0 - alpha_fwd);
  if (ok) {
    for (int64_t c = 0; c < C; ++c) {
      phi[c] = moved_phi(phi[c], psi_b[c], warm, mode, mean_rate, ema_rate);
    }
  }
  num_steps.data_ptr<int64_t>()[0] += ok ? 1 : 0;
  bump_version(running_phi);
  bump_version(num_steps);
  if (!ok) out.ok = at::scalar_tensor(false, x.options().dtype(at::kBool));
  if (use_batch) {
    affine<A>(ptr<A>(w), ptr<A>(b), inv, C, scale, shift);
    ForwardSweep<A> output;
    output.mask = sweep.mask;
    output.scale = scale;
    output.shift = shift;
    output.r = sweep.r;  // written again, with the same factors
    out.y = at::empty_like(x);
    forward_sweep<A>(x, groups, eps, output, out.y);
  }
  return out;
}

template <typename A>
FusedBackward backward_impl(const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& m,
                            const Tensor& w, const Tensor& inv_t, const Tensor& psi_b_t,
                            const Tensor& all_sq_t, const Tensor& inv_b_t, Tensor& running_nu,
                            int64_t mode, int64_t groups, double count_d, double rows_d,
                            double alpha_bkw, bool has_bias) {
  const int64_t C = x.size(-1);
  const auto opts = inv_t.options();
  const A *gamma = ptr<A>(w), *inv = inv_t.data_ptr<A>(), *inv_b = ptr<A>(inv_b_t);
  const A *psi_b = ptr<A>(psi_b_t), *all_sq = ptr<A>(all_sq_t);
  const A count = static_cast<A>(count_d), rows = static_cast<A>(rows_d);
  A* nu = running_nu.data_ptr<A>();
  auto gamma_at = [&](int64_t c) { return gamma != nullptr ? gamma[c] : A(1); };
  FusedBackward out;
  if (gamma != nullptr) out.grad_w = at::empty({C}, opts);
  if (has_bias) out.grad_b = at::empty({C}, opts);
  A* work = scratch<A>(5, C);  // a, b, then the sums of dy z over tokens and rows, and of dy
  A *a = work, *b = work + C, *token_dz = work + 2 * C, *sum_dz = work + 3 * C;
  BackwardSweep<A> sweep;  // the sums, and with a and b the input gradient
  sweep.r = ptr<A>(r);
  sweep.mask = ptr<A>(m);
  sweep.all_dz = sum_dz;
  sweep.dy_sum = has_bias ? out.grad_b.data_ptr<A>() : work + 4 * C;
  auto coefficients = [&](const A* b_given) {  // dz = a dy - b m z, with nu_{t-1}
    for (int64_t c = 0; c < C; ++c) {
      dz_coefficients(mode, gamma_at(c), inv[c], inv_b != nullptr ? inv_b[c] : A(0), nu[c],
                      b_given != nullptr ? b_given[c] : A(0), a + c, b + c);
    }
  };
  out.dx = at::empty_like(x);
  if (count == 0) {  // no tokens: dz = gamma inv dy, and nu does not move
    for (int64_t c = 0; c < C; ++c) {
      a[c] = gamma_at(c) * inv[c];
      b[c] = A(0);
    }
    sweep.a = a;
    sweep.b = b;
    backward_sweep<A>(dy, x, groups, sweep, out.dx);
  } else if (mode == kVanilla) {  // PN-V's b needs the sums: sums first, input gradient second
    backward_sweep<A>(dy, x, groups, sweep, Tensor());
    A* b_given = token_dz;  // not summed in this mode: its space holds b
    for (int64_t c = 0; c < C; ++c) b_given[c] = vanilla_b(gamma_at(c), inv[c], sum_dz[c], count);
    coefficients(b_given);
    BackwardSweep<A> grad;
    grad.r = sweep.r;
    grad.mask = sweep.mask;
    grad.a = a;
    grad.b = b;
    backward_sweep<A>(dy, x, groups, grad, out.dx);
  } else {
    const bool token_rows = mode == kPaper;  // Lambda over tokens: the token sum of dy z
    coefficients(nullptr);
    sweep.a = a;
    sweep.b = b;
    sweep.b_all_rows = mode == kOfficial;
    if (token_rows && m.defined()) sweep.token_dz = token_dz;
    backward_sweep<A>(dy, x, groups, sweep, out.dx);
    const A* tok = sweep.token_dz != nullptr ? token_dz : sum_dz;
    const A rate = static_cast<A>(1.0 - alpha_bkw);
    const A* stat = token_rows ? psi_b : all_sq;  // paper: psi_B^2; official: sum of z^2
    for (int64_t c = 0; c < C; ++c) {
      nu[c] = moved_nu(mode, nu[c], gamma_at(c), inv[c], stat[c], stat[c], tok[c], sum_dz[c],
                       count, rows, rate);
    }
    bump_version(running_nu);
  }
  if (gamma != nullptr) {
    A* gw = out.grad_w.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) gw[c] = sum_dz[c] * inv[c];
  }
  return out;
}

FusedForward forward_step(const Tensor& x, const Tensor& m, const Tensor& w, const Tensor& b,
                          Tensor& running_phi, Tensor& num_steps, int64_t mode, int64_t groups,
                          double eps, double count, bool warm, bool use_batch, int64_t step,
                          double alpha_fwd) {
  FusedForward out;
  AT_DISPATCH_FLOATING_TYPES(running_phi.scalar_type(), "powernorm_cpu_step_forward", [&] {
    out = forward_impl<scalar_t>(x, m, w, b, running_phi, num_steps, mode, groups, eps, count,
                                 warm, use_batch, step, alpha_fwd);
  });
  return out;
}

FusedBackward backward_step(const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& m,
                            const Tensor& w, const Tensor& inv, const Tensor& psi_b,
                            const Tensor& all_sq, const Tensor& inv_b, Tensor& running_nu,
                            int64_t mode, int64_t groups, double count, double rows,
                            double alpha_bkw, bool has_bias) {
  FusedBackward out;
  AT_DISPATCH_FLOATING_TYPES(inv.scalar_type(), "powernorm_cpu_step_backward", [&] {
    out = backward_impl<scalar_t>(dy, x, r, m, w, inv, psi_b, all_sq, inv_b, running_nu, mode,
                                  groups, count, rows, alpha_bkw, has_bias);
  });
  return out;
}

}  // namespace

const FusedStep& cpu_step() {
  static const FusedStep step{&supports, &forward_step, &backward_step};
  return step;
}

}  // namespace powernorm_plugin
