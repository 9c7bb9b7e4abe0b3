// AVX-512 build of the attention kernels, used only when the running CPU has AVX-512F
// (qc_attention.cpp checks). Twice the lanes of AVX2 and twice the registers: 8 x 32 tiles keep
// 16 accumulators in zmm registers and use each broadcast query / probability for two FMAs.
#if defined(__x86_64__)
#include <omp.h>

#include "cpu/qc_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512")
#define TE_ISA avx512
#define TE_MR 8   // 16 accumulators of the 32 zmm registers
#define TE_NR 32  // two zmm vectors per row
#define TE_VEC_BYTES 64
#include "cpu/qc_kernels_impl.h"
#pragma GCC pop_options
#endif
