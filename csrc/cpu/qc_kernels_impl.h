// Fused question-conditioned attention on float32 data, FlashAttention-2 style on CPU.
// Textually included by qc_kernels_<isa>.cpp with TE_ISA naming the namespace, TE_MR x TE_NR
// the micro-kernel tile (rows x floats) and TE_VEC_BYTES its vector width. It uses no templates
// or inline functions from other headers, so nothing compiled for one instruction set can be
// merged by the linker into another copy.
//
// Layout: every per-query quantity is stored transposed with the BM queries of a block
// contiguous: scores S^T[key][query], the output accumulator O^T[d][query], Q^T[d][query]. So
// every GEMM reads K and V straight from the input as broadcast scalars (no tile copies), and
// softmax statistics and rescaling are element-wise over queries, so they vectorise.

// no-trapping-math lets GCC if-convert (and so vectorise) selects next to float arithmetic;
// fp-contract turns a*b+c into FMA where the target has it (-std=c++17 disables that).
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")

namespace tokengine::cpu::TE_ISA {
namespace {

constexpr int64_t BM = kQcBlockM;     // queries per block (a multiple of every ISA's NR)
constexpr int64_t BN = 64;            // keys per tile
constexpr int MR = TE_MR, NR = TE_NR;  // micro-kernel tile: MR rows x NR floats
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_inff();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Explicit vectors keep the micro-kernel accumulators in registers: TE_VEC_BYTES wide (the
// widest the ISA has natively; wider GCC vectors would be lowered element by element).
constexpr int kLanes = TE_VEC_BYTES / 4, NV = NR / kLanes;
static_assert(BM % NR == 0 && NR % kLanes == 0, "a block must be whole micro-kernel tiles");
typedef float vf __attribute__((vector_size(TE_VEC_BYTES)));
typedef float vfu __attribute__((vector_size(TE_VEC_BYTES), aligned(4), may_alias));

// C[R x NR] (+)= sum_k A[r*rs + k*ks] * B[k*ldb + 0..NR). A is read as broadcast scalars, so a
// transposed or strided operand (K^T, V^T, P^T, dS^T) needs only other strides, never a copy.
template <bool kAcc, int R>
inline __attribute__((always_inline)) void micro(int64_t K, const float* A, int64_t rs,
                                                 int64_t ks, const float* B, int64_t ldb,
                                                 float* C, int64_t ldc) {
  vf c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      c[r][v] = kAcc ? *reinterpret_cast<const vfu*>(C + r * ldc + kLanes * v) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const vfu*>(B + k * ldb + kLanes * v);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * rs + k * ks];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vfu*>(C + r * ldc + kLanes * v) = c[r][v];
}

template <bool kAcc, int R>
void micro_rows(int64_t K, const float* A, int64_t rs, int64_t ks, const float* B, int64_t ldb,
                float* C, int64_t ldc, int rows) {
  if constexpr (R > 1)
    if (rows < R) return micro_rows<kAcc, R - 1>(K, A, rs, ks, B, ldb, C, ldc, rows);
  micro<kAcc, R>(K, A, rs, ks, B, ldb, C, ldc);
}

// C[M x Nc] (+)= A[M x K] B[K x Nc] for any M; Nc a multiple of NR.
template <bool kAcc>
void gemm(int64_t M, int64_t Nc, int64_t K, const float* A, int64_t rs, int64_t ks,
          const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t j = 0; j < Nc; j += NR) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
      micro<kAcc, MR>(K, A + i * rs, rs, ks, B + j, ldb, C + i * ldc + j, ldc);
    if (i < M)
      micro_rows<kAcc, MR - 1>(K, A + i * rs, rs, ks, B + j, ldb, C + i * ldc + j, ldc, M - i);
  }
}

// 2^x for softmax arguments: x = n + r with |r| <= 1/2, degree-7 Taylor series of 2^r (relative
// error < 1e-7) times 2^n built in the exponent bits. Clamping to -127 makes those bits 0, so
// masked or -inf logits give exactly 0. Plain arithmetic so that loops calling it vectorise.
inline float exp2_fast(float x) {
  const float shift = 12582912.f;  // 1.5 * 2^23: x + shift rounds x to an integer in the low bits
  float xc = x < -127.f ? -127.f : x;
  xc = xc > 126.f ? 126.f : xc;
  const float t = xc + shift;
  const float r = xc - (t - shift);
  float p = 1.5252733804059841e-5f;
  p = p * r + 1.5403530393381609e-4f;
  p = p * r + 1.3333558146428443e-3f;
  p = p * r + 9.6181291076284772e-3f;
  p = p * r + 5.5504108664821580e-2f;
  p = p * r + 2.4022650695910071e-1f;
  p = p * r + 6.9314718055994531e-1f;
  p = p * r + 1.f;
  const int32_t n = __builtin_bit_cast(int32_t, t) - 0x4B400000;  // 0x4B400000: bits of shift
  const float two_n = __builtin_bit_cast(float, (n + 127) << 23);
  return p * two_n;
}

// Requests rows [0, n) of a strided segment into cache ahead of use: the rows of one head are
// separated by the other heads' rows, a pattern hardware prefetchers follow poorly.
void prefetch_rows(const float* src, int64_t stride, int64_t n, int64_t D) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(src + j * stride + d);
}

struct Segment {  // one KV head's keys and values of one segment (image or question)
  const float *k, *v;
  int64_t n;
};

Segment image_segment(const QcProblem& p, int64_t b, int64_t hk) {
  const int64_t off = (b * p.N * p.Hkv + hk) * p.D;
  return {p.k_img + off, p.v_img + off, p.N};
}

Segment question_segment(const QcProblem& p, int64_t b, int64_t hk) {
  const int64_t off = (int64_t{p.cu[b]} * p.Hkv + hk) * p.D;
  return {p.k_txt + off, p.v_txt + off, int64_t{p.cu[b + 1]} - p.cu[b]};
}

// Prefetches the key / value tile after the one at row j0 of segment si (image, then question).
void prefetch_next(const Segment* segs, int si, int64_t j0, int64_t stride, int64_t D) {
  int64_t next = j0 + BN;
  if (next >= segs[si].n) {
    if (si == 1) return;
    si = 1, next = 0;
  }
  const int64_t n = imin(BN, segs[si].n - next);
  prefetch_rows(segs[si].k + next * stride, stride, n, D);
  prefetch_rows(segs[si].v + next * stride, stride, n, D);
}

struct QueryBlock {  // queries [m0, m0 + rows) of head h
  int64_t h, m0, rows;
};

// The query blocks of one (sample, KV head): blk enumerates (head of the GQA group, block).
QueryBlock query_block(const QcProblem& p, int64_t hk, int64_t blk) {
  const int64_t nqb = (p.L + BM - 1) / BM, m0 = blk % nqb * BM;
  return {hk * (p.H / p.Hkv) + blk / nqb, m0, imin(BM, p.L - m0)};
}

// Loads rows of a (B, L, H, D) tensor for one block as the transposed D x BM tile, scaled by
// `mul`; padding queries are zero.
void load_transposed(const float* src, const QcProblem& p, int64_t b, const QueryBlock& qb,
                     float mul, float* dst) {
  for (int64_t i = 0; i < BM; ++i) {
    const float* s = src + ((b * p.L + qb.m0 + i) * p.H + qb.h) * p.D;
    for (int64_t d = 0; d < p.D; ++d) dst[d * BM + i] = i < qb.rows ? s[d] * mul : 0.f;
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one task per (sample, KV head, run of query blocks of its GQA group). Each key tile
// is applied to every block of the run while it is in cache. Online softmax over the image keys,
// then the sample's question keys. With the mass, each block's image scores are kept (N x BM
// floats) and turned into probabilities once the block's lse is final.

constexpr int64_t kMaxRun = 8;  // query blocks per task: bounds the per-thread state

struct FwdLayout {
  int64_t nblk, run, qt, acc, stats, keep, block, s, total;
  FwdLayout(const QcProblem& p, bool mass, int threads) {
    nblk = p.H / p.Hkv * ((p.L + BM - 1) / BM);  // blocks per (sample, KV head)
    // Short runs only when (sample, KV head) pairs alone cannot keep the threads busy.
    const int64_t pairs = p.B * p.Hkv, chunks = (4 * threads + pairs - 1) / pairs;
    run = imin(kMaxRun, (nblk + chunks - 1) / chunks);
    qt = 0;  // per block: Q^T, O^T, softmax stats (max, sum, rescale, tile sum), image scores
    acc = qt + p.D * BM;
    stats = acc + p.D * BM;
    keep = stats + 4 * BM;
    block = keep + (mass ? p.N * BM : 0);
    s = run * block;
    total = s + BN * BM;
  }
};

// Folds one score tile S^T (nb keys x BM) into the running softmax state; on return the tile
// holds the probabilities and O^T (D x BM) has been rescaled.
void softmax_tile(float* s, int64_t nb, float* m, float* l, float* alpha, float* rsum, float* acc,
                  int64_t D) {
  for (int64_t i = 0; i < BM; ++i) alpha[i] = m[i];  // alpha first holds the new max
  for (int64_t j = 0; j < nb; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) alpha[i] = s[j * BM + i] > alpha[i] ? s[j * BM + i] : alpha[i];
  for (int64_t i = 0; i < BM; ++i) {
    const float mx = alpha[i];
    alpha[i] = exp2_fast(m[i] - mx);
    m[i] = mx;
    rsum[i] = 0.f;
  }
  for (int64_t j = 0; j < nb; ++j)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) {
      const float e = exp2_fast(s[j * BM + i] - m[i]);
      s[j * BM + i] = e;
      rsum[i] += e;
    }
  for (int64_t i = 0; i < BM; ++i) l[i] = l[i] * alpha[i] + rsum[i];
  for (int64_t d = 0; d < D; ++d)
#pragma omp simd
    for (int64_t i = 0; i < BM; ++i) acc[d * BM + i] *= alpha[i];
}

void fwd_task(const QcProblem& p, const QcFwdOut& o, const FwdLayout& lay, float* ws, int64_t b,
              int64_t hk, int64_t blk0, int64_t blk1) {
  const int64_t D = p.D, stride = p.Hkv * D;
  float* s = ws + lay.s;
  const auto state = [&](int64_t blk) { return ws + (blk - blk0) * lay.block; };

  for (int64_t blk = blk0; blk < blk1; ++blk) {
    float* st = state(blk);
    // Scores in log2 units (scale * log2 e folded into Q), so exp2 gives the softmax numerators.
    load_transposed(p.q, p, b, query_block(p, hk, blk), p.scale * kLog2e, st + lay.qt);
    for (int64_t i = 0; i < D * BM; ++i) st[lay.acc + i] = 0.f;
    for (int64_t i = 0; i < BM; ++i) st[lay.stats + i] = -kInf, st[lay.stats + BM + i] = 0.f;
  }

  const Segment segs[2] = {image_segment(p, b, hk), question_segment(p, b, hk)};
  for (int si = 0; si < 2; ++si) {
    const Segment& seg = segs[si];
    for (int64_t j0 = 0; j0 < seg.n; j0 += BN) {
      const int64_t nb = imin(BN, seg.n - j0);
      const float *k = seg.k + j0 * stride, *v = seg.v + j0 * stride;
      prefetch_next(segs, si, j0, stride, D);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        float *st = state(blk), *acc = st + lay.acc, *m = st + lay.stats;
        gemm<false>(nb, BM, D, k, stride, 1, st + lay.qt, BM, s, BM);  // S^T = K Q^T
        if (o.mass_parts && si == 0)
          for (int64_t j = 0; j < nb * BM; ++j) st[lay.keep + j0 * BM + j] = s[j];
        softmax_tile(s, nb, m, m + BM, m + 2 * BM, m + 3 * BM, acc, D);
        gemm<true>(D, BM, nb, v, 1, stride, s, BM, acc, BM);  // O^T += V^T P^T
      }
    }
  }

  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const QueryBlock qb = query_block(p, hk, blk);
    float *st = state(blk), *acc = st + lay.acc, *m = st + lay.stats, *l = m + BM;
    float* lse2 = m + 2 * BM;  // reused: the block's lse in log2 units
    for (int64_t i = 0; i < qb.rows; ++i) {
      lse2[i] = m[i] + __builtin_log2f(l[i]);  // -inf when the row has no keys at all
      float* dst = o.out + ((b * p.L + qb.m0 + i) * p.H + qb.h) * D;
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[d * BM + i] * inv;
      o.lse[(b * p.H + qb.h) * p.L + qb.m0 + i] = lse2[i] * kLn2;
    }
    if (!o.mass_parts) continue;
    const float* keep = st + lay.keep;
    float* part = o.mass_parts + ((b * p.H + qb.h) * ((p.L + BM - 1) / BM) + qb.m0 / BM) * p.N;
    for (int64_t j = 0; j < p.N; ++j) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < qb.rows; ++i) sum += exp2_fast(keep[j * BM + i] - lse2[i]);
      part[j] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one task per (sample, KV head). The task owns dq of its GQA group's query heads and
// dk / dv of its KV head, so tasks never write the same memory. Per key tile it recomputes
// P = exp2(S - lse) for every query block of the group, then dS = P * (dP - delta) and
// accumulates dV += P^T dO, dK += dS^T Q (row-major, D padded to NR) and dQ^T += K^T dS^T.

struct BwdLayout {
  int64_t Dp, nblk, tq, tr, qt, qr, dot, dor, lse2, delta, dq, s, dp, dk, dv, total;
  BwdLayout(const QcProblem& p) {
    Dp = round_up(p.D, NR);
    nblk = p.H / p.Hkv * ((p.L + BM - 1) / BM);
    tq = p.D * BM, tr = BM * Dp;  // a transposed block, a row-major block
    qt = 0;
    qr = qt + nblk * tq;
    dot = qr + nblk * tr;
    dor = dot + nblk * tq;
    lse2 = dor + nblk * tr;
    delta = lse2 + nblk * BM;
    dq = delta + nblk * BM;
    s = dq + nblk * tq;
    dp = s + BN * BM;
    dk = dp + BN * BM;
    dv = dk + BN * Dp;
    total = dv + BN * Dp;
  }
};

// Loads rows of a (B, L, H, D) tensor for one block as a row-major BM x Dp tile (zero-padded).
void load_rows(const float* src, const QcProblem& p, int64_t b, const QueryBlock& qb, int64_t Dp,
               float* dst) {
  for (int64_t i = 0; i < BM; ++i) {
    const float* s = src + ((b * p.L + qb.m0 + i) * p.H + qb.h) * p.D;
    for (int64_t d = 0; d < Dp; ++d) dst[i * Dp + d] = i < qb.rows && d < p.D ? s[d] : 0.f;
  }
}

void bwd_task(const QcProblem& p, const QcBwdIO& io, const BwdLayout& lay, float* ws, int64_t b,
              int64_t hk) {
  const int64_t D = p.D, Dp = lay.Dp, stride = p.Hkv * D, tq = lay.tq, tr = lay.tr;
  float *s = ws + lay.s, *dp = ws + lay.dp, *dk = ws + lay.dk, *dv = ws + lay.dv;
  const float* gm = io.grad_mass ? io.grad_mass + b * p.N : nullptr;
  const float gm_scale = 1.f / static_cast<float>(p.H * p.L);  // mass is a mean over (h, l)

  // Per block: Q^T (log2-scaled, for S), Q and dO rows, dO^T, lse (log2), delta = rowsum(dO*O).
  for (int64_t blk = 0; blk < lay.nblk; ++blk) {
    const QueryBlock qb = query_block(p, hk, blk);
    load_transposed(p.q, p, b, qb, p.scale * kLog2e, ws + lay.qt + blk * tq);
    load_rows(p.q, p, b, qb, Dp, ws + lay.qr + blk * tr);
    load_transposed(io.dout, p, b, qb, 1.f, ws + lay.dot + blk * tq);
    load_rows(io.dout, p, b, qb, Dp, ws + lay.dor + blk * tr);
    float *lse2 = ws + lay.lse2 + blk * BM, *delta = ws + lay.delta + blk * BM;
    for (int64_t i = 0; i < BM; ++i) {
      const int64_t row = (b * p.L + qb.m0 + i) * p.H + qb.h;
      const float lse = i < qb.rows ? io.lse[(b * p.H + qb.h) * p.L + qb.m0 + i] : -kInf;
      lse2[i] = lse == -kInf ? kInf : lse * kLog2e;  // rows without keys get P = 0
      float dot = 0.f;
      if (i < qb.rows)
        for (int64_t d = 0; d < D; ++d) dot += io.dout[row * D + d] * io.out[row * D + d];
      delta[i] = dot;
    }
  }

  // d mass / d P adds grad_mass[n] * gm_scale to dP of image key n, hence to delta the row's
  // P-weighted sum of it; that needs the final P, so a first pass over the image keys.
  const Segment segs[2] = {image_segment(p, b, hk), question_segment(p, b, hk)};
  if (gm) {
    for (int64_t j0 = 0; j0 < p.N; j0 += BN) {
      const int64_t nb = imin(BN, p.N - j0);
      for (int64_t blk = 0; blk < lay.nblk; ++blk) {
        const float* lse2 = ws + lay.lse2 + blk * BM;
        float* delta = ws + lay.delta + blk * BM;
        gemm<false>(nb, BM, D, segs[0].k + j0 * stride, stride, 1, ws + lay.qt + blk * tq, BM, s,
                    BM);
        for (int64_t j = 0; j < nb; ++j) {
          const float g = gm[j0 + j] * gm_scale;
#pragma omp simd
          for (int64_t i = 0; i < BM; ++i) delta[i] += exp2_fast(s[j * BM + i] - lse2[i]) * g;
        }
      }
    }
  }

  for (int64_t i = 0; i < lay.nblk * tq; ++i) ws[lay.dq + i] = 0.f;
  float* dk_out[2] = {io.dk_img + (b * p.N * p.Hkv + hk) * D,
                      io.dk_txt + (int64_t{p.cu[b]} * p.Hkv + hk) * D};
  float* dv_out[2] = {io.dv_img + (b * p.N * p.Hkv + hk) * D,
                      io.dv_txt + (int64_t{p.cu[b]} * p.Hkv + hk) * D};
  for (int si = 0; si < 2; ++si) {
    const Segment& seg = segs[si];
    const float* gseg = si == 0 ? gm : nullptr;
    for (int64_t j0 = 0; j0 < seg.n; j0 += BN) {
      const int64_t nb = imin(BN, seg.n - j0);
      const float *k = seg.k + j0 * stride, *v = seg.v + j0 * stride;
      prefetch_next(segs, si, j0, stride, D);
      for (int64_t i = 0; i < nb * Dp; ++i) dk[i] = 0.f, dv[i] = 0.f;
      for (int64_t blk = 0; blk < lay.nblk; ++blk) {
        const float *lse2 = ws + lay.lse2 + blk * BM, *delta = ws + lay.delta + blk * BM;
        gemm<false>(nb, BM, D, k, stride, 1, ws + lay.qt + blk * tq, BM, s, BM);   // S^T
        gemm<false>(nb, BM, D, v, stride, 1, ws + lay.dot + blk * tq, BM, dp, BM);  // dP^T
        for (int64_t j = 0; j < nb; ++j) {
          const float g = gseg ? gseg[j0 + j] * gm_scale : 0.f;
#pragma omp simd
          for (int64_t i = 0; i < BM; ++i) {
            const float pij = exp2_fast(s[j * BM + i] - lse2[i]);
            s[j * BM + i] = pij;
            dp[j * BM + i] = pij * (dp[j * BM + i] + g - delta[i]) * p.scale;  // dS (logits)
          }
        }
        gemm<true>(nb, Dp, BM, s, BM, 1, ws + lay.dor + blk * tr, Dp, dv, Dp);  // dV += P^T dO
        gemm<true>(nb, Dp, BM, dp, BM, 1, ws + lay.qr + blk * tr, Dp, dk, Dp);  // dK += dS^T Q
        gemm<true>(D, BM, nb, k, 1, stride, dp, BM, ws + lay.dq + blk * tq, BM);  // dQ^T+=K^T dS^T
      }
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t d = 0; d < D; ++d) {
          dk_out[si][(j0 + j) * stride + d] = dk[j * Dp + d];
          dv_out[si][(j0 + j) * stride + d] = dv[j * Dp + d];
        }
    }
  }
  for (int64_t blk = 0; blk < lay.nblk; ++blk) {
    const QueryBlock qb = query_block(p, hk, blk);
    const float* dqt = ws + lay.dq + blk * tq;
    for (int64_t i = 0; i < qb.rows; ++i)
      for (int64_t d = 0; d < D; ++d)
        io.dq[((b * p.L + qb.m0 + i) * p.H + qb.h) * D + d] = dqt[d * BM + i];
  }
}

}  // namespace

size_t fwd_workspace(const QcProblem& p, bool mass, int threads) {
  return FwdLayout(p, mass, threads).total;
}

void fwd(const QcProblem& p, const QcFwdOut& o, float* workspace, int threads) {
  const FwdLayout lay(p, o.mass_parts != nullptr, threads);
  const int64_t runs = (lay.nblk + lay.run - 1) / lay.run, tasks = p.B * p.Hkv * runs;
#pragma omp parallel num_threads(threads)
  {
    float* ws = workspace + omp_get_thread_num() * lay.total;
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t blk0 = t % runs * lay.run;
      fwd_task(p, o, lay, ws, t / runs / p.Hkv, t / runs % p.Hkv, blk0,
               imin(blk0 + lay.run, lay.nblk));
    }
  }
}

size_t bwd_workspace(const QcProblem& p) { return BwdLayout(p).total; }

void bwd(const QcProblem& p, const QcBwdIO& io, float* workspace, int threads) {
  const BwdLayout lay(p);
#pragma omp parallel num_threads(threads)
  {
    float* ws = workspace + omp_get_thread_num() * lay.total;
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < p.B * p.Hkv; ++t) bwd_task(p, io, lay, ws, t / p.Hkv, t % p.Hkv);
  }
}

}  // namespace tokengine::cpu::TE_ISA

#pragma GCC pop_options
