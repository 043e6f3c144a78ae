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
#include <ATen/FuncTorchTLS.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>
#include <torch/version.h>

// torch's compiled autograd calls into a C++ node through an interface (PyCompilerInterface,
// IValuePacker) that has changed from release to release; the node's part of it below follows
// torch 2.13 and 2.14. With another torch the node goes without, and compiled autograd raises
// NotImplementedError naming it.
#ifndef POWERNORM_COMPILED_AUTOGRAD
#define POWERNORM_COMPILED_AUTOGRAD \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13))
#endif
#if POWERNORM_COMPILED_AUTOGRAD
#include <torch/csrc/dynamo/compiled_autograd.h>
#endif

#include <mutex>
#include <string>
#include <type_traits>

#include "power_norm_fused.h"

namespace powernorm_plugin {

const FusedStep*& cuda_step() {
  static const FusedStep* step = nullptr;
  return step;
}

namespace {

using at::Tensor;
using c10::optional;
using torch::autograd::variable_list;

// A layer's settings: one float64 CPU vector (mode index, groups, eps, alpha_fwd, alpha_bkw)
// that the layer makes once (step_settings in native_kernels.py). As one tensor they cost a
// call one argument to convert instead of five, each about 0.3 us of host time.
struct Settings {
  Mode mode;
  int64_t groups;
  double eps, alpha_fwd, alpha_bkw;
};

Settings read_settings(const Tensor& t, int64_t C) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 1 &&
                  t.size(0) == 5 && t.is_contiguous(),
              "powernorm train_step: settings must be a float64 CPU vector (mode, groups, eps, "
              "alpha_fwd, alpha_bkw), got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
              t.device());
  const double* v = t.data_ptr<double>();
  const auto mode = static_cast<int64_t>(v[0]);
  TORCH_CHECK(static_cast<double>(mode) == v[0] &&
                  (mode == kPaper || mode == kOfficial || mode == kVanilla),
              "powernorm train_step: settings[0] must be a mode (0 paper, 1 official, "
              "2 vanilla), got ", v[0]);
  const auto groups = static_cast<int64_t>(v[1]);
  TORCH_CHECK(static_cast<double>(groups) == v[1] && groups >= 0 &&
                  (groups == 0 || C % groups == 0),
              "powernorm train_step: groups=", v[1], " must be 0 or divide the ", C,
              " features");
  TORCH_CHECK(v[2] > 0 && v[3] >= 0 && v[3] < 1 && v[4] >= 0 && v[4] < 1,
              "powernorm train_step: settings need eps > 0 and rates in [0, 1), got eps=", v[2],
              ", alpha_fwd=", v[3], ", alpha_bkw=", v[4]);
  return {static_cast<Mode>(mode), groups, v[2], v[3], v[4]};
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
                        const optional<Tensor>& token_weights, int64_t count) {
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
  TORCH_CHECK(count >= 0 && count <= N, "powernorm train_step: count=", count,
              " tokens do not fit x's ", N, " rows");
  if (token_weights) {
    const Tensor& m = *token_weights;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == N && m.is_contiguous() &&
                    m.scalar_type() == compute_dtype(x) && m.device() == x.device(),
                "powernorm train_step: token_weights must be a contiguous ", compute_dtype(x),
                " vector of x's ", N, " rows on ", x.device(), ", got ", m.scalar_type(),
                " of shape ", m.sizes(), " on ", m.device());
  } else {
    TORCH_CHECK(count == N, "powernorm train_step: without token_weights every row is a "
                "token, but count=", count, " of ", N, " rows");
  }
}

// The fused step for x's device: the CPU's, or CUDA's where the library has it; else nullptr.
const FusedStep* fused_step(const Tensor& x) {
  if (x.is_cpu()) return &cpu_step();
  return x.is_cuda() ? cuda_step() : nullptr;
}

// Under create_graph=True: the gradients as they are, but differentiating them raises (as
// torch.autograd.function.once_differentiable does). The step's backward is the paper's
// modified gradient, which has no derivative of its own.
variable_list not_differentiable(variable_list&& grads) {
  variable_list inputs;
  for (const Tensor& g : grads) {
    inputs.push_back(g.defined() ? g.detach().requires_grad_(true) : Tensor());
  }
  auto error = c10::make_intrusive<torch::autograd::DelayedError>(
      "PowerNorm's training step is differentiable once: its backward (the paper's "
      "gradient, with running statistics) has no derivative of its own",
      static_cast<int64_t>(inputs.size()));
  return (*error)(std::move(inputs));
}

// What a call's backward reads besides dL/dy: the call's inputs, what its forward kept, its
// settings.
struct BackwardInputs {
  Tensor x, gamma, token_weights, r, psi_b, all_sq, inv_b, inv, running_nu;
  Mode mode;
  int64_t groups, count;
  double alpha_bkw;
  at::ScalarType weight_dtype, bias_dtype;  // Undefined: no such parameter
};

// The backward's arithmetic: dL/dx, dL/dweight, dL/dbias (undefined for an absent parameter;
// the parameters' gradients in their own dtypes), differentiable once.
variable_list backward_step(const Tensor& dy_or_undefined, BackwardInputs in) {
  // an undefined gradient is a zero one (as a torch::autograd::Function materializes it)
  const Tensor dy = dy_or_undefined.defined() ? dy_or_undefined.contiguous()
                                              : at::zeros_like(in.x);
  const FusedStep* fused = fused_step(in.x);
  TORCH_INTERNAL_ASSERT(fused != nullptr, "powernorm: no fused step for ", in.x.device());
  const FusedBackward f = fused->backward(
      dy, in.x, in.r, in.token_weights, in.gamma, in.inv, in.psi_b, in.all_sq, in.inv_b,
      in.running_nu, in.mode, in.groups, static_cast<double>(in.count),
      static_cast<double>(in.x.numel() / in.x.size(-1)), in.alpha_bkw,
      in.bias_dtype != at::ScalarType::Undefined);
  variable_list out{f.dx, Tensor(), Tensor()};
  if (in.weight_dtype != at::ScalarType::Undefined) out[1] = as(f.grad_w, in.weight_dtype);
  if (in.bias_dtype != at::ScalarType::Undefined) out[2] = as(f.grad_b, in.bias_dtype);
  if (torch::autograd::GradMode::is_enabled()) return not_differentiable(std::move(out));
  return out;
}

// The paper's backward subtracts nu * x_hat from the incoming gradient and moves nu: a
// second backward pass through one call does both again, so separate passes of two losses do
// not add up to one pass of their sum. (PN-V's exact gradient has no such term.)
void warn_second_backward() {
  TORCH_WARN(
      "PowerNorm: a second backward pass through one training call (retain_graph=True). "
      "Its running nu moves again, and in the paper's and the authors' modes the gradients of "
      "separate backward passes do not add up to those of their summed loss: sum the losses "
      "and call backward() once");
}

// The backward of one training call, written as torch's generated backward functions are: a
// Node that keeps what the backward reads as members. (A torch::autograd::Function keeps it in
// a map keyed by strings, and wraps its outputs through general code for views, in-place
// outputs and forward AD: several microseconds of host time per call, which at fairseq's
// sizes on a GPU is as much as the kernels take.)
struct PowerNormBackward : public torch::autograd::Node {
  // The call's inputs: SavedVariables, so that an in-place change before the backward is
  // caught. The forward's own results, which nothing else can change, are kept as they are.
  torch::autograd::SavedVariable x, gamma, token_weights;
  Tensor r, psi_b, all_sq, inv_b, inv, running_nu;
  Mode mode = kPaper;
  int64_t groups = 0;
  // An IValue so that compiled autograd takes it as an input of its graph, not as part of the
  // graph's cache key: it changes from batch to batch.
  c10::IValue count = int64_t{0};
  double alpha_bkw = 0;
  // the parameters' dtypes (Undefined: no such parameter), which their gradients take
  at::ScalarType weight_dtype = at::ScalarType::Undefined, bias_dtype = at::ScalarType::Undefined;
  // a backward pass has run (a second one: retain_graph=True); mutable, since under compiled
  // autograd the one call on every backward pass is the const compiled_args
  mutable bool applied = false;

  // Called once per backward pass through this node: warns from the second on.
  void count_backward_pass() const {
    if (applied && mode != kVanilla) warn_second_backward();
    applied = true;
  }

  std::string name() const override { return "PowerNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    gamma.reset_data();
    token_weights.reset_data();
    r = psi_b = all_sq = inv_b = inv = Tensor();
  }

  // grads: dL/dy. Returns dL/dx, dL/dweight, dL/dbias (undefined for an absent parameter).
  variable_list apply(variable_list&& grads) override {
    // (x.unpack() raises where the graph was freed by an earlier backward)
    BackwardInputs in{x.unpack(), gamma.unpack(), token_weights.unpack(), r, psi_b, all_sq,
                      inv_b, inv, running_nu, mode, groups, count.toInt(), alpha_bkw,
                      weight_dtype, bias_dtype};
    count_backward_pass();
    return backward_step(grads[0], std::move(in));
  }

#if POWERNORM_COMPILED_AUTOGRAD
  // torch's compiled autograd (torch._dynamo.compiled_autograd) first asks each node for what
  // its backward reads (compiled_args: tensors and `count` become inputs of the compiled graph,
  // the rest its cache key), then records the backward as one call in the graph
  // (apply_with_saved). The step is not traceable, so that call runs it eagerly, as torch does
  // for a C++ autograd Function.
  //
  // each_lifted calls f on each member that becomes a graph input, in the one order that
  // compiled_args collects them and apply_with_saved swaps them in and back: compiled autograd
  // pairs the two by that order.
  template <typename Self, typename F>
  static void each_lifted(Self& self, F&& f) {
    f(self.x);
    f(self.gamma);
    f(self.token_weights);
    f(self.r);
    f(self.psi_b);
    f(self.all_sq);
    f(self.inv_b);
    f(self.inv);
    f(self.running_nu);
    f(self.count);
  }

  void compiled_args(torch::autograd::CompiledNodeArgs& args) const override {
    count_backward_pass();
    each_lifted(*this, [&](const auto& v) {
      if constexpr (std::is_same_v<std::decay_t<decltype(v)>, torch::autograd::SavedVariable>) {
        args.collect(v, /*is_output=*/false);
      } else {
        args.collect(v);
      }
    });
    args.collect(static_cast<int64_t>(mode));
    args.collect(groups);
    args.collect(alpha_bkw);
    args.collect(weight_dtype);
    args.collect(bias_dtype);
  }

  variable_list apply_with_saved(const variable_list& grads,
                                 torch::autograd::SwapSavedVariables& saved) override {
    each_lifted(*this, [&](auto& v) { saved.before(v); });
    const std::vector<c10::IValue> args{
        x.unpack(), gamma.unpack(), token_weights.unpack(), r, psi_b, all_sq, inv_b, inv,
        running_nu, static_cast<int64_t>(mode), groups, count, alpha_bkw,
        static_cast<int64_t>(weight_dtype), static_cast<int64_t>(bias_dtype)};
    std::vector<at::TypePtr> schema;
    for (const c10::IValue& a : args) {
      schema.push_back(a.isTensor() ? at::TensorType::get() : a.type());
    }
    const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
    const std::string fn = compiler->bind_function(
        saved.get_py_compiler(), name(), &apply_functional, schema,
        /*is_custom_function=*/true, /*is_traceable=*/false);
    variable_list out = compiler->call_function(
        saved.get_py_compiler(), "apply_functional", fn, grads, args,
        torch::dynamo::autograd::IValuePacker<std::vector<std::optional<
            torch::autograd::InputMetadata>>>::pack(
            torch::dynamo::autograd::get_input_metadata(next_edges())));
    each_lifted(*this, [&](auto& v) { saved.after(v); });
    return out;
  }

  // The call apply_with_saved records, run with the graph's real tensors; `a` holds
  // BackwardInputs' fields in their order.
  static variable_list apply_functional(const variable_list& grads,
                                        const std::vector<c10::IValue>& a) {
    auto dtype = [](const c10::IValue& v) { return static_cast<at::ScalarType>(v.toInt()); };
    return backward_step(
        grads[0], {a[0].toTensor(), a[1].toTensor(), a[2].toTensor(), a[3].toTensor(),
                   a[4].toTensor(), a[5].toTensor(), a[6].toTensor(), a[7].toTensor(),
                   a[8].toTensor(), static_cast<Mode>(a[9].toInt()), a[10].toInt(),
                   a[11].toSymInt().guard_int(__FILE__, __LINE__), a[12].toDouble(),
                   dtype(a[13]), dtype(a[14])});
  }
#endif
};

// The forward of a training call: y, and the call's backward node where a gradient is needed.
// Sets `ok` (psi_B^2 finite). x: (..., C), contiguous, its rows the positions; y has its shape.
// (No reshaping to 2-D: every view of a tensor that requires grad costs autograd bookkeeping
// on each call.)
Tensor forward_with_node(const FusedStep& fused, const Tensor& x,
                         const optional<Tensor>& weight, const optional<Tensor>& bias,
                         const optional<Tensor>& token_weights, Tensor& running_phi,
                         Tensor& running_nu, Tensor& num_steps, const Settings& set,
                         int64_t count, int64_t step, bool warm, bool use_batch, Tensor& ok) {
  const auto cd = compute_dtype(x);
  const Tensor m = token_weights.value_or(Tensor());
  FusedForward f;
  Tensor w, b;
  {
    // what the step computes is not differentiated by autograd: the node below is its backward
    at::AutoDispatchBelowADInplaceOrView guard;
    w = weight ? as(*weight, cd) : Tensor();
    b = bias ? as(*bias, cd) : Tensor();
    f = fused.forward(x, m, w, b, running_phi, num_steps, set.mode, set.groups, set.eps,
                      static_cast<double>(count), warm, use_batch, step, set.alpha_fwd);
  }
  ok = f.ok;
  if (torch::autograd::compute_requires_grad(x, weight, bias)) {
    auto node = c10::make_intrusive<PowerNormBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias));
    node->x = torch::autograd::SavedVariable(x, false);
    node->gamma = torch::autograd::SavedVariable(w, false);  // the weight, or its fp32 copy
    node->token_weights = torch::autograd::SavedVariable(m, false);
    node->r = f.r;
    node->psi_b = f.psi_b;
    node->all_sq = f.all_sq;
    node->inv_b = f.inv_b;
    node->inv = f.inv;
    node->running_nu = running_nu;
    node->mode = set.mode;
    node->groups = set.groups;
    node->count = count;
    node->alpha_bkw = set.alpha_bkw;
    node->weight_dtype = weight ? weight->scalar_type() : at::ScalarType::Undefined;
    node->bias_dtype = bias ? bias->scalar_type() : at::ScalarType::Undefined;
    torch::autograd::set_history(f.y, node);
  }
  return f.y;
}

// The training call: returns (y, ok). ok: None where the step knows on the host that psi_B^2
// is finite (the CPU's), or that there is none (a batch without tokens, which updates
// nothing); else a 0-d bool, false on the CPU (psi^2 and num_steps were left as they were),
// on a GPU the device's flag, which the caller reads later. (None, None), having done nothing,
// where no fused step takes the call.
std::tuple<Tensor, Tensor> train_step(const Tensor& x, const optional<Tensor>& weight,
                                      const optional<Tensor>& bias, Tensor running_phi,
                                      Tensor running_nu, Tensor num_steps,
                                      const optional<Tensor>& token_weights, int64_t count,
                                      int64_t step, bool warm, bool use_batch,
                                      const Tensor& settings) {
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) > 0 && x.is_contiguous(),
              "powernorm train_step: x must be a contiguous (..., features) tensor, got shape ",
              x.sizes());
  const Settings set = read_settings(settings, x.size(-1));
  TORCH_CHECK(!warm || step > 0, "powernorm train_step: a warm-up call needs its step (>= 1)");
  const FusedStep* fused = fused_step(x);
  if (fused == nullptr || !fused->supports(x, running_phi, running_nu, set.groups, count)) {
    return {};
  }
  check_step_tensors(x, weight, bias, running_phi, running_nu, num_steps, token_weights, count);
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) {
    functorch->checkSupportsCppAutogradFunction();  // as a torch::autograd::Function would
  }
  Tensor ok;
  Tensor y = forward_with_node(*fused, x, weight, bias, token_weights, running_phi, running_nu,
                               num_steps, set, count, step, warm, use_batch, ok);
  return {y, ok};
}

}  // namespace
}  // namespace powernorm_plugin

TORCH_LIBRARY_FRAGMENT(powernorm_plugin, m) {
  m.def("train_step(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_phi, "
        "Tensor(b!) running_nu, Tensor(c!) num_steps, Tensor? token_weights, int count, "
        "int step, bool warm, bool use_batch, Tensor settings) -> (Tensor, Tensor)",
        &powernorm_plugin::train_step);
}
