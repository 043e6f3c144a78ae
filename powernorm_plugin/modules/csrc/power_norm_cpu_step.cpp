// PowerNorm's fused training step on the CPU (see power_norm_fused.h): the one-sweep passes of
// power_norm_cpu.cpp, and the per-feature statistics of power_norm_columns.h in plain loops
// over the C features. A step on tensor operators runs a few dozen of those on C-long
// vectors, each costing microseconds of dispatch, which at fairseq's sizes is more than the
// loops' arithmetic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <vector>

#include "power_norm_cpu.h"
#include "power_norm_fused.h"

namespace powernorm_plugin {
namespace {

using at::Tensor;
using c10::optional;

optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : c10::nullopt;
}

bool supports(const Tensor& x, const Tensor& running_phi, const Tensor& running_nu,
              int64_t /*count*/) {
  return x.is_cpu() && buffers_fit(x, running_phi, running_nu);
}

// scale = gamma * inv, shift = beta (1 and 0 without them): the affine map of the output.
template <typename A>
void affine(const A* w, const A* b, const A* inv, int64_t C, Tensor& scale, Tensor& shift) {
  A* sc = scale.data_ptr<A>();
  A* sh = shift.data_ptr<A>();
  for (int64_t c = 0; c < C; ++c) {
    sc[c] = (w != nullptr ? w[c] : A(1)) * inv[c];
    sh[c] = b != nullptr ? b[c] : A(0);
  }
}

template <typename A>
FusedForward forward_impl(const Tensor& x, const Tensor& m, const Tensor& w, const Tensor& b,
                          Tensor& running_phi, Tensor& num_steps, int64_t mode, int64_t groups,
                          double eps, double count, bool warm, bool use_batch, int64_t step,
                          double alpha_fwd) {
  const int64_t C = x.size(1);
  const auto opts = running_phi.options();
  const bool all_rows = mode == kOfficial;
  const A eps_a = static_cast<A>(eps);
  FusedForward out;
  out.inv = at::empty({C}, opts);
  A* phi = running_phi.data_ptr<A>();
  A* inv = out.inv.data_ptr<A>();
  Tensor scale = at::empty({C}, opts), shift = at::empty({C}, opts);
  std::vector<Tensor> pass;
  if (use_batch && count > 0) {  // the scale needs this batch's psi_B: sums first, output second
    pass = forward(x, maybe(m), groups, eps, c10::nullopt, c10::nullopt, true, all_rows);
  } else {  // psi_{t-1}: running_phi as it is before this call's update (a batch of padding
            // only has no psi_B, and then nothing moves)
    for (int64_t c = 0; c < C; ++c) inv[c] = rsqrt_(phi[c] + eps_a);
    affine<A>(ptr<A>(w), ptr<A>(b), inv, C, scale, shift);
    pass = forward(x, maybe(m), groups, eps, scale, shift, count > 0, all_rows);
    out.y = pass[0];
  }
  if (groups) out.r = pass[3];
  if (count == 0) {
    out.ok = at::scalar_tensor(true, x.options().dtype(at::kBool));
    return out;
  }
  out.psi_b = at::empty({C}, opts);
  if (all_rows) out.inv_b = at::empty({C}, opts);
  A* psi_b = out.psi_b.data_ptr<A>();
  A* inv_b = all_rows ? out.inv_b.data_ptr<A>() : nullptr;
  if (all_rows) out.all_sq = m.defined() ? pass[2] : pass[1];
  const A* token_sq = pass[1].data_ptr<A>();
  bool ok = true;
  for (int64_t c = 0; c < C; ++c) {
    psi_b[c] = token_sq[c] / static_cast<A>(count);
    ok = ok && finite_(psi_b[c]);
  }
  const A mean_rate = static_cast<A>(warm ? 1.0 / static_cast<double>(step) : 0.0);
  const A ema_rate = static_cast<A>(1.0 - alpha_fwd);
  for (int64_t c = 0; c < C; ++c) {
    if (use_batch) inv[c] = rsqrt_(psi_b[c] + eps_a);
    if (inv_b != nullptr) inv_b[c] = rsqrt_(psi_b[c] + eps_a);
    if (ok) phi[c] = moved_phi(phi[c], psi_b[c], warm, mode, mean_rate, ema_rate);
  }
  num_steps.data_ptr<int64_t>()[0] += ok ? 1 : 0;
  bump_version(running_phi);
  bump_version(num_steps);
  out.ok = at::scalar_tensor(ok, x.options().dtype(at::kBool));
  if (use_batch) {
    affine<A>(ptr<A>(w), ptr<A>(b), inv, C, scale, shift);
    out.y = forward(x, maybe(m), groups, eps, scale, shift, false, false)[0];
  }
  return out;
}

template <typename A>
FusedBackward backward_impl(const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& m,
                            const Tensor& w, const Tensor& inv_t, const Tensor& psi_b_t,
                            const Tensor& all_sq_t, const Tensor& inv_b_t, Tensor& running_nu,
                            int64_t mode, int64_t groups, double count_d, double rows_d,
                            double alpha_bkw, bool has_bias) {
  const int64_t C = x.size(1);
  const auto opts = inv_t.options();
  const A *gamma = ptr<A>(w), *inv = inv_t.data_ptr<A>(), *inv_b = ptr<A>(inv_b_t);
  const A *psi_b = ptr<A>(psi_b_t), *all_sq = ptr<A>(all_sq_t);
  const A count = static_cast<A>(count_d), rows = static_cast<A>(rows_d);
  A* nu = running_nu.data_ptr<A>();
  auto gamma_at = [&](int64_t c) { return gamma != nullptr ? gamma[c] : A(1); };
  Tensor a = at::empty({C}, opts), b = at::empty({C}, opts);
  auto coefficients = [&](const A* b_given) {  // dz = a dy - b m z, with nu_{t-1}
    A *pa = a.data_ptr<A>(), *pb = b.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      dz_coefficients(mode, gamma_at(c), inv[c], inv_b != nullptr ? inv_b[c] : A(0), nu[c],
                      b_given != nullptr ? b_given[c] : A(0), pa + c, pb + c);
    }
  };
  FusedBackward out;
  std::vector<Tensor> pass;
  if (count == 0) {  // no tokens: dz = gamma inv dy, and nu does not move
    A *pa = a.data_ptr<A>(), *pb = b.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) {
      pa[c] = gamma_at(c) * inv[c];
      pb[c] = A(0);
    }
    pass = backward(dy, x, maybe(r), maybe(m), groups, a, b, false, true, mode == kPaper);
    out.dx = pass[0];
  } else if (mode == kVanilla) {  // PN-V's b needs the sums: sums first, input gradient second
    pass = backward(dy, x, maybe(r), maybe(m), groups, c10::nullopt, c10::nullopt, false, true,
                    false);
    Tensor b_given = at::empty({C}, opts);
    const A* sum_dz = pass[2].data_ptr<A>();
    A* bg = b_given.data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) bg[c] = vanilla_b(gamma_at(c), inv[c], sum_dz[c], count);
    coefficients(bg);
    out.dx = backward(dy, x, maybe(r), maybe(m), groups, a, b, false, false, false)[0];
  } else {
    const bool token_rows = mode == kPaper;  // Lambda over tokens: the token sum of dy z
    coefficients(nullptr);
    pass = backward(dy, x, maybe(r), maybe(m), groups, a, b, /*b_all_rows=*/mode == kOfficial,
                    true, token_rows);
    out.dx = pass[0];
    const A* sum_dz = pass[2].data_ptr<A>();
    const A* token_dz = token_rows ? pass[1].data_ptr<A>() : sum_dz;
    const A rate = static_cast<A>(1.0 - alpha_bkw);
    for (int64_t c = 0; c < C; ++c) {
      nu[c] = moved_nu(mode, nu[c], gamma_at(c), inv[c], psi_b != nullptr ? psi_b[c] : A(0),
                       all_sq != nullptr ? all_sq[c] : A(0), token_dz[c], sum_dz[c], count,
                       rows, rate);
    }
    bump_version(running_nu);
  }
  if (gamma != nullptr) {
    out.grad_w = at::empty({C}, opts);
    A* gw = out.grad_w.data_ptr<A>();
    const A* sum_dz = pass[2].data_ptr<A>();
    for (int64_t c = 0; c < C; ++c) gw[c] = sum_dz[c] * inv[c];
  }
  if (has_bias) out.grad_b = pass[3];
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
