// VICReg with its covariance term in the cheaper of two exact forms. Written with ATen operators,
// so one implementation serves CPU and CUDA: the gain is in the algebra, not in the kernels.
//
// Per view: Zc = Z - mean(Z), v = diag(C), C = Zc^T Zc / (N - 1). The covariance term
// sum_{d != e} C_de^2 / D = (||C||_F^2 - sum_d v_d^2) / D, and ||Zc^T Zc||_F = ||Zc Zc^T||_F, so
// the D x D product (2 N D^2 flops) can be replaced by the N x N Gram matrix K = Zc Zc^T
// (2 N^2 D flops) when N < D. Gradient of the term: 4 / (D (N - 1)) Zc (C - diag(v)), where
// Zc C = K Zc / (N - 1) in the Gram form. Centring drops out of every gradient term because
// their columns sum to zero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"

namespace sempairs {
namespace {

using at::Tensor;

constexpr double kStdEps = 1e-4;

void check_inputs(const Tensor& x, const Tensor& y, const char* op) {
  check_views(x, y, op);
  TORCH_CHECK_VALUE(x.size(0) >= 2, op, ": needs at least 2 samples per view, got ", x.size(0),
                    " (the variance and covariance divide by N - 1)");
}

bool gram_form(const Tensor& x) { return x.size(0) < x.size(1); }

std::tuple<Tensor, Tensor, Tensor> vicreg_forward(const Tensor& x, const Tensor& y, double sim_coeff,
                                                  double std_coeff, double cov_coeff) {
  check_inputs(x, y, "sempairs::vicreg");
  const int64_t n = x.size(0), d = x.size(1), g = gram_form(x) ? n : d;
  const Tensor views[2] = {x.to(accumulate_type(x.scalar_type())), y.to(accumulate_type(y.scalar_type()))};
  Tensor grams = at::empty({2, g, g}, views[0].options());
  Tensor variances = at::empty({2, d}, views[0].options());
  Tensor loss = sim_coeff * at::mse_loss(views[0], views[1]);
  for (int v = 0; v < 2; ++v) {
    const Tensor zc = views[v] - views[v].mean(0);
    Tensor gram = grams[v], var = variances[v];
    if (gram_form(x)) {
      at::mm_out(gram, zc, zc.t());
    } else {
      at::mm_out(gram, zc.t(), zc);
    }
    at::sum_out(var, zc.square(), at::IntArrayRef{0}).div_(n - 1);
    loss = loss + std_coeff / 2 * at::relu(1 - (var + kStdEps).sqrt()).mean() +
           cov_coeff * (gram.square().sum() / double((n - 1) * (n - 1)) - var.square().sum()) / d;
  }
  return {loss.to(x.scalar_type()), grams, variances};
}

std::tuple<Tensor, Tensor> vicreg_backward(const Tensor& grad, const Tensor& x, const Tensor& y,
                                           const Tensor& grams, const Tensor& variances, double sim_coeff,
                                           double std_coeff, double cov_coeff) {
  check_inputs(x, y, "sempairs::vicreg_backward");
  const int64_t n = x.size(0), d = x.size(1);
  const Tensor views[2] = {x.to(accumulate_type(x.scalar_type())), y.to(accumulate_type(y.scalar_type()))};
  const Tensor g = grad.to(views[0].scalar_type());
  const Tensor invariance = (views[0] - views[1]) * (2 * sim_coeff / (n * d));
  Tensor grads[2];
  for (int v = 0; v < 2; ++v) {
    const Tensor zc = views[v] - views[v].mean(0);
    const Tensor var = variances[v], std = (var + kStdEps).sqrt();
    // Per-dimension factors on Zc: the variance hinge and the diagonal part of the covariance.
    const Tensor column = -std_coeff / (2 * d) * (std < 1).to(std.scalar_type()) / ((n - 1) * std) -
                          4 * cov_coeff / (d * (n - 1)) * var;
    const Tensor zc_c = gram_form(x) ? at::mm(grams[v], zc) : at::mm(zc, grams[v]);  // (N - 1) Zc C
    Tensor dz = zc * column + zc_c * (4 * cov_coeff / (d * double((n - 1) * (n - 1))));
    dz = v == 0 ? dz + invariance : dz - invariance;
    grads[v] = (dz * g).to(x.scalar_type());
  }
  return {grads[0], grads[1]};
}

void register_kernels(torch::Library& m) {
  m.impl("vicreg", &vicreg_forward);
  m.impl("vicreg_backward", &vicreg_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(sempairs, CPU, m) { register_kernels(m); }
// The same ATen code runs on CUDA tensors, so the CPU extension registers it for CUDA as well.
TORCH_LIBRARY_IMPL(sempairs, CUDA, m) { register_kernels(m); }

}  // namespace sempairs
