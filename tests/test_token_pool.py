"""token_pool: every backend against an independent float64 computation."""

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

from tokengine.ops import token_pool

TOKEN_COUNTS = [1, 4, 8, 16, 32, 64, 128, 144, 256, 576]
GRIDS = [(24, 24), (6, 10)]  # square LLaVA grid and a rectangular one with uneven bins


def make(B, grid, D, dtype, seed, zero_bins=False):
    g = torch.Generator().manual_seed(seed)
    N = grid[0] * grid[1]
    x = torch.randn(B, N, D, generator=g).to(dtype)
    scores = torch.rand(B, N, generator=g)
    if zero_bins:  # whole rows of the grid with zero weight: some bins sum to 0
        scores.view(B, *grid)[:, : grid[0] // 2] = 0
    return x.to(DEVICE), scores.to(DEVICE)


def check_pool(backend, grid, tokens, mode, dtype, zero_bins=False, B=2, D=7):
    skip_unsupported(backend, dtype)
    x, scores = make(B, grid, D, dtype, seed=tokens, zero_bins=zero_bins)
    s = scores if mode == "weighted" else None
    out = token_pool(x, tokens, grid=grid, mode=mode, scores=s, backend=backend)
    expected = truth.grid_pool(x.cpu(), tokens, grid, mode, None if s is None else s.cpu())
    assert out.dtype == dtype
    tol = tolerance(dtype, grid[0] * grid[1] // tokens + 1, expected.abs().max().item())
    assert_close(out.cpu(), expected, tol, f"{backend} {mode} {grid}->{tokens} {dtype}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["avg", "max", "weighted"])
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
def test_grid_pool_24x24_fp32(backend, mode, tokens):
    check_pool(backend, (24, 24), tokens, mode, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["avg", "max", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 8, 15, 60])
def test_grid_pool_rectangular(backend, mode, dtype, tokens):
    check_pool(backend, (6, 10), tokens, mode, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["avg", "max", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens", [4, 144])
def test_grid_pool_half(backend, mode, dtype, tokens):
    check_pool(backend, (24, 24), tokens, mode, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tokens", [1, 16, 144])
def test_weighted_zero_bins_fall_back_to_average(backend, tokens):
    check_pool(backend, (24, 24), tokens, "weighted", torch.float32, zero_bins=True)


@pytest.mark.parametrize("backend", backend_params())
def test_wide_features(backend):
    """D larger than one block of the kernels, and not a power of two."""
    check_pool(backend, (12, 12), 16, "avg", torch.float32, D=1100, B=1)
    check_pool(backend, (12, 12), 16, "weighted", torch.float32, D=1100, B=1)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 5, 64, 576])
def test_topk_with_ties(backend, dtype, tokens):
    skip_unsupported(backend, dtype)
    x, scores = make(3, (24, 24), 6, dtype, seed=tokens)
    scores = (scores * 4).floor()  # only 4 distinct values: ties everywhere
    values, indices = token_pool(x, tokens, mode="topk", scores=scores, backend=backend)
    expected_values, expected_indices = truth.topk_pool(x.cpu(), scores.cpu(), tokens)
    assert indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(values.cpu().double(), expected_values)  # a gather is exact


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["avg", "max", "weighted", "topk"])
@pytest.mark.parametrize("grid,tokens", [((24, 24), 16), ((6, 10), 8)])
def test_gradients_match_float64_autograd(backend, mode, grid, tokens):
    x, scores = make(2, grid, 5, torch.float32, seed=3, zero_bins=True)
    x64, s64 = x.cpu().double().requires_grad_(), scores.cpu().double().requires_grad_()
    x, scores = x.clone().requires_grad_(), scores.clone().requires_grad_()
    s = scores if mode in ("weighted", "topk") else None
    if mode == "topk":
        out = token_pool(x, tokens, grid=grid, mode=mode, scores=s, backend=backend)[0]
        expected = truth.topk_pool(x64, s64, tokens)[0]
    else:
        out = token_pool(x, tokens, grid=grid, mode=mode, scores=s, backend=backend)
        expected = truth.grid_pool(x64, tokens, grid, mode, s64 if mode == "weighted" else None)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(cotangent.to(DEVICE))
    expected.backward(cotangent.double())
    tol = tolerance(torch.float32, 16, x64.grad.abs().max().item())
    assert_close(x.grad.cpu(), x64.grad, tol, f"{backend} {mode} grad x")
    if mode == "weighted":
        tol = tolerance(torch.float32, 64, s64.grad.abs().max().item())
        assert_close(scores.grad.cpu(), s64.grad, tol, f"{backend} weighted grad scores")


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_input(backend):
    x, scores = make(2, (24, 24), 8, torch.float32, seed=1)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    assert not x_nc.is_contiguous()
    out = token_pool(x_nc, 64, backend=backend)
    expected = truth.grid_pool(x.cpu(), 64, (24, 24), "avg")
    assert_close(out.cpu(), expected, tolerance(torch.float32, 9, 4.0), "non-contiguous")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["avg", "weighted", "topk"])
def test_forward_never_waits_for_the_device(backend, mode):
    skip_unless_fused_on_cuda(backend)
    x, scores = make(2, (24, 24), 16, torch.float16, seed=0)
    s = None if mode == "avg" else scores
    token_pool(x, 16, mode=mode, scores=s, backend=backend)  # compilation may synchronise
    with device_sync_forbidden():
        token_pool(x, 16, mode=mode, scores=s, backend=backend)
