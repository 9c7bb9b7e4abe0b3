"""Fused Triton question-conditioned cross-attention (FlashAttention-2 style).

One softmax over [image keys ; the sample's packed question keys], never materialising the
concatenation. See ``tokengine.reference.qc_cross_attention`` for the semantics and
``docs/BACKEND_CONTRACT.md`` for the signatures.

Forward: each program owns (sample b, query head h, a block of BLOCK_M queries). It runs an
online softmax (fp32 state, base-2 exponentials) over the sample's N image keys (KV head
h // (H // Hkv)), then over the question keys cu[b]:cu[b+1] of the packed k_txt/v_txt. With
``return_mass`` the row's log-sum-exp is then known, so a second pass over the image-key blocks
recomputes q.k, forms P = exp(s - lse) in registers and sums it over the block's query rows;
the per-program partial sums go to a (B, H * num_m_blocks, N) buffer that the wrapper reduces
deterministically (no atomics, P never written to memory).

Backward (``qc_attention_bwd``): a preprocessing kernel computes
delta = rowsum(dO * O) + sum_n P_n * g_n over image keys, g = grad_mass / (H * L) (the mass
gradient adds g_n to dP on image columns); one kernel computes dq per query block; one kernel
computes dk/dv per key block (image blocks and question blocks), looping over every query head
of the GQA group and every query block, so the group reduction is deterministic.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) bfloat16 is miscomputed, so
for bf16 there every loaded tile is upcast to float32 and the dots run in float32. On a GPU the
dots take the input dtype (fp16/bf16 tensor cores, fp32 accumulation); float32 inputs use
``input_precision="ieee"`` (no TF32 rounding) to stay close to the float32 reference.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["qc_attention_bwd", "qc_attention_fwd"]

_LOG2E = 1.4426950408889634


def _interpreting(t: torch.Tensor) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" or t.device.type == "cpu"


def _fwd_config(L: int, D: int, elem_size: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the forward kernel.

    Chosen so that the kernel compiles for sm_80 and sm_90 without register spills (checked
    with ptxas for every head-dim bucket, with and without the mass pass) and with at most
    ~100 KB of shared memory; large head dims get smaller tiles to bound registers. float32
    inputs use exact (FMA) dots, which need much smaller tiles than tensor-core fp16/bf16.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if elem_size >= 4:
        bm, bn, warps, stages = (64, 32, 8, 2) if block_d <= 64 else (32, 16, 8, 2)
    elif block_d <= 64:
        bm, bn, warps, stages = 128, 64, 8, 3
    elif block_d <= 128:
        bm, bn, warps, stages = 64, 64, 8, 2
    else:
        bm, bn, warps, stages = 32, 32, 4, 2
    bm = min(bm, max(16, triton.next_power_of_2(L)))
    if elem_size < 4 and block_d <= 64 and bm <= 32:  # few queries: fewer warps suffice
        warps = 4
    return bm, bn, block_d, warps, stages


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # F32: float32 operands -> exact fp32 FMA dot (no TF32 rounding).
    if F32:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _load_kv_tile(
    k_base, v_base, rows, n_mask, offs_d, d_mask,
    stride_kn, stride_kd, stride_vn, stride_vd, UPCAST: tl.constexpr,
):  # fmt: skip
    """Key and value rows ``rows`` of one segment, (BLOCK_N, BLOCK_D), zero where masked."""
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        k_base + rows[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_base + rows[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _attend_segment(
    q,
    m_i,
    l_i,
    acc,
    k_base,
    v_base,
    n_keys,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_n,
    offs_d,
    d_mask,
    qk_scale,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with one segment of ``n_keys`` keys/values."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    for start_n in range(0, n_keys, BLOCK_N):
        rows = start_n + offs_n
        n_mask = rows < n_keys
        k, v = _load_kv_tile(
            k_base, v_base, rows, n_mask, offs_d, d_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, UPCAST,
        )  # fmt: skip
        s = _dot(q, tl.trans(k), F32) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _qc_attn_fwd_kernel(
    Q,
    KI,
    VI,
    KT,
    VT,
    CU,
    O,
    LSE,
    MASS,
    qk_scale,
    L,
    N,
    H,
    GROUP,
    HEAD_DIM,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kib,
    stride_kin,
    stride_kih,
    stride_kid,
    stride_vib,
    stride_vin,
    stride_vih,
    stride_vid,
    stride_ktt,
    stride_kth,
    stride_ktd,
    stride_vtt,
    stride_vth,
    stride_vtd,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_mb,
    stride_mp,
    stride_mn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RETURN_MASS: tl.constexpr,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    b64 = b.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    d_mask = offs_d < HEAD_DIM

    q_ptrs = (
        Q
        + b64 * stride_qb
        + offs_m[:, None].to(tl.int64) * stride_ql
        + h * stride_qh
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    ki_base = KI + b64 * stride_kib + kvh * stride_kih
    vi_base = VI + b64 * stride_vib + kvh * stride_vih

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- image keys, then this sample's packed question keys (varlen, possibly empty) ----
    # N >= 1, so every row's running max is finite after the image segment.
    m_i, l_i, acc = _attend_segment(
        q,
        m_i,
        l_i,
        acc,
        ki_base,
        vi_base,
        N,
        stride_kin,
        stride_kid,
        stride_vin,
        stride_vid,
        offs_n,
        offs_d,
        d_mask,
        qk_scale,
        UPCAST,
        F32,
    )
    t_start = tl.load(CU + b)
    t_len = tl.load(CU + b + 1) - t_start
    kt_base = KT + t_start.to(tl.int64) * stride_ktt + kvh * stride_kth
    vt_base = VT + t_start.to(tl.int64) * stride_vtt + kvh * stride_vth
    m_i, l_i, acc = _attend_segment(
        q,
        m_i,
        l_i,
        acc,
        kt_base,
        vt_base,
        t_len,
        stride_ktt,
        stride_ktd,
        stride_vtt,
        stride_vtd,
        offs_n,
        offs_d,
        d_mask,
        qk_scale,
        UPCAST,
        F32,
    )

    # ---- epilogue: out, lse (natural log) ----
    out = acc / l_i[:, None]
    o_ptrs = (
        O
        + b64 * stride_ob
        + offs_m[:, None].to(tl.int64) * stride_ol
        + h * stride_oh
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    lse2 = m_i + tl.math.log2(l_i)  # base-2 log-sum-exp of the scaled logits
    tl.store(
        LSE + b64 * stride_lb + h * stride_lh + offs_m * stride_ll,
        lse2 * 0.6931471805599453,
        mask=m_mask,
    )

    # ---- attention mass: P over image keys, recomputed from q.k and the final lse ----
    if RETURN_MASS:
        part = b64 * stride_mb + (h * tl.num_programs(0) + pid_m).to(tl.int64) * stride_mp
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            n_mask = cols < N
            k = tl.load(
                ki_base + cols[:, None].to(tl.int64) * stride_kin + offs_d[None, :] * stride_kid,
                mask=n_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = _dot(q, tl.trans(k), F32) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(m_mask[:, None] & n_mask[None, :], p, 0.0)
            tl.store(MASS + part + cols * stride_mn, tl.sum(p, 0), mask=n_mask)


def qc_attention_fwd(
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    cu_seqlens_txt: torch.Tensor,
    softmax_scale: float | None,
    return_mass: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fused forward. Returns (out (B, L, H, D) q.dtype, lse (B, H, L) fp32, mass (B, N) | None)."""
    B, L, H, D = q.shape
    N, Hkv = k_img.shape[1], k_img.shape[2]
    T = k_txt.shape[0]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    out = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    if B == 0 or L == 0 or H == 0:
        # Nothing to launch; the mass of an empty query set is a 0/0 mean (as the reference).
        mass = torch.full((B, N), float("nan"), dtype=torch.float32, device=q.device)
        return out, lse, (mass if return_mass else None)

    block_m, block_n, block_d, num_warps, num_stages = _fwd_config(L, D, q.element_size())
    num_m = triton.cdiv(L, block_m)
    if return_mass:
        partial = torch.empty((B, H * num_m, N), dtype=torch.float32, device=q.device)
    else:
        partial = lse  # dummy pointer, never touched (RETURN_MASS=False)
    if T == 0:
        # Empty question tensors: pass valid dummy pointers; the text loop runs 0 times.
        k_txt_arg, v_txt_arg = k_img, v_img
        kt_strides = vt_strides = (0, 0, 0)
    else:
        k_txt_arg, v_txt_arg = k_txt, v_txt
        kt_strides, vt_strides = k_txt.stride(), v_txt.stride()
    upcast = _interpreting(q) and q.dtype == torch.bfloat16
    f32_dot = upcast or q.dtype == torch.float32

    _qc_attn_fwd_kernel[(num_m, B * H)](
        q,
        k_img,
        v_img,
        k_txt_arg,
        v_txt_arg,
        cu_seqlens_txt,
        out,
        lse,
        partial,
        float(softmax_scale) * _LOG2E,
        L,
        N,
        H,
        H // Hkv,
        D,
        *q.stride(),
        *k_img.stride(),
        *v_img.stride(),
        *kt_strides,
        *vt_strides,
        *out.stride(),
        *lse.stride(),
        *partial.stride(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        RETURN_MASS=bool(return_mass),
        UPCAST=upcast,
        F32=f32_dot,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    mass = None
    if return_mass:
        mass = partial.sum(dim=1).div_(H * L)
    return out, lse, mass


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


def _bwd_config(D: int, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK, BLOCK_D, num_warps, num_stages) for the backward kernels (square tiles).

    The dk/dv kernel keeps k, v, dk, dv tiles live across its loops, so tiles are small;
    checked with ptxas for sm_80/sm_90 (no or negligible register spills).
    """
    block_d = max(16, triton.next_power_of_2(D))
    if elem_size >= 4:
        block, warps = (32, 8) if block_d <= 64 else (16, 8)
    else:
        block, warps = (32, 8) if block_d <= 128 else (16, 4)
    return block, block_d, warps, 2


@triton.jit
def _qc_attn_bwd_preprocess_kernel(
    Q,
    KI,
    O,
    DO,
    LSE,
    GM,
    DELTA,
    qk_scale,
    gm_scale,
    L,
    N,
    H,
    GROUP,
    HEAD_DIM,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kib,
    stride_kin,
    stride_kih,
    stride_kid,
    stride_ob,
    stride_ol,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_gb,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GM: tl.constexpr,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    """delta[b, h, l] = rowsum(dO * O) + sum_n P[l, n] * g_n over image keys, g = gm * gm_scale.

    The mass gradient adds g_n to dP on image columns, so softmax's backward needs
    delta = sum_j P_j dP_j = rowsum(dO * O) + sum_n P_n g_n, and dS = P * (dP - delta).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    md_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(
        O + b64 * stride_ob + rows * stride_ol + h * stride_oh + offs_d[None, :] * stride_od,
        mask=md_mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b64 * stride_dob + rows * stride_dol + h * stride_doh + offs_d[None, :] * stride_dod,
        mask=md_mask,
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GM:
        kvh = h // GROUP
        q = tl.load(
            Q + b64 * stride_qb + rows * stride_ql + h * stride_qh + offs_d[None, :] * stride_qd,
            mask=md_mask,
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        lse2 = (
            tl.load(LSE + b64 * stride_lb + h * stride_lh + offs_m * stride_ll, mask=m_mask)
            * 1.4426950408889634
        )
        offs_n = tl.arange(0, BLOCK_N)
        ki_base = KI + b64 * stride_kib + kvh * stride_kih
        for start_n in range(0, N, BLOCK_N):
            cols = start_n + offs_n
            n_mask = cols < N
            k = tl.load(
                ki_base + cols[:, None].to(tl.int64) * stride_kin + offs_d[None, :] * stride_kid,
                mask=n_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            g = tl.load(GM + b64 * stride_gb + cols * stride_gn, mask=n_mask, other=0.0)
            s = _dot(q, tl.trans(k), F32) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(n_mask[None, :], p, 0.0)
            delta += tl.sum(p * g[None, :], 1) * gm_scale
    tl.store(DELTA + (b * H + h).to(tl.int64) * L + offs_m, delta, mask=m_mask)


@triton.jit
def _dq_segment(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    n_keys,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_n,
    offs_d,
    d_mask,
    qk_scale,
    gm_row,
    stride_gn,
    gm_scale,
    HAS_GM: tl.constexpr,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    """dq += dS @ K over one key segment, P recomputed from the saved lse (base 2).

    With HAS_GM (image keys only) the mass gradient ``gm_row`` adds to dP before dS.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    for start_n in range(0, n_keys, BLOCK_N):
        rows = start_n + offs_n
        n_mask = rows < n_keys
        k, v = _load_kv_tile(
            k_base, v_base, rows, n_mask, offs_d, d_mask,
            stride_kn, stride_kd, stride_vn, stride_vd, UPCAST,
        )  # fmt: skip
        s = _dot(q, tl.trans(k), F32) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), F32)
        if HAS_GM:
            g = tl.load(gm_row + rows * stride_gn, mask=n_mask, other=0.0)
            dp += g[None, :] * gm_scale
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32)
    return dq


@triton.jit
def _qc_attn_bwd_dq_kernel(
    Q,
    KI,
    VI,
    KT,
    VT,
    CU,
    DO,
    LSE,
    DELTA,
    GM,
    DQ,
    qk_scale,
    sm_scale,
    gm_scale,
    L,
    N,
    H,
    GROUP,
    HEAD_DIM,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kib,
    stride_kin,
    stride_kih,
    stride_kid,
    stride_vib,
    stride_vin,
    stride_vih,
    stride_vid,
    stride_ktt,
    stride_kth,
    stride_ktd,
    stride_vtt,
    stride_vth,
    stride_vtd,
    stride_dob,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_gb,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_GM: tl.constexpr,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    """dq for one (b, h, query block): loops over the image keys, then the question keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < L
    d_mask = offs_d < HEAD_DIM
    md_mask = m_mask[:, None] & d_mask[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + rows * stride_ql + h * stride_qh + offs_d[None, :] * stride_qd,
        mask=md_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + rows * stride_dol + h * stride_doh + offs_d[None, :] * stride_dod,
        mask=md_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = (
        tl.load(LSE + b64 * stride_lb + h * stride_lh + offs_m * stride_ll, mask=m_mask, other=0.0)
        * 1.4426950408889634
    )
    delta = tl.load(DELTA + (b * H + h).to(tl.int64) * L + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    ki_base = KI + b64 * stride_kib + kvh * stride_kih
    vi_base = VI + b64 * stride_vib + kvh * stride_vih
    dq = _dq_segment(
        dq,
        q,
        do,
        lse2,
        delta,
        ki_base,
        vi_base,
        N,
        stride_kin,
        stride_kid,
        stride_vin,
        stride_vid,
        offs_n,
        offs_d,
        d_mask,
        qk_scale,
        GM + b64 * stride_gb,
        stride_gn,
        gm_scale,
        HAS_GM,
        UPCAST,
        F32,
    )
    t_start = tl.load(CU + b)
    t_len = tl.load(CU + b + 1) - t_start
    kt_base = KT + t_start.to(tl.int64) * stride_ktt + kvh * stride_kth
    vt_base = VT + t_start.to(tl.int64) * stride_vtt + kvh * stride_vth
    dq = _dq_segment(
        dq,
        q,
        do,
        lse2,
        delta,
        kt_base,
        vt_base,
        t_len,
        stride_ktt,
        stride_ktd,
        stride_vtt,
        stride_vtd,
        offs_n,
        offs_d,
        d_mask,
        qk_scale,
        GM,
        stride_gn,
        gm_scale,
        False,
        UPCAST,
        F32,
    )

    dq = dq * sm_scale
    tl.store(
        DQ + b64 * stride_qb + rows * stride_ql + h * stride_qh + offs_d[None, :] * stride_qd,
        dq.to(DQ.dtype.element_ty),
        mask=md_mask,
    )


@triton.jit
def _qc_attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    CU,
    DO,
    LSE,
    DELTA,
    GM,
    DK,
    DV,
    qk_scale,
    sm_scale,
    gm_scale,
    L,
    N,
    H,
    GROUP,
    HEAD_DIM,
    stride_qb,
    stride_ql,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_dol,
    stride_doh,
    stride_dod,
    stride_lb,
    stride_lh,
    stride_ll,
    stride_gb,
    stride_gn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_TXT: tl.constexpr,
    HAS_GM: tl.constexpr,
    UPCAST: tl.constexpr,
    F32: tl.constexpr,
):
    """dk/dv for one (b, KV head, key block) of the image keys (IS_TXT=False: K/V/DK/DV are
    (B, N, Hkv, D)) or of sample b's question keys (IS_TXT=True: packed (T, Hkv, D), stride_kb
    unused, rows cu[b]:cu[b+1]). Sums over the GQA group's heads and every query block in a
    fixed order, so the result is deterministic; dk, dv are written once."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    HKV = H // GROUP
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    b64 = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if IS_TXT:
        t_start = tl.load(CU + b)
        n_len = tl.load(CU + b + 1) - t_start
        k_base = K + t_start.to(tl.int64) * stride_kn + kvh * stride_kh
        v_base = V + t_start.to(tl.int64) * stride_vn + kvh * stride_vh
        dk_base = DK + t_start.to(tl.int64) * stride_kn + kvh * stride_kh
        dv_base = DV + t_start.to(tl.int64) * stride_vn + kvh * stride_vh
    else:
        n_len = N
        k_base = K + b64 * stride_kb + kvh * stride_kh
        v_base = V + b64 * stride_vb + kvh * stride_vh
        dk_base = DK + b64 * stride_kb + kvh * stride_kh
        dv_base = DV + b64 * stride_vb + kvh * stride_vh
    n_mask = offs_n < n_len
    nd_mask = n_mask[:, None] & d_mask[None, :]
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(k_base + rows_n * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
    v = tl.load(v_base + rows_n * stride_vn + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    g = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_GM:
        if not IS_TXT:
            g = tl.load(GM + b64 * stride_gb + offs_n * stride_gn, mask=n_mask, other=0.0)
            g = g * gm_scale
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # A question block past this sample's length has nothing to do (its stores are masked).
    m_end = tl.where(pid_n * BLOCK_N < n_len, L, 0)
    for hg in range(0, GROUP):
        h = kvh * GROUP + hg
        for start_m in range(0, m_end, BLOCK_M):
            rows_m = start_m + offs_m
            m_mask = rows_m < L
            md_mask = m_mask[:, None] & d_mask[None, :]
            q_off = b64 * stride_qb + rows_m[:, None].to(tl.int64) * stride_ql + h * stride_qh
            q = tl.load(Q + q_off + offs_d[None, :] * stride_qd, mask=md_mask, other=0.0)
            do_off = b64 * stride_dob + rows_m[:, None].to(tl.int64) * stride_dol + h * stride_doh
            do = tl.load(DO + do_off + offs_d[None, :] * stride_dod, mask=md_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            # rows past L get lse = +inf, hence P = 0
            lse2 = (
                tl.load(
                    LSE + b64 * stride_lb + h * stride_lh + rows_m * stride_ll,
                    mask=m_mask,
                    other=float("inf"),
                )
                * 1.4426950408889634
            )
            delta = tl.load(DELTA + (b * H + h).to(tl.int64) * L + rows_m, mask=m_mask, other=0.0)
            st = _dot(k, tl.trans(q), F32) * qk_scale  # (BLOCK_N, BLOCK_M)
            pt = tl.math.exp2(st - lse2[None, :])
            pt = tl.where(n_mask[:, None], pt, 0.0)
            dv += _dot(pt.to(do.dtype), do, F32)
            dpt = _dot(v, tl.trans(do), F32)
            if HAS_GM:
                if not IS_TXT:
                    dpt += g[:, None]
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, F32)
    dk = dk * sm_scale
    tl.store(
        dk_base + rows_n * stride_kn + offs_d[None, :] * stride_kd,
        dk.to(DK.dtype.element_ty),
        mask=nd_mask,
    )
    tl.store(
        dv_base + rows_n * stride_vn + offs_d[None, :] * stride_vd,
        dv.to(DV.dtype.element_ty),
        mask=nd_mask,
    )


def qc_attention_bwd(
    grad_out: torch.Tensor,
    grad_mass: torch.Tensor | None,
    q: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k_txt: torch.Tensor,
    v_txt: torch.Tensor,
    cu_seqlens_txt: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`qc_attention_fwd`: (dq, dk_img, dv_img, dk_txt, dv_txt), input dtype.

    ``grad_mass`` (B, N) float32 or None is the gradient w.r.t. the returned mass.
    """
    B, L, H, D = q.shape
    N, Hkv = k_img.shape[1], k_img.shape[2]
    T = k_txt.shape[0]
    group = H // Hkv
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    dev = q.device
    # No-ops for the contiguous tensors the caller passes; the gradients share these layouts.
    q, k_img, v_img, out = q.contiguous(), k_img.contiguous(), v_img.contiguous(), out.contiguous()
    k_txt, v_txt, grad_out = k_txt.contiguous(), v_txt.contiguous(), grad_out.contiguous()
    dq = torch.empty_like(q)
    dk_img = torch.empty_like(k_img)
    dv_img = torch.empty_like(v_img)
    dk_txt = torch.empty_like(k_txt)
    dv_txt = torch.empty_like(v_txt)
    if B == 0 or L == 0 or H == 0:
        # No queries: no gradient flows anywhere (the mass of an empty set is undefined).
        return dq.zero_(), dk_img.zero_(), dv_img.zero_(), dk_txt.zero_(), dv_txt.zero_()

    block, block_d, num_warps, num_stages = _bwd_config(D, q.element_size())
    upcast = _interpreting(q) and q.dtype == torch.bfloat16
    f32_dot = upcast or q.dtype == torch.float32
    qk_scale = float(softmax_scale) * _LOG2E
    gm_scale = 1.0 / (H * L)
    has_gm = grad_mass is not None
    gm = grad_mass.to(torch.float32).contiguous() if has_gm else lse  # dummy when absent
    gm_strides = gm.stride()[:2] if has_gm else (0, 0)
    if T == 0:
        kt_arg, vt_arg = k_img, v_img  # dummies, never read (all lengths are 0)
        kt_strides = vt_strides = (0, 0, 0)
    else:
        kt_arg, vt_arg = k_txt, v_txt
        kt_strides, vt_strides = k_txt.stride(), v_txt.stride()
    common = dict(UPCAST=upcast, F32=f32_dot, num_warps=num_warps, num_stages=num_stages)

    delta = torch.empty((B, H, L), dtype=torch.float32, device=dev)
    num_m = triton.cdiv(L, block)
    _qc_attn_bwd_preprocess_kernel[(num_m, B * H)](
        q,
        k_img,
        out,
        grad_out,
        lse,
        gm,
        delta,
        qk_scale,
        gm_scale,
        L,
        N,
        H,
        group,
        D,
        *q.stride(),
        *k_img.stride(),
        *out.stride(),
        *grad_out.stride(),
        *lse.stride(),
        *gm_strides,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=block_d,
        HAS_GM=has_gm,
        **common,
    )
    _qc_attn_bwd_dq_kernel[(num_m, B * H)](
        q,
        k_img,
        v_img,
        kt_arg,
        vt_arg,
        cu_seqlens_txt,
        grad_out,
        lse,
        delta,
        gm,
        dq,
        qk_scale,
        float(softmax_scale),
        gm_scale,
        L,
        N,
        H,
        group,
        D,
        *q.stride(),
        *k_img.stride(),
        *v_img.stride(),
        *kt_strides,
        *vt_strides,
        *grad_out.stride(),
        *lse.stride(),
        *gm_strides,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=block_d,
        HAS_GM=has_gm,
        **common,
    )
    segments = [(k_img, v_img, dk_img, dv_img, N, False)]
    if T > 0:
        segments.append((k_txt, v_txt, dk_txt, dv_txt, T, True))
    for k, v, dk, dv, rows, is_txt in segments:
        # image: (B, N, Hkv, D) strides; question: packed (T, Hkv, D) with a 0 batch stride.
        ks = (0, *k.stride()) if is_txt else k.stride()
        vs = (0, *v.stride()) if is_txt else v.stride()
        _qc_attn_bwd_dkdv_kernel[(triton.cdiv(rows, block), B * Hkv)](
            q,
            k,
            v,
            cu_seqlens_txt,
            grad_out,
            lse,
            delta,
            gm,
            dk,
            dv,
            qk_scale,
            float(softmax_scale),
            gm_scale,
            L,
            N,
            H,
            group,
            D,
            *q.stride(),
            *ks,
            *vs,
            *grad_out.stride(),
            *lse.stride(),
            *gm_strides,
            BLOCK_M=block,
            BLOCK_N=block,
            BLOCK_D=block_d,
            IS_TXT=is_txt,
            HAS_GM=has_gm,
            **common,
        )
    return dq, dk_img, dv_img, dk_txt, dv_txt
