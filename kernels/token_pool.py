"""Triton kernels for ``token_pool``: grid pooling (avg / max / weighted) and top-k selection.

Semantics are those of :func:`tokengine.reference.token_pool`; signatures follow
docs/BACKEND_CONTRACT.md. Inputs arrive contiguous and validated. Accumulation is float32,
outputs are in the input dtype, and nothing uses atomics, so every result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["grid_pool_bwd", "grid_pool_fwd", "topk_pool_fwd"]

_MODES = {"avg": 0, "max": 1, "weighted": 2}
_TILE = 4096  # elements per 2-D register tile: keeps register pressure moderate at any D


def _launch(n: int, cap: int) -> tuple[int, int]:
    """(block, num_warps): block = next power of two of ``n`` capped at ``cap``."""
    block = min(triton.next_power_of_2(max(n, 1)), cap)
    return block, (8 if block >= 2048 else 4 if block >= 256 else 2 if block >= 64 else 1)


def _max_bin_cells(size: int, out: int) -> int:
    """Largest bin length along one axis (sizes the cell tile so one tile covers most bins)."""
    return max(-(-(i + 1) * size // out) - (i * size) // out for i in range(out))


@triton.jit
def _bin_bounds(bi, bj, H, W, h, w):
    # Adaptive-pooling bin of output cell (bi, bj): rows [rs, re), cols [cs, ce).
    rs = (bi * H) // h
    re = ((bi + 1) * H + h - 1) // h
    cs = (bj * W) // w
    ce = ((bj + 1) * W + w - 1) // w
    return rs, re, cs, ce


@triton.jit
def _grid_pool_fwd_kernel(
    x_ptr,
    s_ptr,
    out_ptr,
    H,
    W,
    h,
    w,
    D,
    MODE: tl.constexpr,  # 0 avg, 1 max, 2 weighted
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (batch, output bin) and block of D; it walks the bin's cells in
    # flattened tiles of BLOCK_N, so tall/wide/large bins all use full tiles.
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    nbins = h * w
    b = (pid // nbins).to(tl.int64)
    j = pid % nbins
    rs, re, cs, ce = _bin_bounds(j // w, j % w, H, W, h, w)
    bw = ce - cs
    count = (re - rs) * bw
    N = H * W
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x_b = x_ptr + b * N * D
    s_b = s_ptr + b * N

    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum x (avg/weighted) or max x
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum s*x (weighted)
    s_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # per-lane partial sums of s (weighted)
    nan = tl.zeros([BLOCK_D], dtype=tl.int32)  # max: adaptive_max_pool2d propagates NaN
    if MODE == 1:
        acc = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)
    for k0 in range(0, count, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N)
        mask_k = kk < count
        cell = ((rs + kk // bw) * W + cs + kk % bw).to(tl.int64)
        m2 = mask_k[:, None] & mask_d[None, :]
        ptrs = x_b + cell[:, None] * D + offs_d[None, :]
        if MODE == 1:
            xv = tl.load(ptrs, mask=m2, other=float("-inf")).to(tl.float32)
            acc = tl.maximum(acc, tl.max(xv, axis=0))
            nan = tl.maximum(nan, tl.max((xv != xv).to(tl.int32), axis=0))
        else:
            xv = tl.load(ptrs, mask=m2, other=0.0).to(tl.float32)
            acc += tl.sum(xv, axis=0)
            if MODE == 2:
                sv = tl.load(s_b + cell, mask=mask_k, other=0.0).to(tl.float32)
                acc_w += tl.sum(sv[:, None] * xv, axis=0)
                s_acc += sv

    if MODE == 1:
        res = tl.where(nan > 0, float("nan"), acc)
    else:
        res = acc / count.to(tl.float32)
        if MODE == 2:
            ssum = tl.sum(s_acc, axis=0)
            has_mass = ssum > 0
            # A bin whose weights sum to 0 falls back to the plain average.
            res = tl.where(has_mass, acc_w / tl.where(has_mass, ssum, 1.0), res)
    out_ptrs = out_ptr + (b * nbins + j) * D + offs_d
    tl.store(out_ptrs, res.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _weighted_bin_stats_kernel(
    x_ptr,
    s_ptr,
    g_ptr,
    ssum_ptr,
    gdot_ptr,
    H,
    W,
    h,
    w,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Per (batch, bin): S = sum of the bin's scores and gdot = <grad_out, out> with `out`
    # recomputed in float32. The score gradient of cell i in a bin with S > 0 is
    # (<g, x_i> - gdot) / S, so these two scalars are all the cell kernel needs per bin.
    pid = tl.program_id(0)
    nbins = h * w
    b = (pid // nbins).to(tl.int64)
    j = pid % nbins
    rs, re, cs, ce = _bin_bounds(j // w, j % w, H, W, h, w)
    bw = ce - cs
    count = (re - rs) * bw
    N = H * W
    x_b = x_ptr + b * N * D
    s_b = s_ptr + b * N

    s_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, count, BLOCK_N):
        kk = k0 + tl.arange(0, BLOCK_N)
        mask_k = kk < count
        cell = (rs + kk // bw) * W + cs + kk % bw
        s_acc += tl.load(s_b + cell, mask=mask_k, other=0.0).to(tl.float32)
    ssum = tl.sum(s_acc, axis=0)
    has_mass = ssum > 0
    inv_s = 1.0 / tl.where(has_mass, ssum, 1.0)

    gdot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, count, BLOCK_N):
            kk = k0 + tl.arange(0, BLOCK_N)
            mask_k = kk < count
            cell = ((rs + kk // bw) * W + cs + kk % bw).to(tl.int64)
            m2 = mask_k[:, None] & mask_d[None, :]
            xv = tl.load(x_b + cell[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
            xv = xv.to(tl.float32)
            sv = tl.load(s_b + cell, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(xv, axis=0)
            acc_w += tl.sum(sv[:, None] * xv, axis=0)
        out = tl.where(has_mass, acc_w * inv_s, acc / count.to(tl.float32))
        g = tl.load(g_ptr + (b * nbins + j) * D + offs_d, mask=mask_d, other=0.0)
        gdot += g.to(tl.float32) * out
    tl.store(ssum_ptr + b * nbins + j, ssum)
    tl.store(gdot_ptr + b * nbins + j, tl.sum(gdot, axis=0))


@triton.jit
def _cell_bins(cells, H, W, h, w):
    # Bins containing row r are i in [floor(r*h/H), floor(((r+1)*h - 1)/H)]: the first bin
    # whose end ceil((i+1)H/h) exceeds r and the last whose start floor(iH/h) is <= r. With
    # h <= H that range holds at most 2 bins (likewise for columns), hence 2x2 candidates.
    r = cells // W
    c = cells % W
    i_lo = (r * h) // H
    i_hi = ((r + 1) * h - 1) // H
    j_lo = (c * w) // W
    j_hi = ((c + 1) * w - 1) // W
    return i_lo, i_hi, j_lo, j_hi


@triton.jit
def _bin_coef(bi, bj, ok, s_i, ssum_b, gdot_b, H, W, h, w, WEIGHTED: tl.constexpr):
    # For candidate bin (bi, bj) of each cell: d out / d x_i (coef), the 1/S factor of the
    # score gradient (inv, 0 for a zero-mass bin) and its constant term gdot/S.
    rs, re, cs, ce = _bin_bounds(bi, bj, H, W, h, w)
    plain = 1.0 / ((re - rs) * (ce - cs)).to(tl.float32)
    if WEIGHTED:
        jb = bi * w + bj
        ssum = tl.load(ssum_b + jb, mask=ok, other=0.0)
        has_mass = ssum > 0
        inv = tl.where(has_mass, 1.0 / tl.where(has_mass, ssum, 1.0), 0.0)
        coef = tl.where(has_mass, s_i * inv, plain)
        const = inv * tl.load(gdot_b + jb, mask=ok, other=0.0)
    else:
        inv = tl.zeros_like(plain)
        coef = plain
        const = inv
    coef = tl.where(ok, coef, 0.0)
    inv = tl.where(ok, inv, 0.0)
    const = tl.where(ok, const, 0.0)
    return coef, inv, const


@triton.jit
def _grid_pool_bwd_kernel(
    g_ptr,
    x_ptr,
    s_ptr,
    ssum_ptr,
    gdot_ptr,
    gx_ptr,
    gs_ptr,
    H,
    W,
    h,
    w,
    D,
    D_PER_PROG,
    WEIGHTED: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program owns BLOCK_C grid cells (and a D range) and gathers from the <= 2x2 bins
    # that contain each cell: every gradient element is written once, with no atomics.
    # Weighted mode keeps the whole D range in one program, since grad_s reduces over D.
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    N = H * W
    nbins = h * w
    cells = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cells < N
    i_lo, i_hi, j_lo, j_hi = _cell_bins(cells, H, W, h, w)
    g_b = g_ptr + b * nbins * D
    x_b = x_ptr + b * N * D
    ssum_b = ssum_ptr + b * nbins
    gdot_b = gdot_ptr + b * nbins
    s_i = tl.zeros([BLOCK_C], dtype=tl.float32)
    if WEIGHTED:
        s_i = tl.load(s_ptr + b * N + cells, mask=mask_c, other=0.0).to(tl.float32)
    cells64 = cells.to(tl.int64)

    gs_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    d_begin = pid_d * D_PER_PROG
    for d0 in range(d_begin, d_begin + D_PER_PROG, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        gx = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        gw = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)  # sum over bins of g / S
        for di in tl.static_range(2):
            for dj in tl.static_range(2):
                bi = i_lo + di
                bj = j_lo + dj
                ok = mask_c & (bi <= i_hi) & (bj <= j_hi)
                coef, inv, _ = _bin_coef(bi, bj, ok, s_i, ssum_b, gdot_b, H, W, h, w, WEIGHTED)
                jb = (bi * w + bj).to(tl.int64)
                m2 = ok[:, None] & mask_d[None, :]
                g = tl.load(g_b + jb[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
                g = g.to(tl.float32)
                gx += g * coef[:, None]
                if WEIGHTED:
                    gw += g * inv[:, None]
        m2c = mask_c[:, None] & mask_d[None, :]
        offs = cells64[:, None] * D + offs_d[None, :]
        tl.store(gx_ptr + b * N * D + offs, gx.to(gx_ptr.dtype.element_ty), mask=m2c)
        if WEIGHTED:
            xv = tl.load(x_b + offs, mask=m2c, other=0.0).to(tl.float32)
            gs_acc += tl.sum(xv * gw, axis=1)

    if WEIGHTED:
        for di in tl.static_range(2):
            for dj in tl.static_range(2):
                bi = i_lo + di
                bj = j_lo + dj
                ok = mask_c & (bi <= i_hi) & (bj <= j_hi)
                _, _, const = _bin_coef(bi, bj, ok, s_i, ssum_b, gdot_b, H, W, h, w, WEIGHTED)
                gs_acc -= const
        tl.store(gs_ptr + b * N + cells, gs_acc, mask=mask_c)


@triton.jit
def _topk_rank_kernel(s_ptr, rank_ptr, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    # rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}: a strict total order, so ranks
    # are a permutation of 0..N-1 and rank < k keeps exactly k tokens (ties to lower index).
    b = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < N
    s_b = s_ptr + b * N
    si = tl.load(s_b + offs_i, mask=mask_i, other=0.0)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < N
        sj = tl.load(s_b + offs_j, mask=mask_j, other=0.0)
        gt = sj[None, :] > si[:, None]
        tie = (sj[None, :] == si[:, None]) & (offs_j[None, :] < offs_i[:, None])
        beats = (gt | tie) & mask_j[None, :]
        rank += tl.sum(beats.to(tl.int32), axis=1)
    tl.store(rank_ptr + b * N + offs_i, rank, mask=mask_i)


@triton.jit
def _topk_compact_kernel(rank_ptr, idx_ptr, N, k, BLOCK_I: tl.constexpr):
    # One program per batch row: output slot of a kept token = number of kept tokens before
    # it (running prefix sum over blocks), which yields ascending index order.
    b = tl.program_id(0).to(tl.int64)
    carry = tl.zeros([BLOCK_I], dtype=tl.int32)  # kept so far, broadcast over the block
    for i0 in range(0, N, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < N
        rank = tl.load(rank_ptr + b * N + offs_i, mask=mask_i, other=N)
        keep = ((rank < k) & mask_i).to(tl.int32)
        slot = carry + tl.cumsum(keep, axis=0) - keep
        tl.store(idx_ptr + b * k + slot, offs_i.to(tl.int64), mask=keep > 0)
        carry += tl.sum(keep, axis=0)


@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, out_ptr, N, k, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    # values[b, t] = x[b, indices[b, t]]
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_k = offs_k < k
    mask_d = offs_d < D
    idx = tl.load(idx_ptr + b * k + offs_k, mask=mask_k, other=0)
    m2 = mask_k[:, None] & mask_d[None, :]
    v = tl.load(x_ptr + (b * N + idx)[:, None] * D + offs_d[None, :], mask=m2, other=0.0)
    out = out_ptr + (b * k + offs_k)[:, None] * D + offs_d[None, :]
    tl.store(out, v, mask=m2)


def _tiles(D: int, cells: int, max_cells: int = _TILE) -> tuple[int, int, int]:
    """(BLOCK_CELLS, BLOCK_D, num_warps) for a [cells, D] register tile of <= _TILE elements."""
    block_d, _ = _launch(D, 256)
    block_c, _ = _launch(cells, max(min(_TILE // block_d, max_cells), 1))
    _, warps = _launch(block_c * block_d, _TILE)
    return block_c, block_d, warps


def grid_pool_fwd(
    x: torch.Tensor,
    scores: torch.Tensor | None,
    H: int,
    W: int,
    h: int,
    w: int,
    mode: str,
) -> torch.Tensor:
    """Adaptive grid pooling of x (B, H*W, D) to (B, h*w, D); scores (B, N) float32 if weighted."""
    B, N, D = x.shape
    out = torch.empty((B, h * w, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    cells = _max_bin_cells(H, h) * _max_bin_cells(W, w)
    block_n, block_d, warps = _tiles(D, cells)
    s = scores if mode == "weighted" else x  # unused pointer when not weighted
    grid = (B * h * w, triton.cdiv(D, block_d))
    _grid_pool_fwd_kernel[grid](
        x, s, out, H, W, h, w, D, _MODES[mode], block_n, block_d, num_warps=warps
    )
    return out


def grid_pool_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scores: torch.Tensor | None,
    H: int,
    W: int,
    h: int,
    w: int,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad_x (B, N, D) in x.dtype, grad_scores (B, N) float32 or None) for avg / weighted."""
    if mode not in ("avg", "weighted"):
        raise ValueError(f"grid_pool_bwd supports 'avg' and 'weighted', not {mode!r}")
    B, N, D = x.shape
    weighted = mode == "weighted"
    grad_x = torch.empty_like(x)
    grad_s = torch.empty((B, N), dtype=torch.float32, device=x.device) if weighted else None
    if B == 0 or N == 0:
        return grad_x, grad_s
    if D == 0:
        if weighted:
            grad_s.zero_()
        return grad_x, grad_s
    nbins = h * w
    if weighted:
        ssum = torch.empty((B, nbins), dtype=torch.float32, device=x.device)
        gdot = torch.empty_like(ssum)
        cells = _max_bin_cells(H, h) * _max_bin_cells(W, w)
        block_n, block_d, warps = _tiles(D, cells)
        _weighted_bin_stats_kernel[(B * nbins,)](
            x, scores, grad_out, ssum, gdot, H, W, h, w, D, block_n, block_d, num_warps=warps
        )
        s, gs = scores, grad_s
    else:
        ssum = gdot = s = gs = x  # unused pointers in avg mode
    # At most 64 cells per program: enough programs along the cell axis to fill the device.
    block_c, block_d, warps = _tiles(D, N, max_cells=64)
    d_per_prog = D if weighted else block_d
    grid = (B, triton.cdiv(N, block_c), triton.cdiv(D, d_per_prog))
    _grid_pool_bwd_kernel[grid](
        grad_out,
        x,
        s,
        ssum,
        gdot,
        grad_x,
        gs,
        H,
        W,
        h,
        w,
        D,
        d_per_prog,
        weighted,
        block_c,
        block_d,
        num_warps=warps,
    )
    return grad_x, grad_s


def topk_pool_fwd(
    x: torch.Tensor, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, k, D) in x.dtype, indices (B, k) int64): top-k scores, ascending index order."""
    B, N, D = x.shape
    values = torch.empty((B, k, D), dtype=x.dtype, device=x.device)
    indices = torch.empty((B, k), dtype=torch.int64, device=x.device)
    if B == 0 or k == 0:
        return values, indices
    rank = torch.empty((B, N), dtype=torch.int32, device=x.device)
    block_i, warps = _launch(N, 64)
    _topk_rank_kernel[(B, triton.cdiv(N, block_i))](
        scores, rank, N, block_i, block_i, num_warps=warps
    )
    block_scan, warps = _launch(N, 1024)
    _topk_compact_kernel[(B,)](rank, indices, N, k, block_scan, num_warps=warps)
    if D > 0:
        block_k, block_d, warps = _tiles(D, k)
        grid = (B, triton.cdiv(k, block_k), triton.cdiv(D, block_d))
        _gather_rows_kernel[grid](x, indices, values, N, k, D, block_k, block_d, num_warps=warps)
    return values, indices
