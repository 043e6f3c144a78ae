// PowerNorm's training call as one C++ autograd function: the `native` backend's step.
//
// The arithmetic is that of _forward_math and _backward_math in power_norm.py, whose
// docstring states the equations; per feature, over the N token rows z_n of the batch:
//
//   forward   psi_B^2 = (1/N) sum_n z_n^2,   y = gamma z / sqrt(psi^2 + eps) + beta,
//             psi^2 <- a_f psi^2 + (1 - a_f) psi_B^2   (warm-up: the cumulative mean)
//   backward  dz = a dy - b m z    (a, b per feature; m_n = 1 on token rows, 0 on padding)
//             nu <- nu + (1 - a_b) (Lambda - nu Gamma)
//
// with psi^2 the statistic before the update (paper and official modes after warm-up), or
// psi_B^2 itself (warm-up, PN-V). Running the whole call here, instead of as a Python
// autograd.Function around a few dozen small tensor ops, removes most of the per-call host
// time: on a GPU that host time, not the device's, is what a normalization layer costs.
//
// A call runs as a fused step (power_norm_fused.h): on the CPU the one-sweep kernels of
// power_norm_cpu.cpp with the per-feature statistics in plain loops, on a GPU the kernels of
// power_norm_cuda.cu. Where neither applies (a GPU library built without CUDA, a batch of
// padding only on a GPU, `sweeps` off) it runs on ATen's operators, one kernel each. The running
// buffers are updated in place: psi^2 and the step count in the forward, nu in the backward.
// A non-finite psi_B^2 leaves psi^2 and the count unchanged (checked on the device, so no
// wait); the caller reads the returned flag and reports it.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

#include "power_norm_fused.h"

namespace powernorm_plugin {

const FusedStep*& cuda_step() {
  static const FusedStep* step = nullptr;
  return step;
}

namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Mode parse_mode(const std::string& mode) {
  if (mode == "paper") return kPaper;
  if (mode == "official") return kOfficial;
  if (mode == "vanilla") return kVanilla;
  TORCH_CHECK(false, "PowerNorm mode must be one of paper, official, vanilla; got '", mode, "'");
}

Tensor as(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// ----- the two passes of kernels.py's docstring ------------------------------------------

struct ForwardPass {
  Tensor y, token_sq, all_sq, r;  // undefined where not asked for
};

struct BackwardPass {
  Tensor dx, token_dz, all_dz, dy_sum;
};

// z = x (or x * r with groups); y = scale * z + shift where scale is given; with `sums`, the
// token-row sum of z^2 and (with `all_rows`) the all-row sum.
ForwardPass forward_pass(const Tensor& x, const Tensor& m, int64_t groups, double eps,
                         const Tensor& scale, const Tensor& shift, bool sums, bool all_rows) {
  ForwardPass out;
  const int64_t n = x.size(0), c = x.size(1);
  Tensor z = as(x, compute_dtype(x));
  if (groups) {
    Tensor zv = z.view({n, groups, c / groups});
    Tensor r = at::rsqrt(zv.square().mean(-1, /*keepdim=*/true).add_(eps));
    z = (zv * r).view({n, c});
    out.r = r.view({n, groups});
  }
  if (scale.defined()) out.y = as(at::addcmul(shift, z, scale), x.scalar_type());
  if (sums) {
    Tensor sq = z.square();
    out.token_sq = m.defined() ? at::mv(sq.t(), m) : sq.sum(0);
    if (all_rows) out.all_sq = m.defined() ? sq.sum(0) : out.token_sq;
  }
  return out;
}

// dz = a dy - b m z (m = 1 on every row with b_all_rows) and dx = dz, or its gradient through
// the group scaling, where a and b are given; with `sums`, the token-row (with `token_rows`)
// and all-row sums of dy z and the all-row sum of dy.
BackwardPass backward_pass(const Tensor& dy, const Tensor& x, const Tensor& r, const Tensor& m,
                           int64_t groups, const Tensor& a, const Tensor& b, bool b_all_rows,
                           bool sums, bool token_rows) {
  BackwardPass out;
  const int64_t n = x.size(0), c = x.size(1);
  Tensor z = as(x, compute_dtype(x));
  if (groups) z = (z.view({n, groups, c / groups}) * r.unsqueeze(-1)).view({n, c});
  Tensor dyc = as(dy, z.scalar_type());
  if (sums) {
    Tensor prod = dyc * z;
    out.all_dz = prod.sum(0);
    if (token_rows) out.token_dz = m.defined() ? at::mv(prod.t(), m) : out.all_dz;
    out.dy_sum = dyc.sum(0);
  }
  if (a.defined()) {
    Tensor mz = m.defined() && !b_all_rows ? z * m.unsqueeze(1) : z;
    Tensor dz = at::addcmul(dyc * a, mz, b, /*value=*/-1);
    if (groups) {  // dx = r (dz - z mean_g(dz z)) for z = x r
      Tensor zv = z.view({n, groups, c / groups}), dzv = dz.view({n, groups, c / groups});
      Tensor q = (dzv * zv).mean(-1, /*keepdim=*/true);
      dz = ((dzv - zv * q) * r.unsqueeze(-1)).view({n, c});
    }
    out.dx = as(dz, dy.scalar_type());
  }
  return out;
}

// ----- the training call -----------------------------------------------------------------

// What a call needs besides its differentiable inputs. `ok` (psi_B^2 finite) is set by the
// forward for the caller; undefined for a batch without tokens.
struct StepOptions {
  Tensor running_phi, running_nu, num_steps;
  Mode mode;
  double eps, alpha_fwd, alpha_bkw;
  int64_t groups, count, rows, step;
  bool warm, use_batch, sweeps;
  Tensor ok;
};

// psi^2, in place, moved to the cumulative mean of psi_B^2 during warm-up (1/step of the
// way), by the EMA a_f psi^2 + (1 - a_f) psi_B^2 after; the official mode applies the EMA
// during warm-up as well, after the mean.
void move_running_phi(Tensor& phi, const Tensor& psi_b, const StepOptions& o) {
  const Tensor target = as(psi_b, phi.scalar_type());
  if (o.warm) phi.lerp_(target, 1.0 / static_cast<double>(o.step));
  if (!o.warm || o.mode == kOfficial) phi.lerp_(target, 1.0 - o.alpha_fwd);
}

// Whether every element of `t` is finite, as a 0-d bool on t's device (no host wait):
// max() propagates NaN, and |NaN| < inf is false.
Tensor all_finite(const Tensor& t) {
  return at::abs(t.max()) < std::numeric_limits<double>::infinity();
}

// The saved tensors of a call: x, gamma, r, then the mode's statistics (paper: psi_B^2;
// official: the all-row sum of z^2 and 1/sqrt(psi_B^2 + eps)), then inv and the token weights.
// Tensors a call does not have are saved undefined.

// The forward on ATen's operators: y; sets o.ok and the saved tensors.
Tensor aten_forward(const Tensor& x, const Tensor& m, const optional<Tensor>& weight,
                    const optional<Tensor>& bias, StepOptions& o, variable_list& saved) {
  const auto cd = compute_dtype(x);
  const int64_t C = x.size(1);
  const Tensor w = weight ? as(*weight, cd) : at::ones({C}, x.options().dtype(cd));
  const Tensor b = bias ? as(*bias, cd) : at::zeros({C}, x.options().dtype(cd));
  const bool all_rows = o.mode == kOfficial;  // Gamma over every row: the all-row sum of z^2
  const Tensor phi = as(o.running_phi, cd);
  Tensor inv, y;
  ForwardPass f;
  if (o.use_batch) {  // the scale needs this batch's psi_B: sums first, output second
    f = forward_pass(x, m, o.groups, o.eps, Tensor(), Tensor(), true, all_rows);
  } else {  // psi_{t-1}: the statistic before this call's update
    inv = at::rsqrt(phi + o.eps);
    f = forward_pass(x, m, o.groups, o.eps, w * inv, b, true, all_rows);
    y = f.y;
  }
  Tensor psi_b;
  saved = {x, w, f.r};
  if (o.count > 0) {
    psi_b = f.token_sq / static_cast<double>(o.count);
    o.ok = all_finite(psi_b);
    move_running_phi(o.running_phi, at::where(o.ok, psi_b, phi), o);
    o.num_steps.add_(o.ok);
    if (o.mode == kPaper) saved.push_back(psi_b);
    if (o.mode == kOfficial) {
      saved.push_back(f.all_sq);
      saved.push_back(at::rsqrt(psi_b + o.eps));
    }
  }
  if (!y.defined()) {  // a batch of padding only has no psi_B: it takes psi_{t-1}
    inv = at::rsqrt((o.count > 0 ? psi_b : phi) + o.eps);
    y = forward_pass(x, m, o.groups, o.eps, w * inv, b, false, false).y;
  }
  saved.push_back(inv);
  saved.push_back(m);
  return y;
}

// The forward as a fused step: y; sets o.ok and the saved tensors, as aten_forward.
Tensor fused_forward(const FusedStep& fused, const Tensor& x, const Tensor& m,
                     const optional<Tensor>& weight, const optional<Tensor>& bias,
                     StepOptions& o, variable_list& saved) {
  const auto cd = compute_dtype(x);
  const Tensor w = weight ? as(*weight, cd) : Tensor();
  const Tensor b = bias ? as(*bias, cd) : Tensor();
  FusedForward f = fused.forward(x, m, w, b, o.running_phi, o.num_steps, o.mode, o.groups, o.eps,
                                 static_cast<double>(o.count), o.warm, o.use_batch, o.step,
                                 o.alpha_fwd);
  o.ok = f.ok;
  saved = {x, w, f.r};
  if (o.mode == kPaper) saved.push_back(f.psi_b);
  if (o.mode == kOfficial) {
    saved.push_back(f.all_sq);
    saved.push_back(f.inv_b);
  }
  saved.push_back(f.inv);
  saved.push_back(m);
  return f.y;
}

struct Gradients {
  Tensor dx, grad_w, grad_b;  // grad_w, grad_b in the compute dtype
};

// The backward on ATen's operators; moves nu in place.
Gradients aten_backward(const Tensor& dy, const variable_list& s, Tensor nu, Mode mode,
                        int64_t groups, double count, double rows, double alpha_bkw) {
  const Tensor x = s[0], w = s[1], r = s[2], inv = s[s.size() - 2], m = s[s.size() - 1];
  const bool token_rows = mode == kPaper;  // Lambda over tokens: the token sum of dy z
  auto pass = [&](const Tensor& a, const Tensor& b, bool b_all_rows, bool sums, bool tokens) {
    return backward_pass(dy, x, r, m, groups, a, b, b_all_rows, sums, tokens);
  };
  const Tensor a = w * inv;
  BackwardPass g;
  if (count == 0) {
    g = pass(a, at::zeros_like(a), false, true, token_rows);
  } else if (mode == kVanilla) {
    // exact gradient through psi_B: b = gamma inv^3 (1/N) sum_n dy_n z_n, so the sums
    // come first and the input gradient second
    g = pass(Tensor(), Tensor(), false, true, false);
    g.dx = pass(a, w * inv.pow(3) * g.all_dz / count, false, false, false).dx;
  } else {
    const Tensor nu_c = as(nu, inv.scalar_type());
    Tensor gamma_t, lambda_t;
    if (mode == kPaper) {
      const Tensor psi_b = s[3], inv_sq = inv * inv;
      g = pass(a, nu_c * inv_sq, false, true, true);
      gamma_t = inv_sq * psi_b;  // mean over tokens of zhat^2
      lambda_t = a * g.token_dz / count;
    } else {  // official: divided by the batch psi_B; Gamma, Lambda over every row
      const Tensor all_sq = s[3], inv_b = s[4];
      g = pass(w * inv_b, nu_c * inv * inv_b, true, true, false);
      gamma_t = inv * inv * all_sq / rows;
      lambda_t = a * g.all_dz / rows;
    }
    // nu + (1 - a_b) (Lambda - nu Gamma), or nu where that is not finite (as under fp16
    // loss scaling, when fairseq skips the step: it must not poison nu)
    Tensor moved = at::add(nu_c, at::addcmul(lambda_t, nu_c, gamma_t, -1), 1.0 - alpha_bkw);
    const Tensor finite = at::abs(moved) < std::numeric_limits<double>::infinity();
    at::where_out(nu, finite, moved, nu_c);
  }
  return {g.dx, g.all_dz * inv, g.dy_sum};
}

// The fused step for x's device: the CPU's (where the one-sweep kernels are in use:
// `sweeps`), CUDA's where the library has it; nullptr: ATen's operators.
const FusedStep* fused_step(const Tensor& x, bool sweeps) {
  if (x.is_cpu()) return sweeps ? &cpu_step() : nullptr;
  return x.is_cuda() ? cuda_step() : nullptr;
}

class PowerNormStep : public torch::autograd::Function<PowerNormStep> {
 public:
  // x: (..., C), contiguous; y has its shape
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& token_weights,
                        StepOptions& o) {
    const int64_t C = input.size(-1);
    const Tensor x = input.view({-1, C});  // rows = positions
    const Tensor m = token_weights.value_or(Tensor());
    const FusedStep* fused = fused_step(x, o.sweeps);
    const bool use_fused = fused != nullptr &&
                           fused->supports(x, o.running_phi, o.running_nu, o.count);
    variable_list saved;
    const Tensor y = use_fused ? fused_forward(*fused, x, m, weight, bias, o, saved)
                               : aten_forward(x, m, weight, bias, o, saved);
    ctx->save_for_backward(saved);
    ctx->saved_data["fused"] = use_fused;
    ctx->saved_data["nu"] = o.running_nu;
    ctx->saved_data["mode"] = static_cast<int64_t>(o.mode);
    ctx->saved_data["groups"] = o.groups;
    ctx->saved_data["count"] = o.count;
    ctx->saved_data["rows"] = o.rows;
    ctx->saved_data["alpha_bkw"] = o.alpha_bkw;
    ctx->saved_data["weight_dtype"] = weight ? weight->scalar_type() : at::ScalarType::Undefined;
    ctx->saved_data["bias_dtype"] = bias ? bias->scalar_type() : at::ScalarType::Undefined;
    return y.view(input.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor dy = grads[0].contiguous().view({-1, grads[0].size(-1)});
    const variable_list s = ctx->get_saved_variables();
    Tensor nu = ctx->saved_data["nu"].toTensor();
    const auto mode = static_cast<Mode>(ctx->saved_data["mode"].toInt());
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double count = static_cast<double>(ctx->saved_data["count"].toInt());
    const double rows = static_cast<double>(ctx->saved_data["rows"].toInt());
    const double alpha_bkw = ctx->saved_data["alpha_bkw"].toDouble();
    const auto weight_dtype = ctx->saved_data["weight_dtype"].toScalarType();
    const auto bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    Gradients g;
    if (ctx->saved_data["fused"].toBool()) {
      const Tensor none;
      const bool official = mode == kOfficial;
      FusedBackward f = fused_step(s[0], true)->backward(
          dy, s[0], s[2], s[s.size() - 1], s[1], s[s.size() - 2], mode == kPaper ? s[3] : none,
          official ? s[3] : none, official ? s[4] : none, nu, mode, groups, count, rows,
          alpha_bkw, bias_dtype != at::ScalarType::Undefined);
      g = {f.dx, f.grad_w, f.grad_b};
    } else {
      g = aten_backward(dy, s, nu, mode, groups, count, rows, alpha_bkw);
    }
    Tensor grad_w, grad_b;
    if (weight_dtype != at::ScalarType::Undefined) grad_w = as(g.grad_w, weight_dtype);
    if (bias_dtype != at::ScalarType::Undefined) grad_b = as(g.grad_b, bias_dtype);
    return {g.dx.view(grads[0].sizes()), grad_w, grad_b, Tensor(), Tensor()};
  }
};

// The training call: returns (y, ok), ok a 0-d bool (psi_B^2 finite; true for a batch
// without tokens, which has no psi_B and updates nothing). `sweeps`: on the CPU, run the fused
// step on the one-sweep kernels (else ATen's operators; a switch for the tests).
std::vector<Tensor> train_step(const Tensor& x, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, Tensor running_phi,
                               Tensor running_nu, Tensor num_steps,
                               const optional<Tensor>& token_weights, int64_t count,
                               int64_t rows, int64_t step, bool warm, bool use_batch,
                               const std::string& mode, double eps, double alpha_fwd,
                               double alpha_bkw, int64_t groups, bool sweeps) {
  TORCH_CHECK(x.dim() >= 2 && x.is_contiguous(),
              "powernorm train_step: x must be a contiguous (..., features) tensor, got shape ",
              x.sizes());
  const int64_t C = x.size(-1);
  TORCH_CHECK(groups >= 0 && (groups == 0 || C % groups == 0), "powernorm train_step: groups=",
              groups, " must be 0 or divide the ", C, " features");
  TORCH_CHECK(!warm || step > 0, "powernorm train_step: a warm-up call needs its step (>= 1)");
  TORCH_CHECK(!sweeps || x.is_cpu(), "powernorm train_step: the one-sweep passes run on CPU "
              "tensors only; x is on ", x.device());
  StepOptions o{running_phi, running_nu, num_steps, parse_mode(mode), eps,
                alpha_fwd, alpha_bkw, groups, count, rows, step, warm, use_batch, sweeps, Tensor()};
  Tensor y = PowerNormStep::apply(x, weight, bias, token_weights, o);
  Tensor ok = o.ok.defined() ? o.ok : at::scalar_tensor(true, x.options().dtype(at::kBool));
  return {y, ok};
}

}  // namespace
}  // namespace powernorm_plugin

TORCH_LIBRARY_FRAGMENT(powernorm_plugin, m) {
  m.def("train_step(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_phi, "
        "Tensor(b!) running_nu, Tensor(c!) num_steps, Tensor? token_weights, int count, "
        "int rows, int step, bool warm, bool use_batch, str mode, float eps, float alpha_fwd, "
        "float alpha_bkw, int groups, bool sweeps) -> Tensor[]",
        &powernorm_plugin::train_step);
}
