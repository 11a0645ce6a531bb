// Input checks shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/ATen.h>

namespace sempairs {

// Two (N, D) embeddings of one dtype and device, in a dtype the kernels implement:
// float32/float64 on CPU, float32/bfloat16/float16 on CUDA (accumulating in float32).
inline void check_views(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.dim() == 2 && a.sizes() == b.sizes(), op,
              ": expected two (N, D) tensors of the same shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) >= 1 && a.size(1) >= 1, op, ": empty input ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.device() == b.device(), op,
              ": inputs differ in dtype or device");
  const auto t = a.scalar_type();
  const bool supported = a.is_cuda() ? (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf)
                                     : (a.is_cpu() && (t == at::kFloat || t == at::kDouble));
  TORCH_CHECK(supported, op, ": no kernel for ", t, " on ", a.device().type(),
              " (CPU: float32, float64; CUDA: float32, bfloat16, float16)");
}

// float64 stays float64; everything else is accumulated in float32.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace sempairs
