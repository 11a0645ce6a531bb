// NT-Xent on CPU, forward and backward, without the M x M similarity matrix (M = 2N views).
//
// Rows are scaled to q_i = z_i sqrt(log2(e) / t), so S = Q Q^T holds the logits in base 2 and
// every exponential is an exp2. The rows are cut into blocks. A tile S_IJ = Q_I Q_J^T is a BLAS
// GEMM into a per-thread buffer, computed once for both its row block I and, through
// S_JI = S_IJ^T, its column block J. A round-robin order of the block pairs puts tiles on
// different blocks next to each other, so they run in parallel; no two tiles on one block run at
// once, so there is no per-thread copy of the output, and every row adds up its tiles in the same
// order whatever the number of threads. Memory beyond inputs and outputs: Q, an M x D gradient
// and one tile per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "../checks.h"

namespace sempairs {
namespace {

using at::Tensor;

constexpr int64_t kMaxBlock = 256;  // rows per block; a tile buffer holds kMaxBlock^2 entries
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// A few lanes of T and the exp2 the tiles need. float uses GCC/Clang vector extensions, which
// compile to SSE, AVX or NEON without intrinsics; double, there for exact checks, stays scalar.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
#ifdef __AVX2__
  static constexpr int kLanes = 8;
#else
  static constexpr int kLanes = 4;
#endif
  typedef float V __attribute__((vector_size(4 * kLanes)));
  typedef int32_t I __attribute__((vector_size(4 * kLanes)));
  // 2^x for the x <= 0 of shifted logits: 2^round(x) written into the exponent bits times a
  // degree-6 polynomial for 2^f, f in [-1/2, 1/2] (relative error < 1e-7); 0 below 2^-126.5.
  static V exp2(V x) {
    x = x < -127.f ? -127.f : x;
    const V n = (x + 12582912.f) - 12582912.f;  // round to nearest: 12582912 = 1.5 * 2^23
    const V f = x - n;
    V p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.f;
    return p * (V)((__builtin_convertvector(n, I) + 127) << 23);
  }
};

template <>
struct Simd<double> {
  static constexpr int kLanes = 1;
  using V = double;
  static V exp2(V x) { return std::exp2(x); }
};

template <typename T>
using Vec = typename Simd<T>::V;
template <typename T>
constexpr int kLanes = Simd<T>::kLanes;
template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename T>
Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
template <typename T>
Vec<T> splat(T x) {
  return Vec<T>{} + x;
}
template <typename T>
Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}
template <typename T>
T lane_sum(Vec<T> v) {
  T lanes[kLanes<T>];
  std::memcpy(lanes, &v, sizeof v);
  T sum = 0;
  for (T x : lanes) sum += x;
  return sum;
}
template <typename T>
T lane_max(Vec<T> v) {
  T lanes[kLanes<T>];
  std::memcpy(lanes, &v, sizeof v);
  T max = lanes[0];
  for (T x : lanes) max = std::max(max, x);
  return max;
}

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The tiles (I, J), I <= J, round by round: by the circle method, each of blocks - 1 rounds pairs
// up all blocks (rounded up to an even count, the extra one sitting out), so neighbouring tiles
// in the order touch different blocks; a last round holds the diagonal tiles (I, I).
std::vector<std::pair<int64_t, int64_t>> tile_order(int64_t blocks) {
  const int64_t n = blocks + blocks % 2;
  std::vector<std::pair<int64_t, int64_t>> order;
  for (int64_t r = 0; r + 1 < n; ++r)
    for (int64_t k = 0; k < n / 2; ++k) {
      const int64_t a = k == 0 ? n - 1 : (r + k) % (n - 1), b = (r - k + n - 1) % (n - 1);
      if (a < blocks && b < blocks) order.emplace_back(std::min(a, b), std::max(a, b));
    }
  for (int64_t i = 0; i < blocks; ++i) order.emplace_back(i, i);
  return order;
}

template <typename T>
struct Tiles {
  Tensor q;        // M x D, contiguous, rows scaled to base-2 logits
  Tensor buffers;  // threads x kMaxBlock x kMaxBlock
  int64_t rows, block, blocks;

  explicit Tiles(Tensor q_) : q(std::move(q_)), rows(q.size(0)) {
    // At least 8 blocks (4 tiles a round) where rows allow; the tiling, and so the rounding, does
    // not depend on the number of threads.
    block = std::min(kMaxBlock, std::max<int64_t>(32, round_up((rows + 7) / 8, 8)));
    blocks = (rows + block - 1) / block;
    buffers = at::empty({at::get_num_threads(), kMaxBlock, kMaxBlock}, q.options());
  }
  int64_t start(int64_t b) const { return b * block; }
  int64_t size(int64_t b) const { return std::min(block, rows - b * block); }
  Tensor rows_of(const Tensor& t, int64_t b) const { return t.narrow(0, start(b), size(b)); }
  Tensor tile(int thread, int64_t I, int64_t J) const {
    return buffers[thread].narrow(0, 0, size(I)).narrow(1, 0, size(J));
  }

  // S_IJ into this thread's buffer (row stride kMaxBlock), returned as a pointer. The diagonal of
  // S_II is -inf (a view is not its own negative), and so are the columns that pad each row to
  // whole vectors: those entries add exp2(-inf) = 0 wherever they are summed.
  T* similarities(int thread, int64_t I, int64_t J) const {
    Tensor out = tile(thread, I, J);
    at::mm_out(out, rows_of(q, I), rows_of(q, J).t());
    T* s = buffers[thread].data_ptr<T>();
    const int64_t width = round_up(size(J), kLanes<T>);
    for (int64_t a = 0; a < size(I); ++a) {
      std::fill(s + a * kMaxBlock + size(J), s + a * kMaxBlock + width, -kInf<T>);
      if (I == J) s[a * kMaxBlock + a] = -kInf<T>;
    }
    return s;
  }

  // Runs body(thread, I, J) on every tile. Workers take tiles in tile_order and start one
  // once the earlier tiles of both its blocks are done: each block sees its tiles in a fixed order
  // (deterministic sums, no two tiles on a block at once) and no worker waits for a whole round.
  template <typename F>
  void for_each(const F& body) const {
    const auto tiles = tile_order(blocks);
    std::vector<std::pair<int64_t, int64_t>> turn;  // how many earlier tiles each of its blocks has
    std::vector<int64_t> count(blocks, 0);
    for (const auto& [I, J] : tiles) {
      turn.emplace_back(count[I], count[J]);
      ++count[I];
      if (J != I) ++count[J];
    }
    std::vector<std::atomic<int64_t>> done(blocks);
    for (auto& d : done) d.store(0);
    std::atomic<size_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      at::AutoDispatchBelowADInplaceOrView guard;  // views and GEMMs on buffers need no autograd
      for (size_t k; (k = next++) < tiles.size();) {
        const auto [I, J] = tiles[k];
        while (done[I].load(std::memory_order_acquire) != turn[k].first ||
               done[J].load(std::memory_order_acquire) != turn[k].second)
          std::this_thread::yield();
        body(at::get_thread_num(), I, J);
        done[I].fetch_add(1, std::memory_order_release);
        if (J != I) done[J].fetch_add(1, std::memory_order_release);
      }
    });
  }
};

// Online log-sum-exp (base 2) of one row of a tile into the row's running (max, sum).
template <typename T>
void absorb_row(const T* s, int64_t width, T& run_max, T& run_sum) {
  Vec<T> max = splat<T>(-kInf<T>);
  for (int64_t b = 0; b < width; b += kLanes<T>) max = vmax<T>(max, load(s + b));
  const T shift = std::max(run_max, lane_max<T>(max));
  if (shift == -kInf<T>) return;  // nothing but masked entries so far
  Vec<T> sum = splat<T>(0);
  for (int64_t b = 0; b < width; b += kLanes<T>) sum += Simd<T>::exp2(load(s + b) - shift);
  run_sum = run_sum * std::exp2(run_max - shift) + lane_sum<T>(sum);
  run_max = shift;
}

// The same for the columns of a tile, i.e. the rows of the transposed tile.
template <typename T>
void absorb_columns(const T* s, int64_t rows, int64_t cols, T* run_max, T* run_sum) {
  const int64_t width = round_up(cols, kLanes<T>);
  alignas(64) T shift[kMaxBlock], sum[kMaxBlock];
  std::fill(shift, shift + width, -kInf<T>);
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = 0; b < width; b += kLanes<T>)
      store(shift + b, vmax<T>(load(shift + b), load(s + a * kMaxBlock + b)));
  for (int64_t b = 0; b < width; ++b) {
    shift[b] = b < cols ? std::max(shift[b], run_max[b]) : 0;  // finite: each column has a finite entry
    sum[b] = 0;
  }
  for (int64_t a = 0; a < rows; ++a)
    for (int64_t b = 0; b < width; b += kLanes<T>)
      store(sum + b, load(sum + b) + Simd<T>::exp2(load(s + a * kMaxBlock + b) - load(shift + b)));
  for (int64_t b = 0; b < cols; ++b) {
    run_sum[b] = run_sum[b] * std::exp2(run_max[b] - shift[b]) + sum[b];
    run_max[b] = shift[b];
  }
}

// q (scaled as above) and the clamped row norms, as F.normalize: z / max(||z||, 1e-12).
std::pair<Tensor, Tensor> normalise(const Tensor& z1, const Tensor& z2, double temperature) {
  Tensor q = at::cat({z1, z2});
  Tensor norm = at::linalg_vector_norm(q, 2, at::IntArrayRef{1}).clamp_min_(1e-12);
  q.mul_((std::sqrt(kLog2e / temperature) / norm).unsqueeze(1));
  return {q, norm};
}

void check_temperature(double temperature) {
  TORCH_CHECK(temperature > 0, "sempairs::nt_xent: temperature must be positive, got ", temperature);
}

template <typename T>
std::tuple<Tensor, Tensor> forward(const Tensor& z1, const Tensor& z2, double temperature) {
  Tensor q, norm;
  std::tie(q, norm) = normalise(z1, z2, temperature);
  const int64_t n = z1.size(0), m = 2 * n;
  const Tiles<T> tiles(q);
  Tensor run_max = at::full({m}, -kInf<T>, q.options()), run_sum = at::zeros({m}, q.options());
  T* max = run_max.data_ptr<T>();
  T* sum = run_sum.data_ptr<T>();
  tiles.for_each([&](int thread, int64_t I, int64_t J) {
    const T* s = tiles.similarities(thread, I, J);
    const int64_t i0 = tiles.start(I), j0 = tiles.start(J);
    for (int64_t a = 0; a < tiles.size(I); ++a)
      absorb_row(s + a * kMaxBlock, round_up(tiles.size(J), kLanes<T>), max[i0 + a], sum[i0 + a]);
    if (I != J) absorb_columns(s, tiles.size(I), tiles.size(J), max + j0, sum + j0);
  });
  Tensor lse = (run_max + run_sum.log2()) * kLn2;
  Tensor positive = (q.narrow(0, 0, n) * q.narrow(0, n, n)).sum(1) * kLn2;  // s_{i,p(i)}
  return {(lse.sum() - 2 * positive.sum()) / m, lse};
}

template <typename T>
std::tuple<Tensor, Tensor> backward(const Tensor& grad, const Tensor& z1, const Tensor& z2,
                                    const Tensor& lse, double temperature) {
  Tensor q, norm;
  std::tie(q, norm) = normalise(z1, z2, temperature);
  const int64_t n = z1.size(0), m = 2 * n, d = z1.size(1);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == m && lse.scalar_type() == q.scalar_type(),
              "sempairs::nt_xent_backward: lse must be the (2N,) tensor nt_xent returned");
  const Tiles<T> tiles(q);
  Tensor lse2_tensor = (lse * kLog2e).contiguous();
  const T* lse2 = lse2_tensor.data_ptr<T>();
  Tensor dq = at::zeros_like(q);  // sum_j (P + P^T)_ij q_j
  tiles.for_each([&](int thread, int64_t I, int64_t J) {
    T* s = tiles.similarities(thread, I, J);
    const int64_t i0 = tiles.start(I), j0 = tiles.start(J), width = round_up(tiles.size(J), kLanes<T>);
    alignas(64) T col_lse2[kMaxBlock];
    for (int64_t b = 0; b < width; ++b) col_lse2[b] = b < tiles.size(J) ? lse2[j0 + b] : 0;
    for (int64_t a = 0; a < tiles.size(I); ++a) {  // W = P_IJ + P_JI^T, in place of S_IJ
      T* row = s + a * kMaxBlock;
      for (int64_t b = 0; b < width; b += kLanes<T>) {
        const Vec<T> x = load(row + b);
        store(row + b, Simd<T>::exp2(x - lse2[i0 + a]) + Simd<T>::exp2(x - load(col_lse2 + b)));
      }
    }
    const Tensor w = tiles.tile(thread, I, J);
    tiles.rows_of(dq, I).addmm_(w, tiles.rows_of(q, J));
    if (I != J) tiles.rows_of(dq, J).addmm_(w.t(), tiles.rows_of(q, I));
  });

  // dL/dz_k = g / (M t a) (dq_k - 2 q_p(k)) with a = sqrt(log2(e) / t), z_k = q_k / a; then
  // through the normalisation: dx_k = (dz_k - (dz_k . z_k) z_k) / r_k.
  Tensor dz1 = at::empty({n, d}, q.options()), dz2 = at::empty({n, d}, q.options());
  const T a2 = kLog2e / temperature, scale = grad.item<T>() / (m * temperature * std::sqrt(a2));
  T* g = dq.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* r = norm.data_ptr<T>();
  T* out1 = dz1.data_ptr<T>();
  T* out2 = dz2.data_ptr<T>();
  at::parallel_for(0, m, 16, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      T* gi = g + i * d;
      const T* qi = qp + i * d;
      const T* partner = qp + ((i + n) % m) * d;
      T dot = 0;
      for (int64_t k = 0; k < d; ++k) {
        gi[k] -= 2 * partner[k];
        dot += gi[k] * qi[k];
      }
      T* out = i < n ? out1 + i * d : out2 + (i - n) * d;
      const T c = scale / r[i], proj = dot / a2;
      for (int64_t k = 0; k < d; ++k) out[k] = c * (gi[k] - proj * qi[k]);
    }
  });
  return {dz1, dz2};
}

std::tuple<Tensor, Tensor> nt_xent_cpu(const Tensor& z1, const Tensor& z2, double temperature) {
  check_views(z1, z2, "sempairs::nt_xent");
  check_temperature(temperature);
  return AT_DISPATCH_FLOATING_TYPES(z1.scalar_type(), "nt_xent_cpu",
                                    [&] { return forward<scalar_t>(z1, z2, temperature); });
}

std::tuple<Tensor, Tensor> nt_xent_backward_cpu(const Tensor& grad, const Tensor& z1, const Tensor& z2,
                                                const Tensor& lse, double temperature) {
  check_views(z1, z2, "sempairs::nt_xent_backward");
  check_temperature(temperature);
  return AT_DISPATCH_FLOATING_TYPES(z1.scalar_type(), "nt_xent_backward_cpu", [&] {
    return backward<scalar_t>(grad, z1, z2, lse, temperature);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sempairs, CPU, m) {
  m.impl("nt_xent", &nt_xent_cpu);
  m.impl("nt_xent_backward", &nt_xent_backward_cpu);
}

}  // namespace sempairs
