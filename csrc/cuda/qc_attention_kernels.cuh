// Question-conditioned cross-attention forward: a fused FlashAttention-2-style SIMT kernel.
// Free of torch; templated on the element type T in {float, __half, __nv_bfloat16} and on the
// padded head-dim bucket DP in {32, 64, 128, 256}; everything is computed in float32.
// Semantics: tokengine/reference.py (qc_cross_attention) and docs/BACKEND_CONTRACT.md.
//
// Layouts (all contiguous):
//   q (B, L, H, D); k_img, v_img (B, N, Hkv, D); k_txt, v_txt (T, Hkv, D) with sample b owning
//   rows cu[b]:cu[b+1]; out (B, L, H, D); lse (B, H, L) float32;
//   mass_partial (B, H * num_q_tiles, N) float32 (only when mass is requested).
//
// One thread-block per (query tile of BM rows, head h, batch b) = (blockIdx.x, .y, .z), with
// NT = 128 threads: thread t serves query row r = t / TPR of the tile (TPR = 8 threads per row,
// 8 consecutive lanes of one warp) and, within that row, the key columns j = sub + TPR*c of a
// score tile and the output columns d = sub + TPR*c, where sub = t % TPR.
//
// Per key tile (BN keys; image keys first, then the sample's question keys):
//   S = (scale*q) k^T over the tile (shared-memory tiles, float32 FMA), keys past the segment
//   end masked to -inf; online softmax (running max m, running sum l, rescale of the output
//   accumulator by exp(m_old - m_new)); P is staged in shared memory and P V accumulated.
// At the end out = acc / l and lse = m + log(l). With mass requested, the kernel then walks the
// image keys once more, recomputes S, forms p = exp(s - lse) (exact probabilities, the row's lse
// now being known), sums p over the tile's valid query rows in a fixed order and writes one
// partial per (block, image key) - P is never written to global memory. mass_reduce_kernel sums
// the partials over (head, query tile) in a fixed order (deterministic) and divides by H*L.
#pragma once

#include "common.cuh"

namespace tokengine {
namespace cuda {

struct QCAttnParams {
  const void* q;
  const void* k_img;
  const void* v_img;
  const void* k_txt;
  const void* v_txt;
  const int* cu_seqlens;  // (B+1,) int32
  void* out;
  float* lse;
  float* mass_partial;  // nullptr when mass is not requested
  int B, L, H, Hkv, N, D;
  int num_q_tiles;
  float scale;
};

template <int DP>
struct QCAttnConfig {
  static constexpr int BM = 16;         // query rows per block
  static constexpr int NT = 128;        // threads per block
  static constexpr int TPR = NT / BM;   // threads per query row (8)
  static constexpr int BN = 4096 / DP;  // keys per tile: 128, 64, 32, 16
  static constexpr int NC = BN / TPR;   // score columns per thread
  static constexpr int ND = DP / TPR;   // output columns per thread
  static_assert(DP % 32 == 0 && DP <= 256, "head-dim bucket");
  static_assert(NC >= 1 && ND >= 1, "tile shape");
};

// dst[rr][d] = src[rr*row_stride + d] * mul for rr < nrows, d < D; zero elsewhere (padding).
template <typename T, int ROWS, int DP, int NT>
__device__ __forceinline__ void load_tile(float (*dst)[DP + 1], const T* __restrict__ src,
                                          int64_t row_stride, int nrows, int D, float mul) {
  for (int idx = threadIdx.x; idx < ROWS * DP; idx += NT) {
    const int rr = idx / DP;
    const int d = idx % DP;
    float v = 0.f;
    if (rr < nrows && d < D) v = to_float(src[int64_t(rr) * row_stride + d]) * mul;
    dst[rr][d] = v;
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(QCAttnConfig<DP>::NT)
    qc_attention_fwd_kernel(const QCAttnParams p) {
  using C = QCAttnConfig<DP>;
  constexpr int BM = C::BM, NT = C::NT, TPR = C::TPR, BN = C::BN, NC = C::NC, ND = C::ND;

  __shared__ float q_s[BM][DP + 1];   // scaled query tile (padded rows: no bank conflicts)
  __shared__ float kv_s[BN][DP + 1];  // K tile, then V tile
  __shared__ float p_s[BM][BN + 1];   // probabilities of the current tile

  const int qt = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hkv = h / (p.H / p.Hkv);
  const int q0 = qt * BM;
  const int D = p.D;
  const int r = threadIdx.x / TPR;
  const int sub = threadIdx.x % TPR;
  const bool row_in_range = q0 + r < p.L;
  const int64_t kv_stride = int64_t(p.Hkv) * D;  // between consecutive keys of one head

  const T* q = static_cast<const T*>(p.q);
  const T* k_img = static_cast<const T*>(p.k_img);
  const T* v_img = static_cast<const T*>(p.v_img);
  const T* k_txt = static_cast<const T*>(p.k_txt);
  const T* v_txt = static_cast<const T*>(p.v_txt);

  // Query rows q[b, q0 + rr, h, :], pre-multiplied by the softmax scale.
  load_tile<T, BM, DP, NT>(q_s, q + ((int64_t(b) * p.L + q0) * p.H + h) * D,
                           int64_t(p.H) * D, min(BM, p.L - q0), D, p.scale);

  float m = -INFINITY;  // running max of the row (identical in the row's TPR threads)
  float l = 0.f;        // running sum of exp(s - m)
  float acc[ND];
#pragma unroll
  for (int c = 0; c < ND; ++c) acc[c] = 0.f;

  // S tile for this thread: s[c] = q_s[r] . kv_s[sub + TPR*c]; masked past nvalid.
  auto score_tile = [&](float (&s)[NC], int nvalid) {
#pragma unroll
    for (int c = 0; c < NC; ++c) s[c] = 0.f;
#pragma unroll 8
    for (int d = 0; d < DP; ++d) {
      const float qv = q_s[r][d];
#pragma unroll
      for (int c = 0; c < NC; ++c) s[c] = fmaf(qv, kv_s[sub + TPR * c][d], s[c]);
    }
#pragma unroll
    for (int c = 0; c < NC; ++c)
      if (sub + TPR * c >= nvalid) s[c] = -INFINITY;
  };

  for (int seg = 0; seg < 2; ++seg) {
    const T* kbase;
    const T* vbase;
    int count;
    if (seg == 0) {  // image keys k_img[b, n, hkv, :]
      const int64_t off = (int64_t(b) * p.N * p.Hkv + hkv) * D;
      kbase = k_img + off;
      vbase = v_img + off;
      count = p.N;
    } else {  // question keys k_txt[t, hkv, :], t in [cu[b], cu[b+1])
      const int t0 = p.cu_seqlens[b];
      const int64_t off = (int64_t(t0) * p.Hkv + hkv) * D;
      kbase = k_txt + off;
      vbase = v_txt + off;
      count = p.cu_seqlens[b + 1] - t0;
    }
    for (int n0 = 0; n0 < count; n0 += BN) {
      const int nvalid = min(BN, count - n0);
      __syncthreads();  // previous tile's readers of kv_s / p_s are done (and q_s is loaded)
      load_tile<T, BN, DP, NT>(kv_s, kbase + int64_t(n0) * kv_stride, kv_stride, nvalid, D, 1.f);
      __syncthreads();

      float s[NC];
      score_tile(s, nvalid);
      float tmax = -INFINITY;
#pragma unroll
      for (int c = 0; c < NC; ++c) tmax = fmaxf(tmax, s[c]);
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1)
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
      const float m_new = fmaxf(m, tmax);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no finite score seen yet
      const float alpha = __expf(m - m_use);                  // 0 when m == -inf
      float psum = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float pv = __expf(s[c] - m_use);  // 0 for masked keys
        psum += pv;
        p_s[r][sub + TPR * c] = pv;
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off >>= 1)
        psum += __shfl_xor_sync(0xffffffffu, psum, off);
      l = l * alpha + psum;
      m = m_new;
#pragma unroll
      for (int c = 0; c < ND; ++c) acc[c] *= alpha;

      __syncthreads();  // everyone is done with the K tile; p_s is complete
      load_tile<T, BN, DP, NT>(kv_s, vbase + int64_t(n0) * kv_stride, kv_stride, nvalid, D, 1.f);
      __syncthreads();
      for (int j = 0; j < nvalid; ++j) {
        const float pj = p_s[r][j];
#pragma unroll
        for (int c = 0; c < ND; ++c) acc[c] = fmaf(pj, kv_s[j][sub + TPR * c], acc[c]);
      }
    }
  }

  const bool has_keys = l > 0.f;
  const float inv_l = has_keys ? 1.f / l : 0.f;
  const float row_lse = has_keys ? m + __logf(l) : -INFINITY;
  if (row_in_range) {
    T* o = static_cast<T*>(p.out) + ((int64_t(b) * p.L + q0 + r) * p.H + h) * D;
#pragma unroll
    for (int c = 0; c < ND; ++c) {
      const int d = sub + TPR * c;
      if (d < D) o[d] = from_float<T>(acc[c] * inv_l);
    }
    if (sub == 0) p.lse[(int64_t(b) * p.H + h) * p.L + q0 + r] = row_lse;
  }

  if (p.mass_partial == nullptr) return;  // block-uniform

  // Attention mass: exact probabilities of the image keys, summed over the tile's query rows.
  const bool row_counts = row_in_range && has_keys;
  float* part = p.mass_partial +
                ((int64_t(b) * p.H + h) * p.num_q_tiles + qt) * int64_t(p.N);
  const int64_t img_off = (int64_t(b) * p.N * p.Hkv + hkv) * D;
  for (int n0 = 0; n0 < p.N; n0 += BN) {
    const int nvalid = min(BN, p.N - n0);
    __syncthreads();  // previous readers of kv_s / p_s are done
    load_tile<T, BN, DP, NT>(kv_s, k_img + img_off + int64_t(n0) * kv_stride, kv_stride, nvalid,
                             D, 1.f);
    __syncthreads();
    float s[NC];
    score_tile(s, nvalid);
#pragma unroll
    for (int c = 0; c < NC; ++c) p_s[r][sub + TPR * c] = row_counts ? __expf(s[c] - row_lse) : 0.f;
    __syncthreads();
    for (int j = threadIdx.x; j < nvalid; j += NT) {
      float tot = 0.f;
#pragma unroll
      for (int rr = 0; rr < BM; ++rr) tot += p_s[rr][j];
      part[n0 + j] = tot;
    }
  }
}

// mass[b, n] = sum over P = H*num_q_tiles partials (fixed order) / (H*L).
// Launch: grid ceil(B*N / 256), block 256.
__global__ void mass_reduce_kernel(const float* __restrict__ partial, float* __restrict__ mass,
                                   int B, int N, int P, float inv_count) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(B) * N) return;
  const int64_t b = idx / N;
  const int64_t n = idx % N;
  const float* src = partial + b * P * N + n;
  float tot = 0.f;
  for (int i = 0; i < P; ++i) tot += src[int64_t(i) * N];
  mass[idx] = tot * inv_count;
}

}  // namespace cuda
}  // namespace tokengine
