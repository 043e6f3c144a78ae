// PowerNorm's fused CUDA training step (power_norm_cuda.cu), as the C++ step calls it.
//
// The library is built with power_norm_cuda.cu only where CUDA is there to compile it; the
// .cu file then fills in cuda_step() when the library loads. Where it is null (a CPU-only
// build), or a call is outside what the kernels take (supports()), the step runs on ATen's
// operators instead.
#pragma once

#include <ATen/core/Tensor.h>

namespace powernorm_plugin {

enum Mode : int64_t { kPaper = 0, kOfficial = 1, kVanilla = 2 };

// The forward's results: y; the 1/sqrt(psi + eps) that y was normalized by; r (rows x groups,
// groups only); the batch statistics the backward keeps (psi_B^2, the all-row sum of z^2,
// 1/sqrt(psi_B^2 + eps)); ok (0-d bool: psi_B^2 finite).
struct FusedForward {
  at::Tensor y, inv, r, psi_b, all_sq, inv_b, ok;
};

// dx and the parameter gradients (in the compute dtype; undefined without gamma and beta).
struct FusedBackward {
  at::Tensor dx, grad_w, grad_b;
};

struct CudaStep {
  // Whether the kernels take x (CUDA, at most kMaxColumns features) with these buffers.
  bool (*supports)(const at::Tensor& x, const at::Tensor& running_phi, const at::Tensor& running_nu);
  // One training call's forward over a batch with tokens (count > 0): writes running_phi and
  // num_steps in place.
  FusedForward (*forward)(const at::Tensor& x, const at::Tensor& m, const at::Tensor& w,
                          const at::Tensor& b, at::Tensor& running_phi, at::Tensor& num_steps,
                          int64_t mode, int64_t groups, double eps, double count, bool warm,
                          bool use_batch, int64_t step, double alpha_fwd);
  // Its backward: writes running_nu in place (paper, official).
  FusedBackward (*backward)(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r,
                            const at::Tensor& m, const at::Tensor& w, const at::Tensor& inv,
                            const at::Tensor& psi_b, const at::Tensor& all_sq,
                            const at::Tensor& inv_b, at::Tensor& running_nu, int64_t mode,
                            int64_t groups, double count, double rows, double alpha_bkw,
                            bool has_bias);
};

// The fused CUDA step, or nullptr where the library was built without it.
const CudaStep*& cuda_step();

}  // namespace powernorm_plugin
