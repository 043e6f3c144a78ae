// PowerNorm's per-feature statistics of a training call: what is computed for each feature c
// once the passes over the rows have given the column sums. Shared by the CPU step
// (power_norm_cpu_step.cpp) and the CUDA kernels (power_norm_cuda.cu), so both do the same
// arithmetic; the equations are those of power_norm.py's docstring.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PN_COLUMN __host__ __device__ __forceinline__
#else
#define PN_COLUMN inline
#endif

namespace powernorm_plugin {

enum Mode : int64_t { kPaper = 0, kOfficial = 1, kVanilla = 2 };

template <typename A>
PN_COLUMN A rsqrt_(A v) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(A) == sizeof(float)) {
    return rsqrtf(v);
  } else {
    return rsqrt(v);
  }
#else
  return A(1) / std::sqrt(v);
#endif
}

// torch.lerp's formula: a + w (b - a), computed from the nearer end.
template <typename A>
PN_COLUMN A lerp_(A a, A b, A w) {
  return w < A(0.5) ? a + w * (b - a) : b - (b - a) * (A(1) - w);
}

template <typename A>
PN_COLUMN bool finite_(A v) {
  // false for NaN and +-Inf; `&`, not `&&`: no branch, so that loops of it vectorize
  return (v > -A(INFINITY)) & (v < A(INFINITY));
}

// psi^2 after a call whose batch statistic psi_B^2 was finite: moved 1/step of the way to
// psi_B^2 during warm-up (`mean_rate`, the cumulative mean), by the EMA (`ema_rate` = 1 - a_f)
// after; the official mode applies the EMA during warm-up as well, after the mean.
template <typename A>
PN_COLUMN A moved_phi(A phi, A psi_b, bool warm, int64_t mode, A mean_rate, A ema_rate) {
  if (warm) phi = lerp_(phi, psi_b, mean_rate);
  if (!warm || mode == kOfficial) phi = lerp_(phi, psi_b, ema_rate);
  return phi;
}

// The coefficients of dz = a dy - b m z in the backward: paper a = gamma inv,
// b = nu inv^2; official (divided by the batch psi_B) a = gamma inv_b, b = nu inv inv_b;
// PN-V a = gamma inv and the given b (vanilla_b).
template <typename A>
PN_COLUMN void dz_coefficients(int64_t mode, A gamma, A inv, A inv_b, A nu, A b_given, A* a,
                               A* b) {
  if (mode == kOfficial) {
    *a = gamma * inv_b;
    *b = nu * inv * inv_b;
  } else {
    *a = gamma * inv;
    *b = mode == kPaper ? nu * inv * inv : b_given;
  }
}

// PN-V's b: the exact gradient through psi_B, gamma inv^3 (1/N) sum_n dy_n z_n.
template <typename A>
PN_COLUMN A vanilla_b(A gamma, A inv, A sum_dz, A count) {
  return gamma * inv * inv * inv * sum_dz / count;
}

// nu after the backward, nu + (1 - a_b) (Lambda - nu Gamma), or nu where that is not finite
// (as under fp16 loss scaling, when fairseq skips the step: it must not poison nu). Paper:
// Gamma = inv^2 psi_B^2, Lambda = gamma inv (1/N) sum over tokens of dy z; official: over
// every row, Gamma = inv^2 (1/rows) sum z^2, Lambda = gamma inv (1/rows) sum dy z.
template <typename A>
PN_COLUMN A moved_nu(int64_t mode, A nu, A gamma, A inv, A psi_b, A all_sq, A token_dz,
                     A sum_dz, A count, A rows, A rate) {
  A gamma_t, lambda_t;
  if (mode == kPaper) {
    gamma_t = inv * inv * psi_b;
    lambda_t = gamma * inv * token_dz / count;
  } else {
    gamma_t = inv * inv * all_sq / rows;
    lambda_t = gamma * inv * sum_dz / rows;
  }
  const A moved = nu + rate * (lambda_t - nu * gamma_t);
  return finite_(moved) ? moved : nu;
}

}  // namespace powernorm_plugin
