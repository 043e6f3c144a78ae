// PowerNorm's one-sweep CPU passes (power_norm_cpu.cpp), for the C++ training step.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

namespace powernorm_plugin {

// (y, token sum of z^2, all-row sum of z^2, r); see power_norm_cpu.cpp.
std::vector<at::Tensor> forward(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                                int64_t groups, double eps,
                                const c10::optional<at::Tensor>& scale,
                                const c10::optional<at::Tensor>& shift, bool sums, bool all_rows);

// (dx, token sum of dy z, all-row sum of dy z, all-row sum of dy); see power_norm_cpu.cpp.
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& r,
                                 const c10::optional<at::Tensor>& mask, int64_t groups,
                                 const c10::optional<at::Tensor>& a,
                                 const c10::optional<at::Tensor>& b, bool b_all_rows, bool sums,
                                 bool token_rows);

}  // namespace powernorm_plugin
