// NT-Xent on CUDA, forward and backward, without the M x M similarity matrix (M = 2N views).
//
// The maths of csrc/cpu/nt_xent.cpp: float32 rows q_i = z_i sqrt(log2(e) / t) whatever the input
// dtype, so S = Q Q^T holds base-2 logits; each row's log-sum-exp is kept for backward.
//   normalise       one warp per pair (i, i + N): Q, the row norms, the positive logits.
//   lse_partials    a block owns 64 rows and a range of 64-column tiles; it builds each tile of S
//                   in registers (4 x 4 entries per thread, D staged through shared memory and
//                   read as float4, so that shared-memory bandwidth keeps up with the FMAs) and
//                   folds it into running (max, sum) pairs. At small M the columns are split over
//                   several blocks so that the grid fills the GPU.
//   finish_forward  merges the splits' pairs into log-sum-exps and reduces the loss.
//   grad_partials   a block owns 64 rows, a 128-wide slice of D and a range of column tiles; per
//                   tile it recomputes S, forms W = P + P^T from the saved log-sum-exps (S is
//                   symmetric, so P_ji = exp2(s_ij - l_j)) and accumulates W Q_J into its own rows.
//   finish_backward sums the splits, subtracts the positive term and goes back through the
//                   normalisation, writing the input dtype.
// No atomics, and every sum has a fixed order: results are deterministic. Memory beyond inputs and
// outputs: Q and the partial gradients (splits x M x D floats; splits > 1 only at small M).
// All arithmetic is float32 on the CUDA cores (no tensor cores, so float32 results keep float32
// accuracy). Each 128-wide slice of D recomputes S in backward: made for SimCLR's D = 128; at
// large D the backward costs (D / 128 + 1) / 2 times the minimum.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"

namespace sempairs {
namespace {

using at::Tensor;

constexpr int kTile = 64;      // rows and columns of a tile of S
constexpr int kDepth = 16;     // slice of D staged in shared memory per step
constexpr int kThreads = 256;  // 16 x 16 threads (tx, ty), each holding 4 x 4 entries of a tile
constexpr int kPad = kTile + 4;  // shared rows padded against bank conflicts, float4-aligned
constexpr int kSlice = 128;    // columns of the gradient accumulated by one backward block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

#define DISPATCH_INPUT_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

struct __align__(16) Stage {
  float rows[kDepth][kPad];  // transposed: [k][row]
  float cols[kDepth][kPad];
};

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}

// s[i][j] = q_{row0 + 4 ty + i} . q_{col0 + 4 tx + j}, with zeros past the last row.
__device__ void similarities(const float* __restrict__ q, int m, int d, int row0, int col0, Stage& stage,
                             float (&s)[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
  for (int k0 = 0; k0 < d; k0 += kDepth) {
    for (int e = threadIdx.x; e < kTile * kDepth; e += kThreads) {
      const int r = e / kDepth, k = e % kDepth;
      const bool in_depth = k0 + k < d;
      stage.rows[k][r] = row0 + r < m && in_depth ? q[int64_t(row0 + r) * d + k0 + k] : 0.f;
      stage.cols[k][r] = col0 + r < m && in_depth ? q[int64_t(col0 + r) * d + k0 + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      float a[4], b[4];
      load4(&stage.rows[k][4 * ty], a);
      load4(&stage.cols[k][4 * tx], b);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(a[i], b[j], s[i][j]);
    }
    __syncthreads();
  }
}

// (max, sum) of 2^x over a set, merged with another set's pair; (-inf, 0) is the empty set.
__device__ __forceinline__ void merge(float& max, float& sum, float other_max, float other_sum) {
  const float m = fmaxf(max, other_max);
  if (m == -INFINITY) return;
  sum = sum * exp2f(max - m) + other_sum * exp2f(other_max - m);
  max = m;
}

template <typename scalar_t>
__global__ void normalise(const scalar_t* __restrict__ z1, int64_t row_stride1, int64_t col_stride1,
                          const scalar_t* __restrict__ z2, int64_t row_stride2, int64_t col_stride2, int n,
                          int d, float scale, float inv_temperature, float* __restrict__ q,
                          float* __restrict__ norm, float* __restrict__ positive) {
  const int pair = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (pair >= n) return;  // the whole warp
  const scalar_t* a = z1 + pair * row_stride1;
  const scalar_t* b = z2 + pair * row_stride2;
  float aa = 0.f, bb = 0.f, ab = 0.f;
  for (int k = lane; k < d; k += 32) {
    const float x = static_cast<float>(a[k * col_stride1]), y = static_cast<float>(b[k * col_stride2]);
    aa += x * x;
    bb += y * y;
    ab += x * y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    aa += __shfl_xor_sync(0xffffffffu, aa, offset);
    bb += __shfl_xor_sync(0xffffffffu, bb, offset);
    ab += __shfl_xor_sync(0xffffffffu, ab, offset);
  }
  const float ra = fmaxf(sqrtf(aa), 1e-12f), rb = fmaxf(sqrtf(bb), 1e-12f);  // as F.normalize
  float* qa = q + int64_t(pair) * d;
  float* qb = q + int64_t(pair + n) * d;
  for (int k = lane; k < d; k += 32) {
    qa[k] = static_cast<float>(a[k * col_stride1]) * (scale / ra);
    qb[k] = static_cast<float>(b[k * col_stride2]) * (scale / rb);
  }
  if (lane == 0) {
    norm[pair] = ra;
    norm[pair + n] = rb;
    positive[pair] = ab / (ra * rb) * inv_temperature;
  }
}

__global__ void __launch_bounds__(kThreads)
    lse_partials(const float* __restrict__ q, int m, int d, int tiles_per_split, float2* __restrict__ partials) {
  __shared__ Stage stage;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, row0 = blockIdx.x * kTile, split = blockIdx.y;
  const int col_begin = split * tiles_per_split * kTile, col_end = min(m, col_begin + tiles_per_split * kTile);
  float max[4], sum[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) max[i] = -INFINITY, sum[i] = 0.f;
  for (int col0 = col_begin; col0 < col_end; col0 += kTile) {
    float s[4][4];
    similarities(q, m, d, row0, col0, stage, s);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + 4 * ty + i;
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = col0 + 4 * tx + j;
        if (col >= col_end || col == row) s[i][j] = -INFINITY;  // a view is not its own negative
        tile_max = fmaxf(tile_max, s[i][j]);
      }
      if (tile_max == -INFINITY) continue;
      const float new_max = fmaxf(max[i], tile_max);
      float acc = sum[i] * exp2f(max[i] - new_max);
#pragma unroll
      for (int j = 0; j < 4; ++j) acc += exp2f(s[i][j] - new_max);
      max[i] = new_max;
      sum[i] = acc;
    }
  }
  // The 16 threads of a row are one half of a warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    for (int offset = 8; offset > 0; offset /= 2)
      merge(max[i], sum[i], __shfl_xor_sync(0xffffffffu, max[i], offset),
            __shfl_xor_sync(0xffffffffu, sum[i], offset));
    const int row = row0 + 4 * ty + i;
    if (tx == 0 && row < m) partials[int64_t(split) * m + row] = make_float2(max[i], sum[i]);
  }
}

template <typename scalar_t>
__global__ void finish_forward(const float2* __restrict__ partials, int splits, const float* __restrict__ positive,
                               int n, float* __restrict__ lse, scalar_t* __restrict__ loss) {
  __shared__ float total[1024];
  const int m = 2 * n;
  float acc = 0.f;
  for (int row = threadIdx.x; row < m; row += blockDim.x) {
    float max = -INFINITY, sum = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float2 p = partials[int64_t(s) * m + row];
      merge(max, sum, p.x, p.y);
    }
    lse[row] = (max + log2f(sum)) * kLn2;
    acc += lse[row] - positive[row % n];
  }
  total[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) total[threadIdx.x] += total[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<scalar_t>(total[0] / m);
}

__global__ void __launch_bounds__(kThreads)
    grad_partials(const float* __restrict__ q, const float* __restrict__ lse, int m, int d, int tiles_per_split,
                  float* __restrict__ partials) {
  __shared__ Stage stage;
  __shared__ __align__(16) float w[kTile][kPad];  // transposed: [column][row]
  __shared__ __align__(16) float qj[kTile][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16, row0 = blockIdx.x * kTile, split = blockIdx.y;
  const int d0 = blockIdx.z * kSlice;
  const int col_begin = split * tiles_per_split * kTile, col_end = min(m, col_begin + tiles_per_split * kTile);
  float row_lse2[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) row_lse2[i] = row0 + 4 * ty + i < m ? lse[row0 + 4 * ty + i] * kLog2e : 0.f;
  float acc[4][kSlice / 16] = {};  // rows 4 ty + i, columns d0 + 64 h + 4 tx + j at [i][4 h + j]
  for (int col0 = col_begin; col0 < col_end; col0 += kTile) {
    float s[4][4];
    similarities(q, m, d, row0, col0, stage, s);  // its barriers also end the last tile's reads of w
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = col0 + 4 * tx + j;
      const float col_lse2 = col < col_end ? lse[col] * kLog2e : 0.f;
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = row0 + 4 * ty + i;
        v[i] = row < m && col < col_end && col != row ? exp2f(s[i][j] - row_lse2[i]) + exp2f(s[i][j] - col_lse2)
                                                      : 0.f;
      }
      *reinterpret_cast<float4*>(&w[4 * tx + j][4 * ty]) = make_float4(v[0], v[1], v[2], v[3]);
    }
#pragma unroll
    for (int h = 0; h < kSlice / kTile; ++h) {
      __syncthreads();  // w is complete, and the previous half's reads of qj are done
      for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
        const int r = e / kTile, c = d0 + h * kTile + e % kTile;
        qj[r][e % kTile] = col0 + r < col_end && c < d ? q[int64_t(col0 + r) * d + c] : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) {
        float a[4], b[4];
        load4(&w[k][4 * ty], a);
        load4(&qj[k][4 * tx], b);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][4 * h + j] = fmaf(a[i], b[j], acc[i][4 * h + j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = row0 + 4 * ty + i;
#pragma unroll
    for (int hj = 0; hj < kSlice / 16; ++hj) {
      const int col = d0 + (hj / 4) * kTile + 4 * tx + hj % 4;
      if (row < m && col < d) partials[(int64_t(split) * m + row) * d + col] = acc[i][hj];
    }
  }
}

template <typename scalar_t>
__global__ void finish_backward(const float* __restrict__ partials, int splits, const float* __restrict__ q,
                                const float* __restrict__ norm, const scalar_t* __restrict__ grad, int n, int d,
                                float scale, float inv_a2, scalar_t* __restrict__ dz1, scalar_t* __restrict__ dz2) {
  const int m = 2 * n, row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (row >= m) return;  // the whole warp
  const float* qi = q + int64_t(row) * d;
  const float* partner = q + int64_t((row + n) % m) * d;
  // (P + P^T) Q - 2 Q_p, row `row`, column k
  auto g = [&](int k) {
    float v = -2.f * partner[k];
    for (int s = 0; s < splits; ++s) v += partials[(int64_t(s) * m + row) * d + k];
    return v;
  };
  float dot = 0.f;
  for (int k = lane; k < d; k += 32) dot += g(k) * qi[k];
  for (int offset = 16; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  const float c = static_cast<float>(*grad) * scale / norm[row], proj = dot * inv_a2;
  scalar_t* out = row < n ? dz1 + int64_t(row) * d : dz2 + int64_t(row - n) * d;
  for (int k = lane; k < d; k += 32) out[k] = static_cast<scalar_t>(c * (g(k) - proj * qi[k]));
}

void check(const Tensor& z1, const Tensor& z2, double temperature, const char* op) {
  check_views(z1, z2, op);
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  TORCH_CHECK(z1.size(0) < (1 << 29) && z1.size(1) < (1 << 30), op, ": input too large ", z1.sizes());
}

int div_up(int a, int b) { return (a + b - 1) / b; }

// Column splits: enough blocks to cover the GPU twice at small M, a single split at large M.
int tiles_per_split(int blocks_per_split, int col_tiles) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int splits = std::max(1, std::min(div_up(2 * sms, blocks_per_split), col_tiles));
  return div_up(col_tiles, splits);
}

// Q (float32, scaled to base-2 logits), the clamped row norms and the positive logits.
std::tuple<Tensor, Tensor, Tensor> normalised(const Tensor& z1, const Tensor& z2, double temperature) {
  const int n = z1.size(0), d = z1.size(1);
  const auto options = z1.options().dtype(at::kFloat);
  Tensor q = at::empty({2 * n, d}, options), norm = at::empty({2 * n}, options), positive = at::empty({n}, options);
  DISPATCH_INPUT_TYPES(z1.scalar_type(), "sempairs_normalise", [&] {
    normalise<scalar_t><<<div_up(n, kThreads / 32), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z1.data_ptr<scalar_t>(), z1.stride(0), z1.stride(1), z2.data_ptr<scalar_t>(), z2.stride(0), z2.stride(1),
        n, d, std::sqrt(kLog2e / temperature), 1.f / temperature, q.data_ptr<float>(), norm.data_ptr<float>(),
        positive.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, norm, positive};
}

std::tuple<Tensor, Tensor> nt_xent_cuda(const Tensor& z1, const Tensor& z2, double temperature) {
  check(z1, z2, temperature, "sempairs::nt_xent");
  const c10::cuda::CUDAGuard guard(z1.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int n = z1.size(0), m = 2 * n, d = z1.size(1), tiles = div_up(m, kTile);
  Tensor q, norm, positive;
  std::tie(q, norm, positive) = normalised(z1, z2, temperature);
  const int per_split = tiles_per_split(tiles, tiles), splits = div_up(tiles, per_split);
  Tensor partials = at::empty({splits, m, 2}, q.options());
  lse_partials<<<dim3(tiles, splits), kThreads, 0, stream>>>(q.data_ptr<float>(), m, d, per_split,
                                                            reinterpret_cast<float2*>(partials.data_ptr<float>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor lse = at::empty({m}, q.options()), loss = at::empty({}, z1.options());
  DISPATCH_INPUT_TYPES(z1.scalar_type(), "sempairs_finish_forward", [&] {
    finish_forward<scalar_t><<<1, 1024, 0, stream>>>(reinterpret_cast<const float2*>(partials.data_ptr<float>()),
                                                     splits, positive.data_ptr<float>(), n, lse.data_ptr<float>(),
                                                     loss.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

std::tuple<Tensor, Tensor> nt_xent_backward_cuda(const Tensor& grad, const Tensor& z1, const Tensor& z2,
                                                 const Tensor& lse, double temperature) {
  check(z1, z2, temperature, "sempairs::nt_xent_backward");
  const c10::cuda::CUDAGuard guard(z1.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int n = z1.size(0), m = 2 * n, d = z1.size(1), tiles = div_up(m, kTile), slices = div_up(d, kSlice);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == m && lse.scalar_type() == at::kFloat && lse.device() == z1.device(),
              "sempairs::nt_xent_backward: lse must be the (2N,) tensor nt_xent returned");
  TORCH_CHECK(grad.numel() == 1 && grad.device() == z1.device(), "sempairs::nt_xent_backward: grad must be a scalar");
  Tensor q, norm, positive;
  std::tie(q, norm, positive) = normalised(z1, z2, temperature);
  const Tensor lse_c = lse.contiguous(), g = grad.to(z1.scalar_type()).contiguous();
  const int per_split = tiles_per_split(tiles * slices, tiles), splits = div_up(tiles, per_split);
  Tensor partials = at::empty({splits, m, d}, q.options());
  grad_partials<<<dim3(tiles, splits, slices), kThreads, 0, stream>>>(q.data_ptr<float>(), lse_c.data_ptr<float>(),
                                                                     m, d, per_split, partials.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor dz1 = at::empty({n, d}, z1.options()), dz2 = at::empty({n, d}, z1.options());
  const float a2 = kLog2e / temperature, scale = 1.f / (m * temperature * std::sqrt(a2));
  DISPATCH_INPUT_TYPES(z1.scalar_type(), "sempairs_finish_backward", [&] {
    finish_backward<scalar_t><<<div_up(m, kThreads / 32), kThreads, 0, stream>>>(
        partials.data_ptr<float>(), splits, q.data_ptr<float>(), norm.data_ptr<float>(), g.data_ptr<scalar_t>(), n,
        d, scale, 1.f / a2, dz1.data_ptr<scalar_t>(), dz2.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dz1, dz2};
}

}  // namespace

TORCH_LIBRARY_IMPL(sempairs, CUDA, m) {
  m.impl("nt_xent", &nt_xent_cuda);
  m.impl("nt_xent_backward", &nt_xent_backward_cuda);
}

}  // namespace sempairs

// A Python module with nothing in it: importing common._C_cuda registers the CUDA kernels.
extern "C" PyObject* PyInit__C_cuda() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
