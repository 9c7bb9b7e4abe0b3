"""Token reducers between the vision encoder and the projector: (B, N, Dv) -> (B, N_l, Dv).

``none`` keeps every token; ``pool-avg`` / ``pool-max`` pool the patch grid (training-free);
``pool-question`` keeps the N_l tokens the question attends to most (training-free);
``fusion`` / ``fusion-noq`` run N_l nested learned queries through a few blocks of
[self-attention -> question-conditioned cross-attention -> MLP], with or without the question.
With the question, its tokens are also keys/values of the queries' self-attention (as in
InstructBLIP's Q-Former): in the cross-attention alone they compete with 576 image keys in
one softmax and, at initialisation, reach the queries with ~1% of the attention mass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokengine.ops import QCCrossAttention, qc_cross_attention, token_pool
from tokengine.validation import pool_grid, pool_tokens

REDUCERS = ("none", "pool-avg", "pool-max", "pool-question", "fusion", "fusion-noq")
TRAINED = ("fusion", "fusion-noq")


@dataclass
class FusionConfig:
    """Shape of the fusion reducer (stored as ``reducer`` in tokengine's config.json)."""

    vision_dim: int  # width of the image tokens, in and out
    text_dim: int  # width of the LM's token embeddings (the question)
    num_queries: int = 576  # N_max: N_l uses the first N_l queries
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    # Learned position embeddings, initialised with sin/cos codes (0: none). The question's
    # tokens arrive as context-free word embeddings, so without them "is the red circle left of
    # the blue square?" and "is the blue circle left of the red square?" look the same to the
    # queries; image positions tell the queries where a token is without relying on the ViT
    # keeping it. Either kind is added to its tokens after a LayerNorm (see FusionReducer).
    question_positions: int = 0  # positions 0..n-1 of each question (later ones share n-1)
    image_positions: int = 0  # one per image token; must then equal the image's N
    # False: the output tokens are the queries' states, into which the blocks can write
    # anything, the answer to a one-word question included (the swap test in
    # docs/token_usage/ shows tokengine-tiny does). True: a last cross-attention over the
    # image alone, with no residual from the queries, reads each output token out of the
    # image: the queries choose where to look, but every token is a weighted mix of image
    # tokens (per head, then one linear map).
    select_image: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_positions(count: int, dim: int) -> torch.Tensor:
    """(count, dim) sin/cos position codes, each entry in [-1, 1].

    A square ``count`` is read as a row-major grid: the first half of the channels code the
    row, the second half the column. Otherwise the code is 1-D over 0..count-1. The periods
    run geometrically from 2 to twice the side, so the slowest wave still tells every position
    of a side apart. ``dim`` must be a multiple of 4 (2-D) or 2 (1-D).
    """
    side = math.isqrt(count)
    grid = side * side == count and count > 1
    axes = 2 if grid else 1
    if dim % (2 * axes):
        raise ValueError(f"dim must be a multiple of {2 * axes} for {count} positions, got {dim}")
    n = side if grid else count
    freqs = dim // (2 * axes)
    periods = 2.0 * n ** (torch.arange(freqs, dtype=torch.float64) / max(freqs - 1, 1))
    index = torch.arange(count)
    coords = [index // side, index % side] if grid else [index]
    parts = []
    for c in coords:
        angle = 2 * math.pi * c[:, None].double() / periods
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


class _QuestionLayout:
    """Where each packed question row (T rows, cu_seqlens (B+1,)) sits: its index within its
    question and its slot in a zero-padded (B, T_max) layout. Computed once per forward and
    shared by every block (finding T_max reads the lengths back from the device)."""

    def __init__(self, cu_seqlens: torch.Tensor, batch: int) -> None:
        segment = packed_segment_ids(cu_seqlens)
        rows = torch.arange(len(segment), device=cu_seqlens.device)
        self.position = rows - cu_seqlens.long()[segment]  # (T,)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        self.batch = batch
        self.t_max = max(int(lengths.max()), 1) if batch else 1
        self.slot = segment * self.t_max + self.position  # (T,) row in (B * T_max)
        slots = torch.arange(self.t_max, device=cu_seqlens.device)
        self.pad_mask = slots[None, :] >= lengths[:, None]  # (B, T_max), True at padding

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed rows (T, D) -> (B, T_max, D), zero at padding."""
        out = packed.new_zeros(self.batch * self.t_max, packed.shape[-1])
        return out.index_copy(0, self.slot, packed).view(self.batch, self.t_max, -1)


def packed_segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) the sample each packed row belongs to, for cu_seqlens (B+1,) int32."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


class _FusionBlock(nn.Module):
    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        d = cfg.vision_dim
        self.norm_self, self.norm_cross, self.norm_kv, self.norm_mlp = (
            nn.LayerNorm(d) for _ in range(4)
        )
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.cross_attn = QCCrossAttention(d, cfg.num_heads, cfg.num_kv_heads)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x, image, text, cu_seqlens, layout):
        h = self.norm_self(x)
        if text is None:
            x = x + self.self_attn(h, h, h, need_weights=False)[0]
        else:  # the queries also read the question here (as in InstructBLIP's Q-Former)
            kv = torch.cat([h, layout.pad(self.norm_self(text))], dim=1)
            keep_all = layout.pad_mask.new_zeros(layout.batch, h.shape[1])
            mask = torch.cat([keep_all, layout.pad_mask], dim=1)
            x = x + self.self_attn(h, kv, kv, key_padding_mask=mask, need_weights=False)[0]
        text = None if text is None else self.norm_kv(text)
        x = x + self.cross_attn(self.norm_cross(x), self.norm_kv(image), text, cu_seqlens)
        return x + self.mlp(self.norm_mlp(x))


class FusionReducer(nn.Module):
    """Nested learned queries that read the image tokens and (optionally) the question.

    One checkpoint serves every N_l <= N_max: training samples N_l, and N_l always uses the
    first N_l queries, so the first queries learn to carry the most information.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.config = cfg
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, cfg.vision_dim) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, cfg.vision_dim)
        self.question_pos = (
            nn.Parameter(sincos_positions(cfg.question_positions, cfg.vision_dim))
            if cfg.question_positions
            else None
        )
        self.image_pos = (
            nn.Parameter(sincos_positions(cfg.image_positions, cfg.vision_dim))
            if cfg.image_positions
            else None
        )
        self.blocks = nn.ModuleList(_FusionBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(cfg.vision_dim)
        if cfg.select_image:  # made last, so the other weights get the same random init
            self.norm_select = nn.LayerNorm(cfg.vision_dim)
            self.select = QCCrossAttention(cfg.vision_dim, cfg.num_heads, cfg.num_kv_heads)

    def check_tokens(self, tokens: int) -> None:
        """``tokens`` must be one of the N_l this reducer's learned queries serve."""
        if not 1 <= tokens <= self.config.num_queries:
            raise ValueError(
                f"tokens must be in 1..{self.config.num_queries} (the fusion reducer's "
                f"learned queries), got {tokens}"
            )

    def forward(
        self,
        image: torch.Tensor,
        tokens: int,
        question: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image (B, N, Dv), question (T, text_dim) packed by cu_seqlens -> (B, tokens, Dv)."""
        self.check_tokens(tokens)
        if self.image_pos is not None:
            if image.shape[1] != self.image_pos.shape[0]:
                raise ValueError(
                    f"image must have {self.image_pos.shape[0]} tokens (the fusion reducer's "
                    f"image positions), got {image.shape[1]}"
                )
            # added to normalised tokens: a ViT's residual stream can be far larger (rms 13.6
            # in tokengine-tiny's); added raw, an earlier tokengine-tiny's zero-initialised
            # positions grew to about 1% of its tokens' norm in training and were lost
            image = _standardise(image) + self.image_pos
        x = self.queries[:tokens].unsqueeze(0).expand(image.shape[0], -1, -1)
        text = layout = None
        if question is not None:
            text = self.text_in(question)
            layout = _QuestionLayout(cu_seqlens, image.shape[0])
            if self.question_pos is not None:
                at = layout.position.clamp(max=self.question_pos.shape[0] - 1)
                text = _standardise(text) + self.question_pos[at]
        for block in self.blocks:
            x = block(x, image, text, cu_seqlens, layout)
        if self.config.select_image:
            x = self.select(self.norm_select(x), image)
        return self.norm_out(x)


@contextmanager
def recorded_attn_mass(attention: QCCrossAttention) -> Iterator[list[torch.Tensor]]:
    """Inside the ``with``, each call of ``attention`` also computes the attention mass each
    image token receives ((B, N), ``return_attn_mass``) and appends it, with its
    autograd graph, to the yielded list; the call still returns its output alone, so the
    module around it runs unchanged (and its state dict keeps its keys). For callers that do
    not ask for the mass themselves (a call that does gets its output alone here too)."""
    masses: list[torch.Tensor] = []

    def ask(module, args, kwargs):
        return args, {**kwargs, "return_attn_mass": True}

    def keep(module, args, kwargs, output):
        out, mass = output
        masses.append(mass)
        return out

    handles = [
        attention.register_forward_pre_hook(ask, with_kwargs=True),
        attention.register_forward_hook(keep, with_kwargs=True),
    ]
    try:
        yield masses
    finally:
        for handle in handles:
            handle.remove()


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """x normalised over its last dimension (mean 0, variance 1), no learned scale."""
    return F.layer_norm(x, x.shape[-1:])


def question_guided_scores(
    image_lm: torch.Tensor, question_lm: torch.Tensor, cu_seqlens: torch.Tensor, head_dim: int = 128
) -> torch.Tensor:
    """(B, N) attention mass the question's token embeddings give each image token.

    ``image_lm`` (B, N, Dlm) are the projected image tokens, ``question_lm`` (T, Dlm) the packed
    question embeddings. The embedding is split into heads of ``head_dim`` (<= 256, the ops'
    limit); each sample is one call since question lengths differ. A sample without a question
    gets uniform scores.
    """
    B, N, D = image_lm.shape
    heads = max(1, D // head_dim) if D % head_dim == 0 else 1
    if D // heads > 256:
        raise ValueError(f"the LM width {D} cannot be split into heads of <= 256")
    d = D // heads
    scores = image_lm.new_full((B, N), 1.0 / N, dtype=torch.float32)
    for b in range(B):
        s, e = int(cu_seqlens[b]), int(cu_seqlens[b + 1])
        if e == s:
            continue
        q = question_lm[s:e].reshape(1, e - s, heads, d)
        k = image_lm[b : b + 1].reshape(1, N, heads, d)
        scores[b] = qc_cross_attention(q, k, k, return_attn_mass=True)[1][0]
    return scores


def check_reduction(
    reducer: str,
    tokens: int,
    n: int,
    *,
    grid: tuple[int, int] | None = None,
    fusion: FusionReducer | None = None,
) -> None:
    """Raise the error :func:`reduce_tokens` would raise for reducing ``n`` image tokens (on
    ``grid``, square if None) to ``tokens`` with ``reducer``, without any tensor."""
    if reducer not in REDUCERS:
        raise ValueError(f"reducer must be one of {REDUCERS}, got {reducer!r}")
    if reducer == "none" and tokens != n:
        raise ValueError(f"reducer 'none' keeps all {n} tokens; got tokens={tokens}")
    if reducer in ("pool-avg", "pool-max", "pool-question"):
        mode = "topk" if reducer == "pool-question" else "avg"
        pool_tokens(tokens, pool_grid(grid, n), mode, n)
    if reducer in TRAINED:
        if fusion is None:
            raise ValueError(
                f"reducer {reducer!r} needs trained fusion weights; this model has none"
            )
        fusion.check_tokens(tokens)


def reduce_tokens(
    reducer: str,
    image: torch.Tensor,
    tokens: int,
    *,
    grid: tuple[int, int] | None = None,
    fusion: FusionReducer | None = None,
    question: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply ``reducer`` to image tokens (B, N, Dv) -> (B, tokens, Dv).

    ``question`` (T, Dlm) packed with ``cu_seqlens`` feeds ``fusion``; ``scores`` (B, N) feed
    ``pool-question`` (see :func:`question_guided_scores`), which keeps the top-scoring tokens
    in their original order (top-k, as training-free question-guided pruning does).
    """
    check_reduction(reducer, tokens, image.shape[1], grid=grid, fusion=fusion)
    if reducer == "none":
        return image
    if reducer in ("pool-avg", "pool-max"):
        return token_pool(image, tokens, grid=grid, mode=reducer.removeprefix("pool-"))
    if reducer == "pool-question":
        return token_pool(image, tokens, grid=grid, mode="topk", scores=scores)[0]
    if reducer == "fusion-noq":
        question = cu_seqlens = None
    return fusion(image, tokens, question, cu_seqlens)


__all__ = [
    "REDUCERS",
    "FusionConfig",
    "check_reduction",
    "FusionReducer",
    "question_guided_scores",
    "recorded_attn_mass",
    "reduce_tokens",
    "sincos_positions",
]
