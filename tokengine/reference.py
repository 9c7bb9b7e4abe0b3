"""Plain-PyTorch reference semantics of every tokengine op: the spec.

Every fast backend (Triton, C++, CUDA) is tested against these functions. They favour
clarity over speed, are differentiable, and work in float64. They do *not* validate their
inputs; :mod:`tokengine.ops` does that before dispatching here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "pool_bins",
    "pool_output_grid",
    "qc_cross_attention",
    "token_pool",
    "valid_token_counts",
]


def pool_output_grid(tokens: int) -> tuple[int, int]:
    """(h, w) for N_l = ``tokens``: h is the largest divisor of N_l with h <= sqrt(N_l).

    256 -> (16, 16), 128 -> (8, 16), 8 -> (2, 4), 7 -> (1, 7).
    """
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def valid_token_counts(grid: tuple[int, int]) -> list[int]:
    """Every N_l whose output grid (h, w) fits inside ``grid`` = (H, W)."""
    H, W = grid
    return [n for n in range(1, H * W + 1) if _fits(pool_output_grid(n), grid)]


def _fits(out_hw: tuple[int, int], grid: tuple[int, int]) -> bool:
    return out_hw[0] <= grid[0] and out_hw[1] <= grid[1]


def pool_bins(size: int, out: int) -> list[tuple[int, int]]:
    """Adaptive-pooling bins [start, end) of ``size`` cells into ``out`` bins (as PyTorch)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _membership(grid: tuple[int, int], out_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """(h*w, H*W) 0/1 matrix: row j marks the grid cells of output bin j (row-major)."""
    H, W = grid
    rows = torch.zeros(out_hw[0], H, dtype=like.dtype, device=like.device)
    cols = torch.zeros(out_hw[1], W, dtype=like.dtype, device=like.device)
    for i, (s, e) in enumerate(pool_bins(H, out_hw[0])):
        rows[i, s:e] = 1
    for j, (s, e) in enumerate(pool_bins(W, out_hw[1])):
        cols[j, s:e] = 1
    return torch.einsum("aH,bW->abHW", rows, cols).reshape(out_hw[0] * out_hw[1], H * W)


def token_pool(
    x: torch.Tensor,
    tokens: int,
    *,
    grid: tuple[int, int],
    mode: str = "avg",
    scores: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reduce (B, N, D) grid tokens to (B, tokens, D). See DESIGN.md "token_pool".

    ``grid`` = (H, W) with H*W = N. Modes: ``avg``, ``max`` (adaptive pooling of the grid to
    :func:`pool_output_grid`), ``weighted`` (per-bin sum(s*x)/sum(s) with ``scores`` (B, N) >= 0,
    plain average where a bin's weights sum to 0) and ``topk`` (the ``tokens`` highest
    ``scores``, in ascending index order, ties to the lower index; returns (values, indices)).
    Accumulates in float32 (float64 for float64 input) and returns x.dtype.
    """
    if mode == "topk":
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        indices = order[:, :tokens].sort(dim=-1).values
        values = torch.gather(x, 1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return values, indices

    B, N, D = x.shape
    out_hw = pool_output_grid(tokens)
    acc = x.to(_acc_dtype(x.dtype))
    if mode == "max":
        img = acc.transpose(1, 2).reshape(B, D, *grid)
        return F.adaptive_max_pool2d(img, out_hw).flatten(2).transpose(1, 2).to(x.dtype)

    member = _membership(grid, out_hw, acc)  # (N_l, N)
    plain = (member @ acc) / member.sum(-1, keepdim=True)
    if mode == "avg":
        return plain.to(x.dtype)
    # weighted
    s = scores.to(acc.dtype)
    weights = member.unsqueeze(0) * s.unsqueeze(1)  # (B, N_l, N)
    denom = weights.sum(-1, keepdim=True)
    has_mass = denom > 0
    weighted = (weights @ acc) / torch.where(has_mass, denom, torch.ones_like(denom))
    return torch.where(has_mass, weighted, plain).to(x.dtype)


def qc_cross_attention(
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k_txt: torch.Tensor | None = None,
    v_txt: torch.Tensor | None = None,
    cu_seqlens_txt: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
    return_attn_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Question-conditioned cross-attention, one softmax over [image keys ; question keys].

    q: (B, L, H, D); k_img, v_img: (B, N, Hkv, D); k_txt, v_txt: packed (T, Hkv, D) with
    cu_seqlens_txt (B+1,) int32 (sample b owns rows cu[b]:cu[b+1]). Head h reads KV head
    h // (H // Hkv). Returns out (B, L, H, D) in q.dtype and, with ``return_attn_mass``,
    mass (B, N): the probability each image key receives, averaged over heads and queries
    (float32, or float64 for float64 input).
    """
    B, L, H, D = q.shape
    group = H // k_img.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    acc_dtype = _acc_dtype(q.dtype)
    outs, masses = [], []
    for b in range(B):
        k, v = k_img[b], v_img[b]
        if k_txt is not None:
            s, e = int(cu_seqlens_txt[b]), int(cu_seqlens_txt[b + 1])
            k, v = torch.cat([k, k_txt[s:e]]), torch.cat([v, v_txt[s:e]])
        k = k.to(acc_dtype).repeat_interleave(group, dim=1)  # (S, H, D)
        v = v.to(acc_dtype).repeat_interleave(group, dim=1)
        logits = torch.einsum("lhd,shd->hls", q[b].to(acc_dtype), k) * scale
        p = torch.softmax(logits, dim=-1)  # (H, L, S)
        outs.append(torch.einsum("hls,shd->lhd", p, v))
        masses.append(p[..., : k_img.shape[1]].mean(dim=(0, 1)))
    out = torch.stack(outs).to(q.dtype)
    if return_attn_mass:
        return out, torch.stack(masses)
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
