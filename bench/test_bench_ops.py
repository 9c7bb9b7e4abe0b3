"""Op benchmarks: every backend beside its natural PyTorch baseline, in the same run.

    pytest bench/ --benchmark-only [--benchmark-group-by=group]

Shapes: LLaVA-1.5 (576 vision tokens, widths 1024 and 4096) for pooling; the fusion module
(64-256 queries, 32 question tokens per sample, 16 heads x 64) and the C++ issue's CPU target
(B=8, L=64, N=576, 32 question tokens, H=8, D=64) for attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params, run

from tokengine import backends
from tokengine.ops import qc_cross_attention, token_pool

DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32

POOL_SHAPES = [(16, 1024, 64), (4, 4096, 144)]  # (B, D, N_l) from a 24x24 grid


def pool_inputs(B, D, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 576, D, generator=g).to(DEVICE, dtype)
    return x, torch.rand(B, 576, generator=g).to(DEVICE)


def pool_bytes(x, tokens, with_scores=False):
    return x.element_size() * x.shape[-1] * x.shape[0] * (576 + tokens) + with_scores * 4 * 576


@pytest.mark.parametrize("B,D,tokens", POOL_SHAPES)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["avg", "weighted", "topk"])
def test_token_pool(benchmark, backend, mode, B, D, tokens):
    benchmark.group = f"token_pool {mode} B{B} 576->{tokens} D{D} {DTYPE}"
    x, scores = pool_inputs(B, D)
    s = None if mode == "avg" else scores
    run(
        benchmark,
        lambda: token_pool(x, tokens, mode=mode, scores=s, backend=backend),
        pool_bytes(x, tokens, s is not None),
    )


@pytest.mark.parametrize("B,D,tokens", POOL_SHAPES)
def test_token_pool_baseline_adaptive_avg_pool2d(benchmark, B, D, tokens):
    benchmark.group = f"token_pool avg B{B} 576->{tokens} D{D} {DTYPE}"
    x, _ = pool_inputs(B, D)
    h = max(d for d in range(1, 13) if tokens % d == 0 and d * d <= tokens)

    def baseline():
        img = x.transpose(1, 2).reshape(B, D, 24, 24)
        return F.adaptive_avg_pool2d(img, (h, tokens // h)).flatten(2).transpose(1, 2)

    run(benchmark, baseline, pool_bytes(x, tokens))


# (B, L, N, T per sample, H, D)
ATTN_SHAPES = [(8, 64, 576, 32, 8, 64), (4, 256, 576, 32, 16, 64)]


def attn_inputs(B, L, N, T, H, D, dtype=DTYPE):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEVICE)
    return (
        rand(B, L, H, D),
        rand(B, N, H, D),
        rand(B, N, H, D),
        rand(B * T, H, D),
        rand(B * T, H, D),
        cu,
    )


def attn_bytes(inputs, with_mass):
    q, k_img, v_img, k_txt, v_txt, _ = inputs
    moved = sum(t.numel() * t.element_size() for t in (q, k_img, v_img, k_txt, v_txt))
    return moved + q.numel() * q.element_size() + with_mass * k_img.shape[0] * k_img.shape[1] * 4


def shape_id(shape):
    return "B{}-L{}-N{}-T{}-H{}-D{}".format(*shape)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("with_mass", [False, True], ids=["out", "out+mass"])
def test_qc_cross_attention(benchmark, backend, with_mass, shape):
    benchmark.group = f"qc_attention {'out+mass' if with_mass else 'out'} {shape_id(shape)} {DTYPE}"
    inputs = attn_inputs(*shape)
    run(
        benchmark,
        lambda: qc_cross_attention(*inputs, return_attn_mass=with_mass, backend=backend),
        attn_bytes(inputs, with_mass),
    )


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the C++ kernels' builds per CPU ISA")
@pytest.mark.parametrize(
    "isa", backends.cpp_kernel_isas() or [pytest.param("none", marks=pytest.mark.skip)]
)
@pytest.mark.parametrize("with_mass", [False, True], ids=["out", "out+mass"])
def test_qc_cross_attention_cpp_isa(benchmark, monkeypatch, isa, with_mass):
    """Each instruction-set build of the C++ kernels at the issue's CPU shape."""
    shape = ATTN_SHAPES[0]
    benchmark.group = f"qc_attention cpp per ISA {'out+mass' if with_mass else 'out'} " + (
        f"{shape_id(shape)} {DTYPE}"
    )
    monkeypatch.setenv("TOKENGINE_CPU_ISA", isa)
    inputs = attn_inputs(*shape)
    run(
        benchmark,
        lambda: qc_cross_attention(*inputs, return_attn_mass=with_mass, backend="cpp"),
        attn_bytes(inputs, with_mass),
    )


def concatenated_kv(inputs):
    """Baseline layout: torch.cat of each sample's image and question KV, heads first."""
    q, k_img, v_img, k_txt, v_txt, _ = inputs
    B, T = k_img.shape[0], k_txt.shape[0] // k_img.shape[0]
    k = torch.cat([k_img, k_txt.view(B, T, *k_txt.shape[1:])], dim=1)
    v = torch.cat([v_img, v_txt.view(B, T, *v_txt.shape[1:])], dim=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=shape_id)
def test_qc_baseline_cat_sdpa(benchmark, shape):
    benchmark.group = f"qc_attention out {shape_id(shape)} {DTYPE}"
    inputs = attn_inputs(*shape)

    def baseline():
        q, k, v = concatenated_kv(inputs)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    run(benchmark, baseline, attn_bytes(inputs, False))


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=shape_id)
def test_qc_baseline_cat_explicit_softmax_mass(benchmark, shape):
    benchmark.group = f"qc_attention out+mass {shape_id(shape)} {DTYPE}"
    inputs = attn_inputs(*shape)
    N = shape[2]

    def baseline():
        q, k, v = concatenated_kv(inputs)
        p = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
        out = (p.to(v.dtype) @ v).transpose(1, 2)
        return out, p[..., :N].mean(dim=(1, 2))

    run(benchmark, baseline, attn_bytes(inputs, True))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="flash-attn needs a CUDA device")
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=shape_id)
def test_qc_baseline_flash_attn_varlen(benchmark, shape):
    flash_attn = pytest.importorskip("flash_attn")
    benchmark.group = f"qc_attention out {shape_id(shape)} {DTYPE}"
    inputs = attn_inputs(*shape)
    q, k, v = (t.transpose(1, 2) for t in concatenated_kv(inputs))
    B, L, H, D = q.shape
    S = k.shape[1]
    cu_q = torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=DEVICE)
    cu_k = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=DEVICE)
    qf, kf, vf = q.reshape(-1, H, D), k.reshape(-1, H, D), v.reshape(-1, H, D)
    run(
        benchmark,
        lambda: flash_attn.flash_attn_varlen_func(qf, kf, vf, cu_q, cu_k, L, S),
        attn_bytes(inputs, False),
    )
