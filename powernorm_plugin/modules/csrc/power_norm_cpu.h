// PowerNorm's one-sweep CPU passes (power_norm_cpu.cpp), for the C++ training step.
//
// A pass reads x (..., C), contiguous, as rows of C features, and writes what its pointers
// ask for: a nullptr is neither read nor written. A (acc. type): float for fp32/fp16/bf16
// input, double for fp64.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace powernorm_plugin {

// A buffer of at least `size` values for this thread, kept from call to call rather than
// allocated and freed around every pass (heap churn: glibc trims and regrows its heap, and the
// page faults that follow can cost more than the pass). One buffer per Use type: buffers in
// use at the same time need different ones.
template <typename T, typename Use>
T* kept_buffer(int64_t size) {
  static thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

template <typename A>
struct ForwardSweep {
  const A* mask = nullptr;   // token weights m_n, one per row (nullptr: every row a token)
  const A* scale = nullptr;  // with shift: y = scale * z + shift (C each)
  const A* shift = nullptr;
  A* r = nullptr;            // the rows' group factors (rows x groups), with groups > 0
  A* token_sq = nullptr;     // sum_n m_n z_n^2 (C)
  A* all_sq = nullptr;       // sum_n z_n^2 (C); only with a mask and token_sq
};

// One forward sweep; y (x's shape and dtype) is written where `s.scale` is given.
template <typename A>
void forward_sweep(const at::Tensor& x, int64_t groups, double eps, const ForwardSweep<A>& s,
                   const at::Tensor& y);

template <typename A>
struct BackwardSweep {
  const A* r = nullptr;     // the forward's group factors, with groups > 0
  const A* mask = nullptr;  // token weights (nullptr: every row a token)
  const A* a = nullptr;     // with b: dz = a dy - w b z (C each), w = m_n, or 1 with b_all_rows
  const A* b = nullptr;
  bool b_all_rows = false;
  A* token_dz = nullptr;    // sum_n m_n dy_n z_n (C); only with a mask, all_dz and dy_sum
  A* all_dz = nullptr;      // with dy_sum: sum_n dy_n z_n and sum_n dy_n (C each)
  A* dy_sum = nullptr;
};

// One backward sweep; dx (x's shape and dtype) is written where `s.a` is given.
template <typename A>
void backward_sweep(const at::Tensor& dy, const at::Tensor& x, int64_t groups,
                    const BackwardSweep<A>& s, const at::Tensor& dx);

}  // namespace powernorm_plugin
