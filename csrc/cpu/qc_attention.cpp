// ATen entry points of question-conditioned attention on CPU: shape guards, float32 staging of
// half / bfloat16 tensors (O(size) next to the O(L*S*D) kernels), and kernel ISA selection.
#include "cpu/ops_cpu.h"
#include "cpu/qc_kernels.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace tokengine::cpu {
namespace {

struct Kernels {
  const char* isa;
  size_t (*fwd_workspace)(const QcProblem&, bool, int);
  void (*fwd)(const QcProblem&, const QcFwdOut&, float*, int);
  size_t (*bwd_workspace)(const QcProblem&);
  void (*bwd)(const QcProblem&, const QcBwdIO&, float*, int);
};

#define TE_KERNELS(ns) Kernels{#ns, ns::fwd_workspace, ns::fwd, ns::bwd_workspace, ns::bwd}

// The kernel builds this CPU can run, narrowest first (probed once).
const std::vector<Kernels>& runnable() {
  static const std::vector<Kernels> ks = [] {
    std::vector<Kernels> v{TE_KERNELS(generic)};
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      v.push_back(TE_KERNELS(avx2));
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
      v.push_back(TE_KERNELS(avx512));
#endif
    return v;
  }();
  return ks;
}
#undef TE_KERNELS

// The widest build, or the one TOKENGINE_CPU_ISA names (read per call, so tests can switch).
Kernels kernels() {
  const std::vector<Kernels>& ks = runnable();
  const char* want = std::getenv("TOKENGINE_CPU_ISA");
  if (!want || !*want) return ks.back();
  std::string names;
  for (const Kernels& k : ks) {
    if (std::strcmp(k.isa, want) == 0) return k;
    names += std::string(names.empty() ? "" : ", ") + k.isa;
  }
  TORCH_CHECK(false, "TOKENGINE_CPU_ISA=", want, " is not one this CPU runs; expected one of ",
              names);
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

QcProblem make_problem(const char* op, const at::Tensor& q, const at::Tensor& k_img,
                       const at::Tensor& v_img, const at::Tensor& k_txt, const at::Tensor& v_txt,
                       const at::Tensor& cu, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_img.dim() == 4 && k_txt.dim() == 3, op,
              ": expected q (B, L, H, D), k_img (B, N, Hkv, D), k_txt (T, Hkv, D)");
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t N = k_img.size(1), Hkv = k_img.size(2), T = k_txt.size(0);
  TORCH_CHECK(k_img.size(0) == B && k_img.size(3) == D && v_img.sizes() == k_img.sizes(), op,
              ": k_img / v_img must be (B, N, Hkv, D)");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK(k_txt.size(1) == Hkv && k_txt.size(2) == D && v_txt.sizes() == k_txt.sizes(), op,
              ": k_txt / v_txt must be (T, Hkv, D)");
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) == B + 1, op, ": cu_seqlens_txt must be (B+1,)");
  const int32_t* c = cu.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)  // the kernels index k_txt with these offsets
    TORCH_CHECK(c[b] >= 0 && c[b] <= c[b + 1] && c[b + 1] <= T, op,
                ": cu_seqlens_txt must be non-decreasing within [0, T]");
  return {B, L, H, Hkv, N, D, static_cast<float>(scale), nullptr, nullptr, nullptr, nullptr,
          nullptr, c};
}

}  // namespace

std::vector<std::string> qc_kernel_isas() {
  std::vector<std::string> names;
  for (const Kernels& k : runnable()) names.emplace_back(k.isa);
  return names;
}

std::string qc_kernel_isa() { return kernels().isa; }

std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> qc_attention_fwd(
    const at::Tensor& q, const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, double softmax_scale,
    bool return_mass) {
  QcProblem p = make_problem("qc_attention_fwd", q, k_img, v_img, k_txt, v_txt, cu_seqlens_txt,
                             softmax_scale);
  const at::Tensor qf = as_f32(q), kif = as_f32(k_img), vif = as_f32(v_img);
  const at::Tensor ktf = as_f32(k_txt), vtf = as_f32(v_txt);
  p.q = qf.data_ptr<float>(), p.k_img = kif.data_ptr<float>(), p.v_img = vif.data_ptr<float>();
  p.k_txt = ktf.data_ptr<float>(), p.v_txt = vtf.data_ptr<float>();

  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t nqb = (p.L + kQcBlockM - 1) / kQcBlockM;
  at::Tensor out = at::empty(q.sizes(), f32), lse = at::empty({p.B, p.H, p.L}, f32);
  at::Tensor parts = return_mass ? at::empty({p.B, p.H * nqb, p.N}, f32) : at::Tensor();
  const QcFwdOut o{out.data_ptr<float>(), lse.data_ptr<float>(),
                   return_mass ? parts.data_ptr<float>() : nullptr};

  const Kernels kern = kernels();
  const int threads = at::get_num_threads();
  const auto per_thread = static_cast<int64_t>(kern.fwd_workspace(p, return_mass, threads));
  at::Tensor ws = at::empty({per_thread * threads}, f32);
  kern.fwd(p, o, ws.data_ptr<float>(), threads);

  c10::optional<at::Tensor> mass;  // per-block partial sums, reduced in a fixed order
  if (return_mass) mass = parts.sum(1).div_(static_cast<double>(p.H * p.L));
  return {out.to(q.scalar_type()), lse, mass};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> qc_attention_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_mass, const at::Tensor& q,
    const at::Tensor& k_img, const at::Tensor& v_img, const at::Tensor& k_txt,
    const at::Tensor& v_txt, const at::Tensor& cu_seqlens_txt, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale) {
  QcProblem p = make_problem("qc_attention_bwd", q, k_img, v_img, k_txt, v_txt, cu_seqlens_txt,
                             softmax_scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "qc_attention_bwd: grad_out and out must have q's shape");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.H, p.L}),
              "qc_attention_bwd: lse must be (B, H, L)");
  TORCH_CHECK(!grad_mass || grad_mass->sizes() == at::IntArrayRef({p.B, p.N}),
              "qc_attention_bwd: grad_mass must be (B, N)");
  const at::Tensor qf = as_f32(q), kif = as_f32(k_img), vif = as_f32(v_img);
  const at::Tensor ktf = as_f32(k_txt), vtf = as_f32(v_txt);
  const at::Tensor dof = as_f32(grad_out), of = as_f32(out), lsef = as_f32(lse);
  const at::Tensor gmf = grad_mass ? as_f32(*grad_mass) : at::Tensor();
  p.q = qf.data_ptr<float>(), p.k_img = kif.data_ptr<float>(), p.v_img = vif.data_ptr<float>();
  p.k_txt = ktf.data_ptr<float>(), p.v_txt = vtf.data_ptr<float>();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty(q.sizes(), f32), dki = at::empty(k_img.sizes(), f32);
  at::Tensor dvi = at::empty(k_img.sizes(), f32);
  // Question rows outside every sample's range get no gradient, so start from zero.
  at::Tensor dkt = at::zeros(k_txt.sizes(), f32), dvt = at::zeros(k_txt.sizes(), f32);
  const QcBwdIO io{dof.data_ptr<float>(), of.data_ptr<float>(), lsef.data_ptr<float>(),
                   grad_mass ? gmf.data_ptr<float>() : nullptr,
                   dq.data_ptr<float>(), dki.data_ptr<float>(), dvi.data_ptr<float>(),
                   dkt.data_ptr<float>(), dvt.data_ptr<float>()};

  const Kernels kern = kernels();
  const int threads = at::get_num_threads();
  at::Tensor ws = at::empty({static_cast<int64_t>(kern.bwd_workspace(p)) * threads}, f32);
  kern.bwd(p, io, ws.data_ptr<float>(), threads);

  const auto dt = q.scalar_type();
  return {dq.to(dt), dki.to(dt), dvi.to(dt), dkt.to(dt), dvt.to(dt)};
}

}  // namespace tokengine::cpu
