// CUDA ops of tokengine._C (compiled when TOKENGINE_WITH_CUDA is defined). Torch-facing
// declarations only: the bindings (csrc/bindings.cpp, a plain C++ translation unit) include this
// header, so it must not pull in CUDA headers. Argument orders and semantics:
// docs/BACKEND_CONTRACT.md. Inputs are expected contiguous, on one CUDA device, in float32,
// float16 or bfloat16 (scores float32, cu_seqlens_txt int32); the launchers check this.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace tokengine::cuda {

at::Tensor grid_pool_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& scores, int64_t H,
                         int64_t W, int64_t h, int64_t w, const std::string& mode);

std::tuple<at::Tensor, c10::optional<at::Tensor>> grid_pool_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& scores,
    int64_t H, int64_t W, int64_t h, int64_t w, const std::string& mode);

std::tuple<at::Tensor, at::Tensor> topk_pool_fwd(const at::Tensor& x, const at::Tensor& scores,
                                                 int64_t k);

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qc_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, double softmax_scale,
    bool return_mass);

}  // namespace tokengine::cuda
