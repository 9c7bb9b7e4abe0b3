// Python module tokengine._C: one entry per backend-contract op, dispatching on the input's
// device to the CPU ops (csrc/cpu) or, when compiled with TOKENGINE_WITH_CUDA, the CUDA ops.
#include <torch/extension.h>

#include "cpu/ops_cpu.h"
#ifdef TOKENGINE_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace {

using OptTensor = c10::optional<at::Tensor>;

// Guards only: tokengine.ops validates user input; these catch misuse of the raw module.
void check_same_device(const char* op, const at::Tensor& ref,
                       std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others)
    TORCH_CHECK(t->device() == ref.device(), op, ": all tensors must be on ", ref.device(),
                ", got one on ", t->device());
}

void check_storage(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->is_contiguous(), op, ": tensors must be contiguous");
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                ": expected float32, float16 or bfloat16, got ", dt);
  }
}

void check_f32(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", name,
              " must be contiguous float32");
}

// The CUDA branch of every entry: calls tokengine::cuda::<op> with the same arguments.
#ifdef TOKENGINE_WITH_CUDA
#define TE_CUDA_CALL(op, ...) return tokengine::cuda::op(__VA_ARGS__)
#else
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": tokengine._C was built without CUDA ops");
}
#define TE_CUDA_CALL(op, ...) no_cuda(#op)
#endif

at::Tensor grid_pool_fwd(const at::Tensor& x, const OptTensor& scores, int64_t H, int64_t W,
                         int64_t h, int64_t w, const std::string& mode) {
  check_storage("grid_pool_fwd", {&x});
  if (scores) {
    check_same_device("grid_pool_fwd", x, {&*scores});
    check_f32("grid_pool_fwd", "scores", *scores);
  }
  if (x.is_cuda()) TE_CUDA_CALL(grid_pool_fwd, x, scores, H, W, h, w, mode);
  return tokengine::cpu::grid_pool_fwd(x, scores, H, W, h, w, mode);
}

std::tuple<at::Tensor, OptTensor> grid_pool_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                const OptTensor& scores, int64_t H, int64_t W,
                                                int64_t h, int64_t w, const std::string& mode) {
  check_storage("grid_pool_bwd", {&grad_out, &x});
  check_same_device("grid_pool_bwd", x, {&grad_out});
  if (scores) {
    check_same_device("grid_pool_bwd", x, {&*scores});
    check_f32("grid_pool_bwd", "scores", *scores);
  }
  if (x.is_cuda()) TE_CUDA_CALL(grid_pool_bwd, grad_out, x, scores, H, W, h, w, mode);
  return tokengine::cpu::grid_pool_bwd(grad_out, x, scores, H, W, h, w, mode);
}

std::tuple<at::Tensor, at::Tensor> topk_pool_fwd(const at::Tensor& x, const at::Tensor& scores,
                                                 int64_t k) {
  check_storage("topk_pool_fwd", {&x});
  check_same_device("topk_pool_fwd", x, {&scores});
  check_f32("topk_pool_fwd", "scores", scores);
  if (x.is_cuda()) TE_CUDA_CALL(topk_pool_fwd, x, scores, k);
  return tokengine::cpu::topk_pool_fwd(x, scores, k);
}

std::tuple<at::Tensor, at::Tensor, OptTensor> qc_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, double softmax_scale,
    bool return_mass) {
  check_storage("qc_attention_fwd", {&q, &k_img, &v_img, &k_txt, &v_txt});
  check_same_device("qc_attention_fwd", q, {&k_img, &v_img, &k_txt, &v_txt, &cu_seqlens_txt});
  TORCH_CHECK(cu_seqlens_txt.scalar_type() == at::kInt && cu_seqlens_txt.is_contiguous(),
              "qc_attention_fwd: cu_seqlens_txt must be contiguous int32");
  if (q.is_cuda())
    TE_CUDA_CALL(qc_attention_fwd, q, k_img, v_img, k_txt, v_txt, cu_seqlens_txt, softmax_scale,
                 return_mass);
  return tokengine::cpu::qc_attention_fwd(q, k_img, v_img, k_txt, v_txt, cu_seqlens_txt,
                                          softmax_scale, return_mass);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qc_attention_bwd(
    const at::Tensor& grad_out, const OptTensor& grad_mass, const at::Tensor& q,
    const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale) {
  check_storage("qc_attention_bwd", {&grad_out, &q, &k_img, &v_img, &k_txt, &v_txt, &out});
  check_same_device("qc_attention_bwd", q,
                    {&grad_out, &k_img, &v_img, &k_txt, &v_txt, &cu_seqlens_txt, &out, &lse});
  TORCH_CHECK(cu_seqlens_txt.scalar_type() == at::kInt && cu_seqlens_txt.is_contiguous(),
              "qc_attention_bwd: cu_seqlens_txt must be contiguous int32");
  check_f32("qc_attention_bwd", "lse", lse);
  if (grad_mass) {
    check_same_device("qc_attention_bwd", q, {&*grad_mass});
    check_f32("qc_attention_bwd", "grad_mass", *grad_mass);
  }
  // csrc/cuda has no attention backward; tokengine.ops recomputes through the reference there.
  TORCH_CHECK(!q.is_cuda(), "qc_attention_bwd: tokengine._C has no CUDA backward");
  return tokengine::cpu::qc_attention_bwd(grad_out, grad_mass, q, k_img, v_img, k_txt, v_txt,
                                          cu_seqlens_txt, out, lse, softmax_scale);
}

bool with_cuda() {
#ifdef TOKENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tokengine compiled ops (C++ on CPU tensors, CUDA on CUDA tensors)";
  m.def("grid_pool_fwd", &grid_pool_fwd, "grid pooling forward (avg / max / weighted)");
  m.def("grid_pool_bwd", &grid_pool_bwd, "grid pooling backward (avg / weighted)");
  m.def("topk_pool_fwd", &topk_pool_fwd, "top-k token selection");
  m.def("qc_attention_fwd", &qc_attention_fwd, "question-conditioned attention forward");
  m.def("qc_attention_bwd", &qc_attention_bwd, "question-conditioned attention backward");
  m.def("with_cuda", &with_cuda, "whether the CUDA ops were compiled in");
  m.def("cpu_isas", &tokengine::cpu::qc_kernel_isas,
        "instruction sets of the CPU attention kernels this CPU runs, narrowest first");
  m.def("cpu_isa", &tokengine::cpu::qc_kernel_isa,
        "the instruction set the CPU attention kernels run with (TOKENGINE_CPU_ISA overrides)");
}
