// CPU implementations of the tokengine ops (see docs/BACKEND_CONTRACT.md for the semantics).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

namespace tokengine::cpu {

// Instruction sets the attention kernels were built for and this CPU runs, narrowest first.
std::vector<std::string> qc_kernel_isas();

// The one they run with: the widest, or the one TOKENGINE_CPU_ISA names (generic, avx2,
// avx512; an error if this CPU cannot run it). Read per call so that tests can cover each.
std::string qc_kernel_isa();

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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qc_attention_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_mass, const at::Tensor& q,
    const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale);

}  // namespace tokengine::cpu
