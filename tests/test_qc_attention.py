"""qc_cross_attention: every backend against an independent float64 computation."""

import math

import pytest
import torch
import truth
from conftest import (
    DEVICE,
    DTYPES,
    assert_close,
    backend_params,
    device_sync_forbidden,
    skip_unless_fused_on_cuda,
    skip_unsupported,
    tolerance,
)

from tokengine import backends
from tokengine.ops import qc_cross_attention


def make(B, L, N, H, Hkv, D, lengths, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k_img, v_img = rand(B, L, H, D), rand(B, N, Hkv, D), rand(B, N, Hkv, D)
    k_txt, v_txt = rand(T, Hkv, D), rand(T, Hkv, D)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_img, v_img, k_txt, v_txt, cu.to(DEVICE)


def naive_low_precision(q, k_img, v_img, k_txt, v_txt, cu, scale):
    """Plain PyTorch attention computed in the inputs' own dtype: the error yardstick."""
    outs = []
    group = q.shape[2] // k_img.shape[2]
    for b in range(q.shape[0]):
        s, e = int(cu[b]), int(cu[b + 1])
        k = torch.cat([k_img[b], k_txt[s:e]]).repeat_interleave(group, 1).transpose(0, 1)
        v = torch.cat([v_img[b], v_txt[s:e]]).repeat_interleave(group, 1).transpose(0, 1)
        p = torch.softmax(q[b].transpose(0, 1) @ k.transpose(1, 2) * scale, dim=-1)
        outs.append((p @ v).transpose(0, 1))
    return torch.stack(outs)


def check(backend, B, L, N, H, Hkv, D, lengths, dtype, seed=0):
    skip_unsupported(backend, dtype)
    inputs = make(B, L, N, H, Hkv, D, lengths, dtype, seed)
    out, mass = qc_cross_attention(*inputs, return_attn_mass=True, backend=backend)
    cpu = [t.cpu() for t in inputs]
    scale = 1 / math.sqrt(D)
    expected, expected_mass = truth.qc_attention(*cpu, scale)
    assert out.dtype == dtype and mass.dtype == torch.float32
    S = N + max(lengths)
    v_scale = max(cpu[2].abs().max().item(), cpu[4].abs().max().item() if sum(lengths) else 0)
    tol = tolerance(dtype, S, v_scale)
    if dtype != torch.float32:  # FlashAttention's rule: at most 2x PyTorch's own error in dtype
        naive_err = (naive_low_precision(*cpu, scale).double() - expected).abs().max().item()
        tol = max(tol, 2 * naive_err)
    what = f"{backend} B{B} L{L} N{N} H{H}/{Hkv} D{D} {lengths} {dtype}"
    assert_close(out.cpu(), expected, tol, what + " out")
    # The mass is accumulated in float32 from the (exactly upcast) inputs whatever their dtype.
    mass_tol = tolerance(torch.float32, S * H * L, expected_mass.abs().max().item())
    assert_close(mass.cpu(), expected_mass, mass_tol, what + " mass")
    assert torch.all(mass.sum(-1) <= 1 + 1e-5)
    # Without the mass the output is the same computation.
    out_only = qc_cross_attention(*inputs, backend=backend)
    assert_close(out_only.cpu(), expected, tol, what + " out without mass")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("D", [16, 40, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gqa_varlen_head_dims(backend, D, dtype):
    # batch of 4 with question lengths including 0, GQA 8 query heads over 2 KV heads
    check(backend, B=4, L=9, N=23, H=8, Hkv=2, D=D, lengths=[5, 0, 17, 1], dtype=dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,L,N,H,Hkv,D,lengths",
    [
        (3, 1, 1, 1, 1, 1, [0, 0, 0]),  # smallest everything, no question at all
        (3, 33, 70, 4, 1, 24, [2, 40, 0]),  # MQA, blocks not multiples of any tile
        (1, 17, 5, 2, 2, 256, [3]),  # largest head dim
        (2, 4, 576, 2, 2, 8, [32, 31]),  # LLaVA's 576 image keys
    ],
)
def test_shapes(backend, dtype, B, L, N, H, Hkv, D, lengths):
    check(backend, B, L, N, H, Hkv, D, lengths, dtype)


@pytest.mark.parametrize("backend", backend_params())
def test_without_question_tensors(backend):
    q, k_img, v_img, *_ = make(3, 6, 11, 4, 2, 16, [0, 0, 0], torch.float32, seed=1)
    out, mass = qc_cross_attention(q, k_img, v_img, return_attn_mass=True, backend=backend)
    expected, expected_mass = truth.qc_attention(
        q.cpu(), k_img.cpu(), v_img.cpu(), None, None, None, 0.25
    )
    assert_close(out.cpu(), expected, tolerance(torch.float32, 11, 4.0), "out")
    assert_close(mass.cpu(), expected_mass, tolerance(torch.float32, 11 * 24, 1.0), "mass")
    torch.testing.assert_close(mass.sum(-1).cpu(), torch.ones(3))  # no question: all on image


@pytest.mark.parametrize("backend", backend_params())
def test_softmax_scale_and_non_contiguous(backend):
    q, k_img, v_img, k_txt, v_txt, cu = make(2, 8, 12, 4, 4, 16, [3, 4], torch.float32, 2)
    q_nc = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_nc.is_contiguous()
    out = qc_cross_attention(
        q_nc, k_img, v_img, k_txt, v_txt, cu, softmax_scale=0.3, backend=backend
    )
    expected, _ = truth.qc_attention(*(t.cpu() for t in (q, k_img, v_img, k_txt, v_txt, cu)), 0.3)
    assert_close(out.cpu(), expected, tolerance(torch.float32, 16, 4.0), "scale 0.3")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("with_mass", [False, True])
def test_gradients_match_float64_autograd(backend, with_mass):
    check_gradients(backend, with_mass)


def check_gradients(backend, with_mass):
    inputs = make(3, 5, 9, 4, 2, 12, [4, 0, 6], torch.float32, seed=5)
    leaves = [t.clone().requires_grad_() for t in inputs[:5]]
    leaves64 = [t.cpu().double().requires_grad_() for t in inputs[:5]]
    cu = inputs[5]
    out, mass = qc_cross_attention(*leaves, cu, return_attn_mass=True, backend=backend)
    out64, mass64 = truth.qc_attention(*leaves64, cu.cpu(), 1 / math.sqrt(12))
    g = torch.Generator().manual_seed(1)
    g_out, g_mass = torch.randn(out.shape, generator=g), torch.randn(mass.shape, generator=g)
    loss = (out * g_out.to(DEVICE)).sum() + with_mass * (mass * g_mass.to(DEVICE)).sum()
    loss64 = (out64 * g_out.double()).sum() + with_mass * (mass64 * g_mass.double()).sum()
    loss.backward()
    loss64.backward()
    for name, leaf, leaf64 in zip(
        ["q", "k_img", "v_img", "k_txt", "v_txt"], leaves, leaves64, strict=True
    ):
        tol = tolerance(torch.float32, 64, leaf64.grad.abs().max().item())
        assert_close(leaf.grad.cpu(), leaf64.grad, tol, f"{backend} grad {name} mass={with_mass}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels run on CPU tensors")
@pytest.mark.parametrize(
    "isa", backends.cpp_kernel_isas() or [pytest.param("none", marks=pytest.mark.skip)]
)
def test_every_cpp_kernel_isa(isa, monkeypatch):
    """Each build of the C++ kernels (portable, AVX2, AVX-512), not just the widest one."""
    from tokengine import _C

    monkeypatch.setenv("TOKENGINE_CPU_ISA", isa)
    assert _C.cpu_isa() == isa
    for D in (16, 40, 80, 128):
        check("cpp", B=4, L=9, N=23, H=8, Hkv=2, D=D, lengths=[5, 0, 17, 1], dtype=torch.float32)
    check("cpp", 3, 33, 70, 4, 1, 24, [2, 40, 0], torch.float16)
    check("cpp", 1, 17, 5, 2, 2, 256, [3], torch.bfloat16)
    check("cpp", 2, 4, 576, 2, 2, 8, [32, 31], torch.float32)
    check_gradients("cpp", with_mass=True)


@pytest.mark.skipif(not backends.cpp_kernel_isas(), reason="tokengine._C is not built")
def test_unknown_cpp_kernel_isa_is_an_error(monkeypatch):
    monkeypatch.setenv("TOKENGINE_CPU_ISA", "sse9")
    inputs = [t.cpu() for t in make(1, 2, 3, 1, 1, 4, [1], torch.float32, seed=0)]
    with pytest.raises(RuntimeError, match="TOKENGINE_CPU_ISA=sse9 .*expected one of generic"):
        qc_cross_attention(*inputs, backend="cpp")


def test_reference_gradcheck_float64():
    """The reference itself is differentiable in float64 (gradcheck, finite differences)."""
    inputs = make(2, 3, 4, 2, 1, 3, [2, 1], torch.float64, seed=7)
    leaves = [t.cpu().requires_grad_() for t in inputs[:5]]

    def f(*xs):
        return qc_cross_attention(*xs, inputs[5].cpu(), return_attn_mass=True, backend="reference")

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("with_mass", [False, True], ids=["out", "out+mass"])
def test_forward_never_waits_for_the_device(backend, with_mass):
    """cu_seqlens_txt's values are not read back on a GPU (that cost as much as the kernel)."""
    skip_unless_fused_on_cuda(backend)
    inputs = make(2, 8, 16, 2, 2, 16, [3, 5], torch.float16, seed=0)
    qc_cross_attention(*inputs, return_attn_mass=with_mass, backend=backend)  # compile first
    with device_sync_forbidden():
        qc_cross_attention(*inputs, return_attn_mass=with_mass, backend=backend)
