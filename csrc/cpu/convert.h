// Element conversion between the storage dtypes (float, Half, BFloat16) and float32 accumulators.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/core/ScalarType.h>

namespace tokengine::cpu {

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);  // round-to-nearest-even, as Tensor.to()
}

// dst[0:n) = src[0:n) * mul, zero-filled up to n_pad (tiles are padded to the SIMD width).
template <typename T>
inline void load_row(const T* src, float* dst, int n, int n_pad, float mul) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i]) * mul;
  for (int i = n; i < n_pad; ++i) dst[i] = 0.f;
}

template <typename T>
inline void store_row(const float* src, T* dst, int n, float mul) {
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = from_f32<T>(src[i] * mul);
}

}  // namespace tokengine::cpu

namespace tokengine::cpu {

// Calls f(T{}) with T the C++ type of a storage dtype; the ops accept exactly these three.
template <typename F>
inline void dispatch_dtype(c10::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t);
  }
}

}  // namespace tokengine::cpu
