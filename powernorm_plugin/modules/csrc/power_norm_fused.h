// PowerNorm's fused training step: each direction one sweep over the rows (or two, where the
// scale needs this batch's sums: warm-up, PN-V) and the per-feature statistics of
// power_norm_columns.h, with no tensor operator in between. Two of them: the CPU's
// (power_norm_cpu_step.cpp, on the one-sweep kernels of power_norm_cpu.cpp) and CUDA's
// (power_norm_cuda.cu), which the library has only where CUDA was there to compile it.
// power_norm_step.cpp calls them; a call neither takes runs as PowerNorm's Python step.
#pragma once

#include <ATen/core/Tensor.h>

#include "power_norm_columns.h"

namespace powernorm_plugin {

// The forward's results: y; the 1/sqrt(psi + eps) that y was normalized by; r (rows x groups,
// groups only); the batch statistics the backward keeps (psi_B^2, the all-row sum of z^2,
// 1/sqrt(psi_B^2 + eps)); ok (0-d bool: psi_B^2 finite), which the CPU's step leaves
// undefined where it is (or where the batch has no tokens).
struct FusedForward {
  at::Tensor y, inv, r, psi_b, all_sq, inv_b, ok;
};

// dx and the parameter gradients (in the compute dtype; undefined without gamma and beta).
struct FusedBackward {
  at::Tensor dx, grad_w, grad_b;
};

struct FusedStep {
  // Whether the step takes x (..., C), contiguous, its rows the positions, with these running
  // buffers, `groups` groups (0: no group scaling) and `count` tokens. The tensors below of
  // x's shape (y, dy, dx) have that shape.
  bool (*supports)(const at::Tensor& x, const at::Tensor& running_phi,
                   const at::Tensor& running_nu, int64_t groups, int64_t count);
  // One training call's forward; moves running_phi and num_steps in place (and bumps their
  // versions) where the batch has tokens.
  FusedForward (*forward)(const at::Tensor& x, const at::Tensor& m, const at::Tensor& w,
                          const at::Tensor& b, at::Tensor& running_phi, at::Tensor& num_steps,
                          int64_t mode, int64_t groups, double eps, double count, bool warm,
                          bool use_batch, int64_t step, double alpha_fwd);
  // Its backward; moves running_nu in place (paper, official).
  FusedBackward (*backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r,
                            const at::Tensor& m, const at::Tensor& w, const at::Tensor& inv,
                            const at::Tensor& psi_b, const at::Tensor& all_sq,
                            const at::Tensor& inv_b, at::Tensor& running_nu, int64_t mode,
                            int64_t groups, double count, double rows, double alpha_bkw,
                            bool has_bias);
};

// The CPU's fused step.
const FusedStep& cpu_step();

// CUDA's fused step, or nullptr where the library was built without it.
const FusedStep*& cuda_step();

// Statistics are accumulated in fp64 for fp64 input and in fp32 for every other dtype.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the running buffers are what a fused step writes through its pointers: contiguous,
// in x's compute dtype, on x's device.
inline bool buffers_fit(const at::Tensor& x, const at::Tensor& running_phi,
                        const at::Tensor& running_nu) {
  for (const at::Tensor* t : {&running_phi, &running_nu}) {
    if (t->scalar_type() != compute_dtype(x) || !t->is_contiguous() || t->device() != x.device())
      return false;
  }
  return true;
}

// A tensor's data, or nullptr for an undefined (absent) tensor.
template <typename A>
A* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<A>() : nullptr;
}

// Counts a change that a kernel wrote through a tensor's data pointer in its version, as an
// in-place operator would (the host mirror of num_steps follows the version).
inline void bump_version(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

}  // namespace powernorm_plugin
