// Portable build of the attention kernels (any CPU; SSE2 on x86-64).
#include <omp.h>

#include "cpu/qc_kernels.h"

#define TE_ISA generic
#define TE_MR 3          // 12 accumulators of the 16 xmm registers
#define TE_NR 16
#define TE_VEC_BYTES 16  // SSE2, the x86-64 baseline
#include "cpu/qc_kernels_impl.h"
