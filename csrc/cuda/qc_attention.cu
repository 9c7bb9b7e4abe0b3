// Torch-facing launcher of the question-conditioned cross-attention forward
// (qc_attention_kernels.cuh).
#include "launch_utils.cuh"
#include "ops_cuda.h"
#include "qc_attention_kernels.cuh"

#include <cmath>

namespace tokengine::cuda {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& t, const char* name) {
  check_cuda_contig(t, name);
  check_same_device(q, t, name);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
}

template <typename T, int DP>
void launch_fwd(const QCAttnParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_q_tiles, p.H, p.B);
  qc_attention_fwd_kernel<T, DP><<<grid, QCAttnConfig<DP>::NT, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_fwd_bucket(const QCAttnParams& p, cudaStream_t stream) {
  if (p.D <= 32)
    launch_fwd<T, 32>(p, stream);
  else if (p.D <= 64)
    launch_fwd<T, 64>(p, stream);
  else if (p.D <= 128)
    launch_fwd<T, 128>(p, stream);
  else
    launch_fwd<T, 256>(p, stream);
}

static_assert(QCAttnConfig<32>::BM == QCAttnConfig<64>::BM &&
                  QCAttnConfig<32>::BM == QCAttnConfig<128>::BM &&
                  QCAttnConfig<32>::BM == QCAttnConfig<256>::BM,
              "num_q_tiles assumes one BM for every head-dim bucket");

}  // namespace

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qc_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, double softmax_scale,
    bool return_mass) {
  check_cuda_contig(q, "q");
  TORCH_CHECK(q.dim() == 4, "q must be (B, L, H, D), got ", q.sizes());
  check_qkv(q, k_img, "k_img");
  check_qkv(q, v_img, "v_img");
  check_qkv(q, k_txt, "k_txt");
  check_qkv(q, v_txt, "v_txt");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(k_img.dim() == 4 && k_img.size(0) == B && k_img.size(3) == D,
              "k_img must be (B, N, Hkv, D) with B = ", B, ", D = ", D, ", got ", k_img.sizes());
  TORCH_CHECK(v_img.sizes() == k_img.sizes(), "v_img must match k_img ", k_img.sizes(), ", got ",
              v_img.sizes());
  const int64_t N = k_img.size(1), Hkv = k_img.size(2);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "H = ", H, " must be a multiple of Hkv = ", Hkv);
  TORCH_CHECK(k_txt.dim() == 3 && k_txt.size(1) == Hkv && k_txt.size(2) == D,
              "k_txt must be (T, Hkv, D) with Hkv = ", Hkv, ", D = ", D, ", got ", k_txt.sizes());
  TORCH_CHECK(v_txt.sizes() == k_txt.sizes(), "v_txt must match k_txt ", k_txt.sizes(), ", got ",
              v_txt.sizes());
  check_cuda_contig(cu_seqlens_txt, "cu_seqlens_txt");
  check_same_device(q, cu_seqlens_txt, "cu_seqlens_txt");
  TORCH_CHECK(cu_seqlens_txt.scalar_type() == at::kInt, "cu_seqlens_txt must be int32, got ",
              cu_seqlens_txt.scalar_type());
  TORCH_CHECK(cu_seqlens_txt.dim() == 1 && cu_seqlens_txt.size(0) == B + 1,
              "cu_seqlens_txt must be (B+1,) = (", B + 1, ",), got ", cu_seqlens_txt.sizes());
  TORCH_CHECK(D >= 1 && D <= 256, "head_dim must be in [1, 256], got ", D);
  TORCH_CHECK(B <= 65535 && H <= 65535, "B and H must be at most 65535");

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  c10::optional<at::Tensor> mass;
  if (return_mass) mass = at::empty({B, N}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || L == 0) {
    // No query rows: the mean over (heads, queries) of nothing is NaN, as in the reference.
    if (return_mass) mass = at::full({B, N}, NAN, q.options().dtype(at::kFloat));
    return {out, lse, mass};
  }

  QCAttnParams p;
  p.q = q.data_ptr();
  p.k_img = k_img.data_ptr();
  p.v_img = v_img.data_ptr();
  p.k_txt = k_txt.data_ptr();
  p.v_txt = v_txt.data_ptr();
  p.cu_seqlens = cu_seqlens_txt.data_ptr<int>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = as_int(B, "B");
  p.L = as_int(L, "L");
  p.H = as_int(H, "H");
  p.Hkv = as_int(Hkv, "Hkv");
  p.N = as_int(N, "N");
  p.D = as_int(D, "head_dim");
  p.num_q_tiles = (p.L + QCAttnConfig<32>::BM - 1) / QCAttnConfig<32>::BM;  // BM is the same
  TORCH_CHECK(p.num_q_tiles <= INT_MAX / p.H, "L * H too large");
  p.scale = static_cast<float>(softmax_scale);

  at::Tensor partial;
  p.mass_partial = nullptr;
  if (return_mass && N > 0) {
    partial = at::empty({B, H * p.num_q_tiles, N}, q.options().dtype(at::kFloat));
    p.mass_partial = partial.data_ptr<float>();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_float_types(q.scalar_type(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_fwd_bucket<T>(p, stream);
  });

  if (p.mass_partial != nullptr) {
    const int64_t total = B * N;
    const int threads = 256;
    const int blocks = static_cast<int>((total + threads - 1) / threads);
    mass_reduce_kernel<<<blocks, threads, 0, stream>>>(p.mass_partial, mass->data_ptr<float>(),
                                                       p.B, p.N, p.H * p.num_q_tiles,
                                                       1.f / (float(p.H) * float(p.L)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse, mass};
}

}  // namespace tokengine::cuda
