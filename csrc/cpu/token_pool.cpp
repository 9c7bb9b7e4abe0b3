// Grid pooling (avg / max / weighted, forward and backward) and top-k selection on CPU.
// Parallel over (batch, output bin) or (batch, cell); inner loops run over the contiguous D axis.
#include "cpu/convert.h"
#include "cpu/ops_cpu.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace tokengine::cpu {
namespace {

enum class Mode { Avg, Max, Weighted };

Mode parse_mode(const std::string& mode) {
  if (mode == "avg") return Mode::Avg;
  if (mode == "max") return Mode::Max;
  TORCH_CHECK(mode == "weighted", "grid_pool: unknown mode '", mode, "'");
  return Mode::Weighted;
}

// Adaptive-pooling bins of one axis plus, per cell, the range [first, last) of bins holding it
// (consecutive bins may share a cell, so the backward gathers from up to two bins per axis).
struct Bins {
  std::vector<int64_t> start, end, first, last;
  Bins(int64_t size, int64_t out) : start(out), end(out), first(size, out), last(size, 0) {
    for (int64_t i = 0; i < out; ++i) {
      start[i] = i * size / out;
      end[i] = ((i + 1) * size + out - 1) / out;
      for (int64_t c = start[i]; c < end[i]; ++c) {
        first[c] = std::min(first[c], i);
        last[c] = std::max(last[c], i + 1);
      }
    }
  }
};

struct Grid {
  Bins rows, cols;
  int64_t W;
  Grid(int64_t H, int64_t W, int64_t h, int64_t w) : rows(H, h), cols(W, w), W(W) {}
  int64_t count(int64_t i, int64_t j) const {
    return (rows.end[i] - rows.start[i]) * (cols.end[j] - cols.start[j]);
  }
  template <typename F>  // f(cell index) for every cell of bin (i, j)
  void for_cells(int64_t i, int64_t j, F&& f) const {
    for (int64_t r = rows.start[i]; r < rows.end[i]; ++r)
      for (int64_t c = cols.start[j]; c < cols.end[j]; ++c) f(r * W + c);
  }
};

// Float32 row kernels. Pooling runs at memory speed only with wide vectors, so on x86-64 they
// are also compiled for AVX2 and AVX-512 and picked at load time (target_clones); the build
// stays generic.
#if defined(__x86_64__) && defined(__GNUC__)
#define TE_ROW_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TE_ROW_KERNEL
#endif

TE_ROW_KERNEL void row_axpy(float* acc, const float* x, float w, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += w * x[d];
}

TE_ROW_KERNEL void row_max(float* acc, const float* x, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d)  // NaN propagates, as in adaptive_max_pool2d
    acc[d] = (x[d] > acc[d] || x[d] != x[d]) ? x[d] : acc[d];
}

TE_ROW_KERNEL void row_scale(float* acc, float s, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] *= s;
}

// x as float32: the row itself for float, else converted into buf.
template <typename T>
const float* f32_row(const T* x, float* buf, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    load_row(x, buf, D, D, 1.f);
    return buf;
  }
}

// Pools bin (i, j) of one sample (x: N x D, s: N scores) into acc[0:D) (buf: D floats scratch).
template <typename T>
void pool_bin(const Grid& g, int64_t i, int64_t j, const T* x, const float* s, Mode mode,
              int64_t D, float* acc, float* buf) {
  if (mode == Mode::Max) {
    std::fill(acc, acc + D, -std::numeric_limits<float>::infinity());
    g.for_cells(i, j, [&](int64_t n) { row_max(acc, f32_row(x + n * D, buf, D), D); });
    return;
  }
  std::fill(acc, acc + D, 0.f);
  if (mode == Mode::Weighted) {
    float total = 0.f;
    g.for_cells(i, j, [&](int64_t n) { total += s[n]; });
    if (total > 0.f) {
      g.for_cells(i, j, [&](int64_t n) { row_axpy(acc, f32_row(x + n * D, buf, D), s[n], D); });
      return row_scale(acc, 1.f / total, D);
    }
  }
  g.for_cells(i, j, [&](int64_t n) { row_axpy(acc, f32_row(x + n * D, buf, D), 1.f, D); });
  row_scale(acc, 1.f / static_cast<float>(g.count(i, j)), D);
}

}  // namespace

at::Tensor grid_pool_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& scores, int64_t H,
                         int64_t W, int64_t h, int64_t w, const std::string& mode) {
  const Mode m = parse_mode(mode);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W && x.is_contiguous(), "grid_pool_fwd: bad x");
  TORCH_CHECK(m != Mode::Weighted || (scores && scores->scalar_type() == at::kFloat &&
                                      scores->is_contiguous()),
              "grid_pool_fwd: weighted mode needs contiguous float32 scores");
  const int64_t B = x.size(0), N = H * W, D = x.size(2), nbins = h * w;
  auto out = at::empty({B, nbins, D}, x.options());
  const Grid g(H, W, h, w);
  const float* s = m == Mode::Weighted ? scores->data_ptr<float>() : nullptr;
  dispatch_dtype(x.scalar_type(), "grid_pool_fwd", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
#pragma omp parallel
    {
      std::vector<float> acc(D), buf(D);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * nbins; ++t) {
        const int64_t b = t / nbins, bin = t % nbins;
        // float32 output accumulates in place; other dtypes through acc
        float* dst = std::is_same_v<T, float> ? reinterpret_cast<float*>(op + t * D) : acc.data();
        pool_bin(g, bin / w, bin % w, xp + b * N * D, s ? s + b * N : nullptr, m, D, dst,
                 buf.data());
        if constexpr (!std::is_same_v<T, float>) store_row(acc.data(), op + t * D, D, 1.f);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> grid_pool_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& scores,
    int64_t H, int64_t W, int64_t h, int64_t w, const std::string& mode) {
  const Mode m = parse_mode(mode);
  TORCH_CHECK(m != Mode::Max, "grid_pool_bwd: mode 'max' has no CPU backward");
  const bool weighted = m == Mode::Weighted;
  TORCH_CHECK(x.dim() == 3 && x.size(1) == H * W && x.is_contiguous() &&
                  grad_out.is_contiguous() && grad_out.scalar_type() == x.scalar_type(),
              "grid_pool_bwd: bad x / grad_out");
  TORCH_CHECK(!weighted || (scores && scores->scalar_type() == at::kFloat &&
                            scores->is_contiguous()),
              "grid_pool_bwd: weighted mode needs contiguous float32 scores");
  const int64_t B = x.size(0), N = H * W, D = x.size(2), nbins = h * w;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == B && grad_out.size(1) == nbins &&
                  grad_out.size(2) == D,
              "grid_pool_bwd: grad_out must be (B, h*w, D)");
  auto grad_x = at::empty_like(x);
  c10::optional<at::Tensor> grad_s;
  if (weighted) grad_s = at::empty({B, N}, x.options().dtype(at::kFloat));
  const Grid g(H, W, h, w);
  const float* s = weighted ? scores->data_ptr<float>() : nullptr;
  float* gs = weighted ? grad_s->data_ptr<float>() : nullptr;
  dispatch_dtype(x.scalar_type(), "grid_pool_bwd", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* gop = grad_out.data_ptr<T>();
    T* gxp = grad_x.data_ptr<T>();
    // Weighted bins need their score sum and float32 output (d out / d s_n = (x_n - out) / sum).
    std::vector<float> total(weighted ? B * nbins : 0), wout(weighted ? B * nbins * D : 0);
    if (weighted) {
#pragma omp parallel
      {
        std::vector<float> buf(D);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < B * nbins; ++t) {
          const int64_t b = t / nbins, i = t % nbins / w, j = t % w;
          float sum = 0.f;
          g.for_cells(i, j, [&](int64_t n) { sum += s[b * N + n]; });
          total[t] = sum;
          pool_bin(g, i, j, xp + b * N * D, s + b * N, m, D, wout.data() + t * D, buf.data());
        }
      }
    }
#pragma omp parallel
    {
      std::vector<float> acc(D), xf(D), buf(D);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < B * N; ++t) {
        const int64_t b = t / N, r = t % N / W, c = t % W;
        std::fill(acc.begin(), acc.end(), 0.f);
        if (weighted) load_row(xp + t * D, xf.data(), D, D, 1.f);
        float dscore = 0.f;
        for (int64_t i = g.rows.first[r]; i < g.rows.last[r]; ++i) {
          for (int64_t j = g.cols.first[c]; j < g.cols.last[c]; ++j) {
            const int64_t bin = b * nbins + i * w + j;
            const float* go = f32_row(gop + bin * D, buf.data(), D);
            if (weighted && total[bin] > 0.f) {
              const float* o = wout.data() + bin * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += go[d] * (xf[d] - o[d]);
              dscore += dot / total[bin];
              row_axpy(acc.data(), go, s[t] / total[bin], D);
            } else {  // plain average (also a weighted bin whose scores sum to 0)
              row_axpy(acc.data(), go, 1.f / static_cast<float>(g.count(i, j)), D);
            }
          }
        }
        store_row(acc.data(), gxp + t * D, D, 1.f);
        if (weighted) gs[t] = dscore;
      }
    }
  });
  return {grad_x, grad_s};
}

std::tuple<at::Tensor, at::Tensor> topk_pool_fwd(const at::Tensor& x, const at::Tensor& scores,
                                                 int64_t k) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && scores.is_contiguous() &&
                  scores.scalar_type() == at::kFloat && scores.sizes() == x.sizes().slice(0, 2),
              "topk_pool_fwd: expected contiguous x (B, N, D) and float32 scores (B, N)");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(k >= 0 && k <= N, "topk_pool_fwd: k must be in [0, N]");
  auto values = at::empty({B, k, D}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  const float* s = scores.data_ptr<float>();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* vp = static_cast<char*>(values.data_ptr());
  int64_t* ip = indices.data_ptr<int64_t>();
  const int64_t row_bytes = D * x.element_size();
#pragma omp parallel
  {
    std::vector<int64_t> order(N);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* sb = s + b * N;
      std::iota(order.begin(), order.end(), int64_t{0});
      // Highest score first; equal scores keep the lower index first (a stable descending sort).
      auto higher = [sb](int64_t a, int64_t c) {
        return sb[a] > sb[c] || (sb[a] == sb[c] && a < c);
      };
      std::nth_element(order.begin(), order.begin() + k, order.end(), higher);
      std::sort(order.begin(), order.begin() + k);
      for (int64_t i = 0; i < k; ++i) {
        ip[b * k + i] = order[i];
        std::copy_n(xp + (b * N + order[i]) * row_bytes, row_bytes, vp + (b * k + i) * row_bytes);
      }
    }
  }
  return {values, indices};
}

}  // namespace tokengine::cpu
