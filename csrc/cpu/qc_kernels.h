// Raw-pointer interface of the float32 attention kernels. The same kernel source
// (qc_kernels_impl.h) is compiled once portably (namespace generic) and, on x86-64, for AVX2+FMA
// (namespace avx2) and AVX-512 (namespace avx512); qc_attention.cpp picks one at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tokengine::cpu {

struct QcProblem {
  int64_t B, L, H, Hkv, N, D;
  float scale;
  const float *q, *k_img, *v_img, *k_txt, *v_txt;  // contiguous, as in the contract
  const int32_t* cu;                                // (B+1,) question offsets
};

struct QcFwdOut {
  float* out;         // (B, L, H, D)
  float* lse;         // (B, H, L), natural log
  float* mass_parts;  // (B, H, ceil(L/32), N) image-key probability sums, or null
};

struct QcBwdIO {
  const float *dout, *out, *lse;
  const float* grad_mass;  // (B, N) or null
  float *dq, *dk_img, *dv_img, *dk_txt, *dv_txt;  // dk_txt / dv_txt must arrive zeroed
};

constexpr int64_t kQcBlockM = 32;  // query rows per block (mass_parts uses it)

#define TE_DECLARE_QC_KERNELS(ns)                                                     \
  namespace ns {                                                                      \
  size_t fwd_workspace(const QcProblem& p, bool mass, int threads); /* per thread */ \
  void fwd(const QcProblem& p, const QcFwdOut& o, float* workspace, int threads);     \
  size_t bwd_workspace(const QcProblem& p);                                           \
  void bwd(const QcProblem& p, const QcBwdIO& io, float* workspace, int threads);     \
  }

TE_DECLARE_QC_KERNELS(generic)
#if defined(__x86_64__)
TE_DECLARE_QC_KERNELS(avx2)
TE_DECLARE_QC_KERNELS(avx512)
#endif
#undef TE_DECLARE_QC_KERNELS

}  // namespace tokengine::cpu
