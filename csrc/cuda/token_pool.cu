// Torch-facing launchers of the token-pooling CUDA kernels (token_pool_kernels.cuh).
#include "launch_utils.cuh"
#include "ops_cuda.h"
#include "token_pool_kernels.cuh"

#include <algorithm>

namespace tokengine::cuda {
namespace {

PoolMode parse_mode(const std::string& mode, bool allow_max) {
  if (mode == "avg") return PoolMode::kAvg;
  if (mode == "weighted") return PoolMode::kWeighted;
  if (mode == "max" && allow_max) return PoolMode::kMax;
  TORCH_CHECK(false, "grid_pool: unsupported mode '", mode, "'");
}

struct GridDims {
  int B, N, D, H, W, h, w;
};

GridDims check_grid(const at::Tensor& x, int64_t H, int64_t W, int64_t h, int64_t w) {
  check_cuda_contig(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be (B, N, D), got ", x.sizes());
  TORCH_CHECK(H >= 1 && W >= 1 && x.size(1) == H * W, "x must have N = H*W = ", H * W,
              " tokens, got ", x.size(1));
  TORCH_CHECK(h >= 1 && h <= H && w >= 1 && w <= W, "output grid (", h, ", ", w,
              ") must fit in the input grid (", H, ", ", W, ")");
  GridDims g{as_int(x.size(0), "B"), as_int(x.size(1), "N"), as_int(x.size(2), "D"),
             as_int(H, "H"), as_int(W, "W"), as_int(h, "h"), as_int(w, "w")};
  // Index arithmetic in the kernels uses int for products of two of these.
  TORCH_CHECK(int64_t(g.B) * g.N <= INT_MAX && int64_t(g.B) * g.h * g.w <= INT_MAX &&
                  (int64_t(g.H) + 1) * g.h <= INT_MAX && (int64_t(g.W) + 1) * g.w <= INT_MAX,
              "grid_pool: sizes too large");
  return g;
}

const float* check_scores(const at::Tensor& x, const c10::optional<at::Tensor>& scores,
                          bool needed) {
  if (!needed) return nullptr;
  TORCH_CHECK(scores.has_value() && scores->defined(), "mode 'weighted' needs scores");
  const at::Tensor& s = *scores;
  check_cuda_contig(s, "scores");
  check_same_device(x, s, "scores");
  TORCH_CHECK(s.scalar_type() == at::kFloat, "scores must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == x.size(0) && s.size(1) == x.size(1),
              "scores must be (B, N) = (", x.size(0), ", ", x.size(1), "), got ", s.sizes());
  return s.data_ptr<float>();
}

// Largest vector width (16-byte packs, else scalars) usable for rows of D elements of T at the
// given base pointers.
template <typename T>
bool can_vectorize(int D, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (D % kVec != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

int threads_for(int chunks) { return std::min(256, std::max(32, round_up(chunks, 32))); }

template <typename T, int VEC>
void launch_fwd(const GridDims& g, PoolMode mode, const T* x, const float* s, T* out,
                cudaStream_t stream) {
  const dim3 grid(g.B * g.h * g.w);
  const int threads = threads_for(g.D / VEC);
  switch (mode) {
    case PoolMode::kAvg:
      grid_pool_fwd_kernel<T, VEC, PoolMode::kAvg>
          <<<grid, threads, 0, stream>>>(x, s, out, g.N, g.D, g.H, g.W, g.h, g.w);
      break;
    case PoolMode::kMax:
      grid_pool_fwd_kernel<T, VEC, PoolMode::kMax>
          <<<grid, threads, 0, stream>>>(x, s, out, g.N, g.D, g.H, g.W, g.h, g.w);
      break;
    case PoolMode::kWeighted:
      grid_pool_fwd_kernel<T, VEC, PoolMode::kWeighted>
          <<<grid, threads, 0, stream>>>(x, s, out, g.N, g.D, g.H, g.W, g.h, g.w);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC>
void launch_bwd(const GridDims& g, bool weighted, const T* grad_out, const T* x, const float* s,
                float* bin_s, float* bin_c, T* grad_x, float* grad_s, cudaStream_t stream) {
  const int threads = threads_for(g.D / VEC);
  if (weighted) {
    weighted_bin_stats_kernel<T, VEC><<<g.B * g.h * g.w, threads, 0, stream>>>(
        grad_out, x, s, bin_s, bin_c, g.N, g.D, g.H, g.W, g.h, g.w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grid_pool_bwd_cell_kernel<T, VEC, true><<<g.B * g.N, threads, 0, stream>>>(
        grad_out, x, s, bin_s, bin_c, grad_x, grad_s, g.N, g.D, g.H, g.W, g.h, g.w);
  } else {
    grid_pool_bwd_cell_kernel<T, VEC, false><<<g.B * g.N, threads, 0, stream>>>(
        grad_out, x, s, nullptr, nullptr, grad_x, nullptr, g.N, g.D, g.H, g.W, g.h, g.w);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor grid_pool_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& scores, int64_t H,
                         int64_t W, int64_t h, int64_t w, const std::string& mode) {
  const GridDims g = check_grid(x, H, W, h, w);
  const PoolMode pm = parse_mode(mode, /*allow_max=*/true);
  const float* s = check_scores(x, scores, pm == PoolMode::kWeighted);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({g.B, g.h * g.w, g.D}, x.options());
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_types(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    if (can_vectorize<T>(g.D, {xp, op}))
      launch_fwd<T, 16 / sizeof(T)>(g, pm, xp, s, op, stream);
    else
      launch_fwd<T, 1>(g, pm, xp, s, op, stream);
  });
  return out;
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> grid_pool_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& scores,
    int64_t H, int64_t W, int64_t h, int64_t w, const std::string& mode) {
  const GridDims g = check_grid(x, H, W, h, w);
  const bool weighted = parse_mode(mode, /*allow_max=*/false) == PoolMode::kWeighted;
  const float* s = check_scores(x, scores, weighted);
  check_cuda_contig(grad_out, "grad_out");
  check_same_device(x, grad_out, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out must have dtype ",
              x.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.B && grad_out.size(1) == g.h * g.w &&
                  grad_out.size(2) == g.D,
              "grad_out must be (B, h*w, D) = (", g.B, ", ", g.h * g.w, ", ", g.D, "), got ",
              grad_out.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  c10::optional<at::Tensor> grad_scores;
  at::Tensor bin_s, bin_c;
  if (weighted) {
    grad_scores = at::empty({g.B, g.N}, x.options().dtype(at::kFloat));
    bin_s = at::empty({g.B, g.h * g.w}, x.options().dtype(at::kFloat));
    bin_c = at::empty({g.B, g.h * g.w}, x.options().dtype(at::kFloat));
  }
  if (int64_t(g.B) * g.N == 0) return {grad_x, grad_scores};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  float* bs = weighted ? bin_s.data_ptr<float>() : nullptr;
  float* bc = weighted ? bin_c.data_ptr<float>() : nullptr;
  float* gs = weighted ? grad_scores->data_ptr<float>() : nullptr;
  dispatch_float_types(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* gop = static_cast<const T*>(grad_out.data_ptr());
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* gxp = static_cast<T*>(grad_x.data_ptr());
    if (can_vectorize<T>(g.D, {gop, xp, gxp}))
      launch_bwd<T, 16 / sizeof(T)>(g, weighted, gop, xp, s, bs, bc, gxp, gs, stream);
    else
      launch_bwd<T, 1>(g, weighted, gop, xp, s, bs, bc, gxp, gs, stream);
  });
  return {grad_x, grad_scores};
}

std::tuple<at::Tensor, at::Tensor> topk_pool_fwd(const at::Tensor& x, const at::Tensor& scores,
                                                 int64_t k) {
  check_cuda_contig(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be (B, N, D), got ", x.sizes());
  const float* s = check_scores(x, scores, /*needed=*/true);
  const int B = as_int(x.size(0), "B"), N = as_int(x.size(1), "N"), D = as_int(x.size(2), "D");
  TORCH_CHECK(k >= 0 && k <= N, "k = ", k, " must be in [0, N = ", N, "]");
  const int kk = static_cast<int>(k);
  TORCH_CHECK(int64_t(B) * kk <= INT_MAX, "topk_pool: B*k too large");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor values = at::empty({B, kk, D}, x.options());
  at::Tensor indices = at::empty({B, kk}, x.options().dtype(at::kLong));
  if (int64_t(B) * kk == 0) return {values, indices};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  const int threads = std::min(512, round_up(N, 32));
  // 48 KiB is the default per-block limit for static + dynamic shared memory (the kernel's
  // static part is 128 bytes); larger rows read their scores from global memory (L1/L2).
  const bool use_smem = size_t(N) * sizeof(float) <= 44 * 1024;
  const size_t smem = use_smem ? size_t(N) * sizeof(float) : 0;
  int64_t* idx = indices.data_ptr<int64_t>();
  topk_select_kernel<<<B, threads, smem, stream>>>(s, idx, N, kk, use_smem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (D == 0) return {values, indices};
  dispatch_float_types(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* vp = static_cast<T*>(values.data_ptr());
    if (can_vectorize<T>(D, {xp, vp})) {
      constexpr int VEC = 16 / sizeof(T);
      gather_rows_kernel<T, VEC>
          <<<B * kk, threads_for(D / VEC), 0, stream>>>(xp, idx, vp, N, kk, D);
    } else {
      gather_rows_kernel<T, 1><<<B * kk, threads_for(D), 0, stream>>>(xp, idx, vp, N, kk, D);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

}  // namespace tokengine::cuda
