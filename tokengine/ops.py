"""tokengine's public ops: token pooling and question-conditioned cross-attention.

Thin, validated functions over the backends of :mod:`tokengine.backends` (``reference``,
``triton``, ``cpp``, ``cuda``), their autograd Functions, and ``nn.Module`` layers. Shapes
follow FlashAttention: ``(batch, seqlen, heads, head_dim)``, int32 ``cu_seqlens`` (B+1,).
``backend=None`` picks the fastest usable backend (or ``$TOKENGINE_BACKEND``); a forced backend
that cannot run the inputs raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from tokengine import backends, reference
from tokengine import validation as check
from tokengine.backends import BackendUnavailableError
from tokengine.reference import pool_output_grid

__all__ = [
    "BackendUnavailableError",
    "QCCrossAttention",
    "TokenPool",
    "qc_cross_attention",
    "token_pool",
]


# ----------------------------------------------------------------------------- token_pool
def token_pool(
    x: torch.Tensor,
    tokens: int,
    *,
    grid: tuple[int, int] | None = None,
    mode: str = "avg",
    scores: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reduce vision tokens laid out on an (H, W) grid to N_l = ``tokens`` tokens.

    Args:
        x: (B, N, D) tokens in row-major grid order, N = H*W.
        tokens: N_l. For grid modes the output grid is (h, w), h the largest divisor of N_l
            with h <= sqrt(N_l) (256 -> 16x16, 128 -> 8x16); it must fit inside (H, W).
        grid: (H, W); defaults to the square grid.
        mode: ``"avg"`` / ``"max"`` (adaptive pooling, bins as ``adaptive_avg_pool2d``),
            ``"weighted"`` (per bin sum(s*x)/sum(s), plain average where sum(s) = 0) or
            ``"topk"`` (the N_l tokens with the largest scores, in ascending index order,
            ties to the lower index).
        scores: (B, N) >= 0, for ``"weighted"`` and ``"topk"`` only (values checked for
            NaN and sign on CPU tensors only: on a GPU that would synchronise).
        backend: force one backend; None chooses.

    Returns:
        (B, N_l, D) in x.dtype; for ``"topk"`` a pair (values (B, N_l, D), indices (B, N_l)
        int64). Differentiable in ``x`` (and in ``scores`` for ``"weighted"``).
    """
    check.tensor("x", x, 3, "(B, N, D)")
    B, N, D = x.shape
    if min(B, N, D) < 1:
        raise ValueError(f"x must have shape (B, N, D) with B, N, D >= 1, got {tuple(x.shape)}")
    check.positive_int("tokens", tokens)
    if mode not in check.POOL_MODES:
        raise ValueError(f"mode must be one of {check.POOL_MODES}, got {mode!r}")
    H, W = check.pool_grid(grid, N)
    check.pool_tokens(tokens, (H, W), mode, N)
    scores = check.pool_scores(scores, x, mode)

    name = backends.select(backend, x.device, x.dtype, "token_pool")
    if name == "reference":
        return reference.token_pool(x, tokens, grid=(H, W), mode=mode, scores=scores)
    impl = backends.implementation(name, "token_pool")
    x = x.contiguous()
    scores32 = None if scores is None else scores.to(torch.float32).contiguous()
    if mode == "topk":
        return _TopkPool.apply(x, scores32, tokens, impl)
    return _GridPool.apply(x, scores32, (H, W), pool_output_grid(tokens), mode, impl)


class _GridPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, grid, out_hw, mode: str, impl: ModuleType):
        ctx.save_for_backward(x, scores)
        ctx.grid, ctx.out_hw, ctx.mode, ctx.impl = grid, out_hw, mode, impl
        return impl.grid_pool_fwd(x, scores, *grid, *out_hw, mode)

    @staticmethod
    def backward(ctx, grad_out):
        x, scores = ctx.saved_tensors
        if ctx.mode == "max":  # no max backward kernel: differentiate the reference instead
            with torch.enable_grad():
                xr = x.detach().requires_grad_()
                out = reference.token_pool(
                    xr, ctx.out_hw[0] * ctx.out_hw[1], grid=ctx.grid, mode="max"
                )
                (grad_x,) = torch.autograd.grad(out, xr, grad_out)
            return grad_x, None, None, None, None, None
        grad_x, grad_scores = ctx.impl.grid_pool_bwd(
            grad_out.contiguous(), x, scores, *ctx.grid, *ctx.out_hw, ctx.mode
        )
        return grad_x, grad_scores, None, None, None, None


class _TopkPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scores, k: int, impl: ModuleType):
        values, indices = impl.topk_pool_fwd(x, scores, k)
        ctx.save_for_backward(indices)
        ctx.x_shape = x.shape
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_x = grad_values.new_zeros(ctx.x_shape)
        grad_x.scatter_add_(1, indices.unsqueeze(-1).expand_as(grad_values), grad_values)
        return grad_x, None, None, None


# --------------------------------------------------------------------- qc_cross_attention
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Question-conditioned cross-attention: queries attend to image + question keys at once.

    ``out = softmax(scale * q [k_img ; k_txt_b]^T) [v_img ; v_txt_b]`` per sample b, in one
    softmax and without materialising the concatenation. No causal mask.

    Args:
        q: (B, L, H, D) queries. D <= 256.
        k_img, v_img: (B, N, Hkv, D) image keys/values; H must be a multiple of Hkv
            (query head h reads KV head h // (H // Hkv)).
        k_txt, v_txt: (T, Hkv, D) question keys/values of all samples, packed.
        cu_seqlens_txt: (B+1,) int32 offsets into the packed rows: sample b owns rows
            cu[b]:cu[b+1]; a length of 0 means "no question". Required with k_txt/v_txt.
            Its values are checked on CPU tensors only: on a GPU that would synchronise.
        softmax_scale: logit scale; None means 1/sqrt(D).
        return_attn_mass: also return the attention probability each image key receives,
            averaged over heads and queries.
        backend: force one backend; None chooses.

    Returns:
        out (B, L, H, D) in q.dtype, or (out, mass (B, N) float32) with ``return_attn_mass``
        (float64 for float64 inputs). Differentiable in q and all keys/values.
    """
    check.tensor("q", q, 4, "(B, L, H, D)")
    B, L, H, D = q.shape
    if min(B, L, H, D) < 1 or D > check.MAX_HEAD_DIM:
        raise ValueError(
            f"q must have shape (B, L, H, D) with B, L, H >= 1 and 1 <= D <= "
            f"{check.MAX_HEAD_DIM}, got {tuple(q.shape)}"
        )
    check.tensor("k_img", k_img, 4, f"(B, N, Hkv, D) with B = {B}, D = {D}")
    N, Hkv = k_img.shape[1], k_img.shape[2]
    if k_img.shape[0] != B or k_img.shape[3] != D or N < 1 or Hkv < 1 or H % Hkv:
        raise ValueError(
            f"k_img must have shape (B, N, Hkv, D) with B = {B}, N >= 1, D = {D} "
            f"and Hkv dividing H = {H}, got {tuple(k_img.shape)}"
        )
    check.tensor("v_img", v_img, 4, f"{tuple(k_img.shape)}")
    if v_img.shape != k_img.shape:
        raise ValueError(
            f"v_img must have the shape of k_img {tuple(k_img.shape)}, got {tuple(v_img.shape)}"
        )
    names, tensors = ["q", "k_img", "v_img"], [q, k_img, v_img]
    given = [t is not None for t in (k_txt, v_txt, cu_seqlens_txt)]
    if any(given) and not all(given):
        raise ValueError("k_txt, v_txt and cu_seqlens_txt must be given together (or none)")
    if k_txt is not None:
        check.tensor("k_txt", k_txt, 3, f"(T, Hkv, D) = (T, {Hkv}, {D})")
        if tuple(k_txt.shape[1:]) != (Hkv, D):
            raise ValueError(
                f"k_txt must have shape (T, Hkv, D) = (T, {Hkv}, {D}), got {tuple(k_txt.shape)}"
            )
        check.tensor("v_txt", v_txt, 3, f"{tuple(k_txt.shape)}")
        if v_txt.shape != k_txt.shape:
            raise ValueError(
                f"v_txt must have the shape of k_txt {tuple(k_txt.shape)}, got {tuple(v_txt.shape)}"
            )
        names, tensors = names + ["k_txt", "v_txt"], tensors + [k_txt, v_txt]
    check.same("device", names, tensors)
    check.same("dtype", names, tensors)
    if k_txt is not None:
        check.cu_seqlens(cu_seqlens_txt, B, k_txt.shape[0], q.device)
    scale = check.softmax_scale(softmax_scale, D)

    name = backends.select(backend, q.device, q.dtype, "qc_attention")
    if name == "reference":
        return reference.qc_cross_attention(
            q,
            k_img,
            v_img,
            k_txt,
            v_txt,
            cu_seqlens_txt,
            softmax_scale=scale,
            return_attn_mass=return_attn_mass,
        )
    impl = backends.implementation(name, "qc_attention")
    if k_txt is None:  # kernels take "no question" as an empty packed segment
        k_txt = v_txt = q.new_empty((0, Hkv, D))
        cu_seqlens_txt = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    native_backward = name == "cpp" or (name == "triton" and hasattr(impl, "qc_attention_bwd"))
    out, mass = _QCAttention.apply(
        q.contiguous(),
        k_img.contiguous(),
        v_img.contiguous(),
        k_txt.contiguous(),
        v_txt.contiguous(),
        cu_seqlens_txt.contiguous(),
        scale,
        return_attn_mass,
        impl,
        native_backward,
    )
    return (out, mass) if return_attn_mass else out


class _QCAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_img, v_img, k_txt, v_txt, cu, scale, return_mass, impl, native_bwd):
        out, lse, mass = impl.qc_attention_fwd(
            q, k_img, v_img, k_txt, v_txt, cu, scale, return_mass
        )
        ctx.save_for_backward(q, k_img, v_img, k_txt, v_txt, cu, out, lse)
        ctx.scale, ctx.impl, ctx.native_bwd = scale, impl, native_bwd
        if mass is None:
            mass = q.new_zeros((0,), dtype=torch.float32)
            ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    def backward(ctx, grad_out, grad_mass):
        q, k_img, v_img, k_txt, v_txt, cu, out, lse = ctx.saved_tensors
        if grad_mass is not None and grad_mass.numel() == 0:
            grad_mass = None
        if ctx.native_bwd:
            grads = ctx.impl.qc_attention_bwd(
                grad_out.contiguous(),
                None if grad_mass is None else grad_mass.contiguous(),
                q,
                k_img,
                v_img,
                k_txt,
                v_txt,
                cu,
                out,
                lse,
                ctx.scale,
            )
        else:  # recompute through the reference (float32 inside) and differentiate it
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k_img, v_img, k_txt, v_txt)]
                out_r, mass_r = reference.qc_cross_attention(
                    *leaves, cu, softmax_scale=ctx.scale, return_attn_mass=True
                )
                outputs, cotangents = [out_r], [grad_out]
                if grad_mass is not None:
                    outputs, cotangents = [out_r, mass_r], [grad_out, grad_mass]
                grads = torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)
                grads = [
                    torch.zeros_like(t) if g is None else g
                    for g, t in zip(grads, leaves, strict=True)
                ]
        return (*grads, None, None, None, None, None)


# ------------------------------------------------------------------------------- modules
class TokenPool(nn.Module):
    """Layer form of :func:`token_pool`: (B, N, D) [+ scores (B, N)] -> (B, tokens, D)."""

    def __init__(
        self,
        tokens: int,
        mode: str = "avg",
        grid: tuple[int, int] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("tokens", tokens)
        if mode not in check.POOL_MODES:
            raise ValueError(f"mode must be one of {check.POOL_MODES}, got {mode!r}")
        self.tokens, self.mode, self.grid, self.backend = tokens, mode, grid, backend

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None):
        return token_pool(
            x, self.tokens, grid=self.grid, mode=self.mode, scores=scores, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, mode={self.mode!r}, grid={self.grid}"


class QCCrossAttention(nn.Module):
    """Multi-head question-conditioned cross-attention layer with projections (GQA/MQA).

    ``queries`` (B, L, dim) attend in one softmax to ``image`` tokens (B, N, kv_dim) and to the
    sample's question tokens, packed as ``text`` (T, kv_dim) with ``cu_seqlens_txt`` (B+1,)
    int32. Image and question tokens share the key/value projections.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        kv_dim: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        softmax_scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check.positive_int("dim", dim)
        check.positive_int("num_heads", num_heads)
        num_kv_heads = check.positive_int("num_kv_heads", num_kv_heads or num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(
                    f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim)"
                )
            head_dim = dim // num_heads
        kv_dim = kv_dim or dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.softmax_scale, self.backend = softmax_scale, backend
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def forward(
        self,
        queries: torch.Tensor,
        image: torch.Tensor,
        text: torch.Tensor | None = None,
        cu_seqlens_txt: torch.Tensor | None = None,
        *,
        return_attn_mass: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """queries (B, L, dim), image (B, N, kv_dim), text (T, kv_dim) -> (B, L, dim) [, mass]."""
        check.tensor("queries", queries, 3, "(B, L, dim)")
        check.tensor("image", image, 3, "(B, N, kv_dim)")
        if text is not None:
            check.tensor("text", text, 2, "(T, kv_dim)")
        B, L, _ = queries.shape
        Hkv, Dh = self.num_kv_heads, self.head_dim
        q = self.q_proj(queries).view(B, L, self.num_heads, Dh)
        k_img = self.k_proj(image).view(B, image.shape[1], Hkv, Dh)
        v_img = self.v_proj(image).view(B, image.shape[1], Hkv, Dh)
        k_txt = v_txt = None
        if text is not None:
            k_txt = self.k_proj(text).view(-1, Hkv, Dh)
            v_txt = self.v_proj(text).view(-1, Hkv, Dh)
        result = qc_cross_attention(
            q,
            k_img,
            v_img,
            k_txt,
            v_txt,
            cu_seqlens_txt,
            softmax_scale=self.softmax_scale,
            return_attn_mass=return_attn_mass,
            backend=self.backend,
        )
        out, mass = result if return_attn_mass else (result, None)
        out = self.o_proj(out.reshape(B, L, self.num_heads * Dh))
        return (out, mass) if return_attn_mass else out
