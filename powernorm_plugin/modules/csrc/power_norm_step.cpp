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
// power_norm_cuda.cu. A call that no fused step takes (a GPU library built without CUDA, a
// batch of padding only on a GPU, more features than the CUDA kernels hold, running buffers of
// another dtype) is declined: the operator returns nothing and the caller runs PowerNorm's
// Python step, the same arithmetic on tensor operators. The running buffers are updated in
// place: psi^2 and the step count in the forward, nu in the backward.
// A non-finite psi_B^2 leaves psi^2 and the count unchanged (checked on the device, so no
// wait); the caller reads the returned flag and reports it.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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

// t in dtype, contiguous: what the fused steps read through a pointer.
Tensor as(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// The fused steps read and write these tensors through raw pointers: each must have the size
// and device they assume, or the call fails here, naming it.
void check_step_tensors(const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const Tensor& running_phi,
                        const Tensor& running_nu, const Tensor& num_steps,
                        const optional<Tensor>& token_weights, int64_t count, int64_t rows) {
  const int64_t C = x.size(-1), N = x.numel() / C;
  auto per_feature = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.device() == x.device(),
                "powernorm train_step: ", name, " must be a vector of the ", C, " features on ",
                x.device(), ", got shape ", t.sizes(), " on ", t.device());
  };
  if (weight) per_feature(*weight, "weight");
  if (bias) per_feature(*bias, "bias");
  per_feature(running_phi, "running_phi");
  per_feature(running_nu, "running_nu");
  TORCH_CHECK(num_steps.numel() == 1 && num_steps.scalar_type() == at::kLong &&
                  num_steps.device() == x.device(),
              "powernorm train_step: num_steps must be one int64 on ", x.device());
  TORCH_CHECK(rows == N && count >= 0 && count <= rows, "powernorm train_step: rows=", rows,
              " and count=", count, " do not fit x's ", N, " rows");
  if (token_weights) {
    const Tensor& m = *token_weights;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == N && m.is_contiguous() &&
                    m.scalar_type() == compute_dtype(x) && m.device() == x.device(),
                "powernorm train_step: token_weights must be a contiguous ", compute_dtype(x),
                " vector of x's ", N, " rows on ", x.device(), ", got ", m.scalar_type(),
                " of shape ", m.sizes(), " on ", m.device());
  } else {
    TORCH_CHECK(count == rows, "powernorm train_step: without token_weights every row is a "
                "token, but count=", count, " of ", rows, " rows");
  }
}

// What a call needs besides its differentiable inputs. `ok` (psi_B^2 finite) is set by the
// forward for the caller.
struct StepOptions {
  Tensor running_phi, running_nu, num_steps;
  Mode mode;
  double eps, alpha_fwd, alpha_bkw;
  int64_t groups, count, rows, step;
  bool warm, use_batch;
  Tensor ok;
};

// The forward: y; sets o.ok and the saved tensors: x, gamma, r, then the mode's statistics
// (paper: psi_B^2; official: the all-row sum of z^2 and 1/sqrt(psi_B^2 + eps)), then inv and
// the token weights. Tensors a call does not have are saved undefined.
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

// The fused step for x's device: the CPU's, or CUDA's where the library has it; else nullptr.
const FusedStep* fused_step(const Tensor& x) {
  if (x.is_cpu()) return &cpu_step();
  return x.is_cuda() ? cuda_step() : nullptr;
}

class PowerNormStep : public torch::autograd::Function<PowerNormStep> {
 public:
  // x: (..., C), contiguous, its rows the positions; y has its shape. (No reshaping to 2-D:
  // every view of a tensor that requires grad costs autograd bookkeeping on each call.)
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& token_weights,
                        StepOptions& o, const FusedStep& fused) {
    const Tensor m = token_weights.value_or(Tensor());
    variable_list saved;
    const Tensor y = fused_forward(fused, x, m, weight, bias, o, saved);
    ctx->save_for_backward(saved);
    ctx->saved_data["nu"] = o.running_nu;
    ctx->saved_data["mode"] = static_cast<int64_t>(o.mode);
    ctx->saved_data["groups"] = o.groups;
    ctx->saved_data["count"] = o.count;
    ctx->saved_data["rows"] = o.rows;
    ctx->saved_data["alpha_bkw"] = o.alpha_bkw;
    ctx->saved_data["weight_dtype"] = weight ? weight->scalar_type() : at::ScalarType::Undefined;
    ctx->saved_data["bias_dtype"] = bias ? bias->scalar_type() : at::ScalarType::Undefined;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor dy = grads[0].contiguous();
    const variable_list s = ctx->get_saved_variables();
    Tensor nu = ctx->saved_data["nu"].toTensor();
    const auto mode = static_cast<Mode>(ctx->saved_data["mode"].toInt());
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double count = static_cast<double>(ctx->saved_data["count"].toInt());
    const double rows = static_cast<double>(ctx->saved_data["rows"].toInt());
    const double alpha_bkw = ctx->saved_data["alpha_bkw"].toDouble();
    const auto weight_dtype = ctx->saved_data["weight_dtype"].toScalarType();
    const auto bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    const Tensor none;
    const bool official = mode == kOfficial;
    // the forward's fused step: the device's, which the forward found to take the call
    const FusedBackward f = fused_step(s[0])->backward(
        dy, s[0], s[2], s[s.size() - 1], s[1], s[s.size() - 2], mode == kPaper ? s[3] : none,
        official ? s[3] : none, official ? s[4] : none, nu, mode, groups, count, rows,
        alpha_bkw, bias_dtype != at::ScalarType::Undefined);
    Tensor grad_w, grad_b;
    if (weight_dtype != at::ScalarType::Undefined) grad_w = as(f.grad_w, weight_dtype);
    if (bias_dtype != at::ScalarType::Undefined) grad_b = as(f.grad_b, bias_dtype);
    return {f.dx, grad_w, grad_b, Tensor(), Tensor(), Tensor()};
  }
};

// The training call: returns (y, ok), ok a 0-d bool (psi_B^2 finite; true for a batch
// without tokens, which has no psi_B and updates nothing); or nothing, having done nothing,
// where no fused step takes the call.
std::vector<Tensor> train_step(const Tensor& x, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, Tensor running_phi,
                               Tensor running_nu, Tensor num_steps,
                               const optional<Tensor>& token_weights, int64_t count,
                               int64_t rows, int64_t step, bool warm, bool use_batch,
                               const std::string& mode, double eps, double alpha_fwd,
                               double alpha_bkw, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) > 0 && x.is_contiguous(),
              "powernorm train_step: x must be a contiguous (..., features) tensor, got shape ",
              x.sizes());
  const int64_t C = x.size(-1);
  TORCH_CHECK(groups >= 0 && (groups == 0 || C % groups == 0), "powernorm train_step: groups=",
              groups, " must be 0 or divide the ", C, " features");
  TORCH_CHECK(!warm || step > 0, "powernorm train_step: a warm-up call needs its step (>= 1)");
  StepOptions o{running_phi, running_nu, num_steps, parse_mode(mode), eps,
                alpha_fwd, alpha_bkw, groups, count, rows, step, warm, use_batch, Tensor()};
  const FusedStep* fused = fused_step(x);
  if (fused == nullptr || !fused->supports(x, running_phi, running_nu, count)) {
    return {};
  }
  check_step_tensors(x, weight, bias, running_phi, running_nu, num_steps, token_weights, count,
                     rows);
  Tensor y = PowerNormStep::apply(x, weight, bias, token_weights, o, *fused);
  return {y, o.ok};
}

}  // namespace
}  // namespace powernorm_plugin

TORCH_LIBRARY_FRAGMENT(powernorm_plugin, m) {
  m.def("train_step(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_phi, "
        "Tensor(b!) running_nu, Tensor(c!) num_steps, Tensor? token_weights, int count, "
        "int rows, int step, bool warm, bool use_batch, str mode, float eps, float alpha_fwd, "
        "float alpha_bkw, int groups) -> Tensor[]",
        &powernorm_plugin::train_step);
}
