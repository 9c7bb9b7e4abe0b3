// Token-pooling CUDA kernels (grid avg/max/weighted pooling, its backward, top-k selection).
// Free of torch; templated on the element type T in {float, __half, __nv_bfloat16}, float32
// accumulation. Semantics: tokengine/reference.py (token_pool) and docs/BACKEND_CONTRACT.md.
//
// Layouts (all contiguous):
//   x (B, N = H*W, D), scores (B, N) float32, pooled (B, h*w, D), bins row-major:
//   bin = bi*w + bj covers rows [floor(bi*H/h), ceil((bi+1)*H/h)) and columns
//   [floor(bj*W/w), ceil((bj+1)*W/w)) of the (H, W) grid; cell n = r*W + c.
#pragma once

#include "common.cuh"

namespace tokengine {
namespace cuda {

enum class PoolMode : int { kAvg = 0, kMax = 1, kWeighted = 2 };

// Adaptive-pooling bin [start, end) of `size` cells into `out` bins (as PyTorch).
__device__ __forceinline__ int bin_start(int i, int size, int out) { return (i * size) / out; }
__device__ __forceinline__ int bin_end(int i, int size, int out) {
  return ((i + 1) * size + out - 1) / out;
}

// ---------------------------------------------------------------------------------------------
// Forward: one block per (b, bin); each thread owns VEC-wide column chunks of D and loops over
// the bin's cells. Launch: grid B*h*w, any block size; VEC divides D and x/out are aligned to
// VEC*sizeof(T).
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, PoolMode MODE>
__global__ void grid_pool_fwd_kernel(const T* __restrict__ x, const float* __restrict__ scores,
                                     T* __restrict__ out, int N, int D, int H, int W, int h,
                                     int w) {
  using P = Pack<T, VEC>;
  const int hw = h * w;
  const int b = blockIdx.x / hw;
  const int bin = blockIdx.x % hw;
  const int bi = bin / w, bj = bin % w;
  const int rs = bin_start(bi, H, h), re = bin_end(bi, H, h);
  const int cs = bin_start(bj, W, w), ce = bin_end(bj, W, w);
  const float inv_count = 1.f / float((re - rs) * (ce - cs));
  const T* xb = x + int64_t(b) * N * D;
  const float* sb = MODE == PoolMode::kWeighted ? scores + int64_t(b) * N : nullptr;
  T* ob = out + (int64_t(b) * hw + bin) * D;

  const int chunks = D / VEC;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[VEC];   // avg/weighted: plain sum; max: running max
    float wacc[VEC];  // weighted: sum of s * x
    float ssum = 0.f;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      acc[v] = MODE == PoolMode::kMax ? -INFINITY : 0.f;
      wacc[v] = 0.f;
    }
    for (int r = rs; r < re; ++r) {
      for (int cc = cs; cc < ce; ++cc) {
        const int n = r * W + cc;
        const P p = *reinterpret_cast<const P*>(xb + int64_t(n) * D + c * VEC);
        float s = 0.f;
        if (MODE == PoolMode::kWeighted) {
          s = sb[n];
          ssum += s;
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float xv = to_float(p.v[v]);
          if (MODE == PoolMode::kMax) {
            if (xv > acc[v] || isnan(xv)) acc[v] = xv;  // NaN propagates, as max_pool does
          } else {
            acc[v] += xv;
            if (MODE == PoolMode::kWeighted) wacc[v] += s * xv;
          }
        }
      }
    }
    P o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float r;
      if (MODE == PoolMode::kMax) {
        r = acc[v];
      } else if (MODE == PoolMode::kWeighted && ssum > 0.f) {
        r = wacc[v] / ssum;
      } else {
        r = acc[v] * inv_count;
      }
      o.v[v] = from_float<T>(r);
    }
    *reinterpret_cast<P*>(ob + c * VEC) = o;
  }
}

// ---------------------------------------------------------------------------------------------
// Weighted backward, pass 1: per (b, bin) the scalars S = sum of the bin's scores and
// C = <grad_out[bin], out[bin]> with out recomputed in float32 (only meaningful when S > 0).
// Launch: grid B*h*w, block a multiple of 32 (<= 1024).
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
__global__ void weighted_bin_stats_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                          const float* __restrict__ scores,
                                          float* __restrict__ bin_s, float* __restrict__ bin_c,
                                          int N, int D, int H, int W, int h, int w) {
  using P = Pack<T, VEC>;
  __shared__ float scratch[32];
  const int hw = h * w;
  const int b = blockIdx.x / hw;
  const int bin = blockIdx.x % hw;
  const int bi = bin / w, bj = bin % w;
  const int rs = bin_start(bi, H, h), re = bin_end(bi, H, h);
  const int cs = bin_start(bj, W, w), ce = bin_end(bj, W, w);
  const T* xb = x + int64_t(b) * N * D;
  const float* sb = scores + int64_t(b) * N;
  const T* gb = grad_out + (int64_t(b) * hw + bin) * D;

  float ssum = 0.f;  // identical in every thread
  for (int r = rs; r < re; ++r)
    for (int cc = cs; cc < ce; ++cc) ssum += sb[r * W + cc];

  float dot = 0.f;
  if (ssum > 0.f) {
    const float inv_s = 1.f / ssum;
    for (int c = threadIdx.x; c < D / VEC; c += blockDim.x) {
      float wacc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) wacc[v] = 0.f;
      for (int r = rs; r < re; ++r) {
        for (int cc = cs; cc < ce; ++cc) {
          const int n = r * W + cc;
          const float s = sb[n];
          const P p = *reinterpret_cast<const P*>(xb + int64_t(n) * D + c * VEC);
#pragma unroll
          for (int v = 0; v < VEC; ++v) wacc[v] += s * to_float(p.v[v]);
        }
      }
      const P g = *reinterpret_cast<const P*>(gb + c * VEC);
#pragma unroll
      for (int v = 0; v < VEC; ++v) dot += to_float(g.v[v]) * (wacc[v] * inv_s);
    }
  }
  dot = block_sum(dot, scratch);  // every thread calls it (uniform control flow)
  if (threadIdx.x == 0) {
    bin_s[int64_t(b) * hw + bin] = ssum;
    bin_c[int64_t(b) * hw + bin] = dot;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 2 (deterministic, no atomics): one block per (b, cell). The cell gathers the
// gradient of every bin that contains it (at most 2 per axis):
//   avg bin (or weighted bin with S == 0):  grad_x += g / count
//   weighted bin with S > 0:                grad_x += g * s_n / S,
//                                            grad_s += (<g, x_n> - C) / S
// Launch: grid B*N, block a multiple of 32 (<= 1024). bin_s/bin_c only read when WEIGHTED.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC, bool WEIGHTED>
__global__ void grid_pool_bwd_cell_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                          const float* __restrict__ scores,
                                          const float* __restrict__ bin_s,
                                          const float* __restrict__ bin_c, T* __restrict__ grad_x,
                                          float* __restrict__ grad_scores, int N, int D, int H,
                                          int W, int h, int w) {
  using P = Pack<T, VEC>;
  __shared__ float scratch[32];
  const int hw = h * w;
  const int b = blockIdx.x / N;
  const int n = blockIdx.x % N;
  const int r = n / W, cc = n % W;
  // Bins i with start(i) <= r < end(i): i in [floor(r*h/H), ceil((r+1)*h/H) - 1].
  const int ilo = (r * h) / H;
  const int ihi = min(h - 1, ((r + 1) * h + H - 1) / H - 1);
  const int jlo = (cc * w) / W;
  const int jhi = min(w - 1, ((cc + 1) * w + W - 1) / W - 1);
  const float s_n = WEIGHTED ? scores[int64_t(b) * N + n] : 0.f;
  const T* gb = grad_out + int64_t(b) * hw * D;
  const T* xn = x + (int64_t(b) * N + n) * D;
  T* gxn = grad_x + (int64_t(b) * N + n) * D;

  float dot = 0.f;  // weighted: sum over weighted bins of <g_bin, x_n> / S_bin (partial over d)
  for (int c = threadIdx.x; c < D / VEC; c += blockDim.x) {
    float gx[VEC];
    float xv[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) gx[v] = 0.f;
    if (WEIGHTED) {
      const P p = *reinterpret_cast<const P*>(xn + c * VEC);
#pragma unroll
      for (int v = 0; v < VEC; ++v) xv[v] = to_float(p.v[v]);
    }
    for (int i = ilo; i <= ihi; ++i) {
      const int rs = bin_start(i, H, h), re = bin_end(i, H, h);
      if (r < rs || r >= re) continue;
      for (int j = jlo; j <= jhi; ++j) {
        const int cs = bin_start(j, W, w), ce = bin_end(j, W, w);
        if (cc < cs || cc >= ce) continue;
        const int bin = i * w + j;
        const P g = *reinterpret_cast<const P*>(gb + int64_t(bin) * D + c * VEC);
        float coef = 1.f / float((re - rs) * (ce - cs));
        float inv_s = 0.f;
        if (WEIGHTED) {
          const float S = bin_s[int64_t(b) * hw + bin];
          if (S > 0.f) {
            inv_s = 1.f / S;
            coef = s_n * inv_s;
          }
        }
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float gv = to_float(g.v[v]);
          gx[v] += coef * gv;
          if (WEIGHTED) dot += gv * xv[v] * inv_s;  // inv_s == 0 for plain-average bins
        }
      }
    }
    P o;
#pragma unroll
    for (int v = 0; v < VEC; ++v) o.v[v] = from_float<T>(gx[v]);
    *reinterpret_cast<P*>(gxn + c * VEC) = o;
  }

  if (WEIGHTED) {
    dot = block_sum(dot, scratch);
    if (threadIdx.x == 0) {
      float gs = dot;
      for (int i = ilo; i <= ihi; ++i) {
        if (r < bin_start(i, H, h) || r >= bin_end(i, H, h)) continue;
        for (int j = jlo; j <= jhi; ++j) {
          if (cc < bin_start(j, W, w) || cc >= bin_end(j, W, w)) continue;
          const int bin = i * w + j;
          const float S = bin_s[int64_t(b) * hw + bin];
          if (S > 0.f) gs -= bin_c[int64_t(b) * hw + bin] / S;
        }
      }
      grad_scores[int64_t(b) * N + n] = gs;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k selection, one block per batch row. Token i has rank
//   #{j : s_j > s_i  or  (s_j == s_i and j < i)}
// (score descending, index ascending; O(N^2) comparisons, scores cached in shared memory when
// they fit) and is kept iff rank < k. Kept tokens are written in ascending index order through
// a block-wide exclusive scan of the keep flags, chunk by chunk.
// Launch: grid B, block a multiple of 32 (<= 1024), dynamic shared memory N*4 bytes when
// use_smem else 0.
// ---------------------------------------------------------------------------------------------
__global__ void topk_select_kernel(const float* __restrict__ scores, int64_t* __restrict__ indices,
                                   int N, int k, bool use_smem) {
  extern __shared__ float s_cache[];
  __shared__ int warp_tot[32];
  const int b = blockIdx.x;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const float* s = scores + int64_t(b) * N;
  if (use_smem) {
    for (int i = threadIdx.x; i < N; i += blockDim.x) s_cache[i] = s[i];
    __syncthreads();
    s = s_cache;
  }
  int64_t* out = indices + int64_t(b) * k;

  int carry = 0;  // kept tokens with index below the current chunk
  for (int base = 0; base < N; base += blockDim.x) {
    const int i = base + threadIdx.x;
    int keep = 0;
    if (i < N) {
      const float si = s[i];
      int rank = 0;
      for (int j = 0; j < N; ++j) {
        const float sj = s[j];
        rank += (sj > si) || (sj == si && j < i);
      }
      keep = rank < k;
    }
    // Block-wide exclusive scan of `keep`.
    int incl = keep;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += t;
    }
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int t = lane < nwarps ? warp_tot[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int u = __shfl_up_sync(0xffffffffu, t, off);
        if (lane >= off) t += u;
      }
      warp_tot[lane] = t;  // inclusive prefix over warps
    }
    __syncthreads();
    const int warp_off = warp > 0 ? warp_tot[warp - 1] : 0;
    const int chunk_total = warp_tot[nwarps - 1];
    if (keep) out[carry + warp_off + incl - keep] = i;
    carry += chunk_total;
    __syncthreads();  // warp_tot is rewritten by the next chunk
  }
}

// values[b, p, :] = x[b, indices[b, p], :]. Launch: grid B*k, any block size.
template <typename T, int VEC>
__global__ void gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ indices,
                                   T* __restrict__ out, int N, int k, int D) {
  using P = Pack<T, VEC>;
  const int b = blockIdx.x / k;
  const int64_t n = indices[blockIdx.x];
  const P* src = reinterpret_cast<const P*>(x + (int64_t(b) * N + n) * D);
  P* dst = reinterpret_cast<P*>(out + int64_t(blockIdx.x) * D);
  for (int c = threadIdx.x; c < D / VEC; c += blockDim.x) dst[c] = src[c];
}

}  // namespace cuda
}  // namespace tokengine
