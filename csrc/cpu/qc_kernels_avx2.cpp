// AVX2+FMA build of the attention kernels, used only when the running CPU has both
// (qc_attention.cpp checks). The target is scoped to the kernel code so that no header's inline
// functions get compiled for AVX2.
#if defined(__x86_64__)
#include <omp.h>

#include "cpu/qc_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TE_ISA avx2
#define TE_MR 6  // 12 accumulators of the 16 ymm registers
#define TE_NR 16
#define TE_VEC_BYTES 32
#include "cpu/qc_kernels_impl.h"
#pragma GCC pop_options
#endif
