// Torch-facing helpers shared by the CUDA launchers (token_pool.cu, qc_attention.cu).
//
// The stream comes from c10::cuda::getCurrentCUDAStream(), which is the very function that
// at::cuda::getCurrentCUDAStream() names (ATen/cuda/CUDAContextLight.h does
// `namespace at::cuda { using namespace c10::cuda; }`). We include the c10 header rather than
// ATen/cuda/CUDAContext.h because the latter pulls in cuBLAS/cuSPARSE/cuSOLVER headers that a
// minimal CUDA toolkit (and the compile-check machine) does not have.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

namespace tokengine {
namespace cuda {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA element type of `st` (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_float_types(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, what, ": expected float32, float16 or bfloat16, got ", st);
  }
}

inline void check_cuda_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& t, const char* name) {
  TORCH_CHECK(a.device() == t.device(), name, " is on ", t.device(), ", expected ", a.device());
}

inline int as_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, name, " = ", v, " is out of range");
  return static_cast<int>(v);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

}  // namespace cuda
}  // namespace tokengine
