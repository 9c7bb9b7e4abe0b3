"""Llama decoder (RMSNorm, RoPE, SwiGLU, GQA) with a static, preallocated KV cache.

gpt-fast style: ``setup_cache`` allocates (B, Hkv, max_seq_len, head_dim) buffers once and
every forward writes its keys/values into the cache slots ``input_pos`` and attends over the
whole cache under a mask, so prefill and decode are the same code with fixed shapes. Module
names follow HF's ``LlamaModel`` so checkpoint loading is a prefix rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokengine.models.activations import activation
from tokengine.models.config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as HF does; one fused op in fp32.
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config: LMConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, with the config's RoPE scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, S) int64 -> cos, sin (B, 1, S, head_dim) in ``dtype`` (computed in fp32)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, hd): rotate the two halves of each head (HF's non-interleaved layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys and values, (B, Hkv, max_seq_len, head_dim), written by slot index."""

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        # Zeros, not empty: masked slots are still multiplied by 0 in attention, and NaN * 0 = NaN.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, S, hd) at slots input_pos (S,); return the full caches."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=bias)
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """x (B, S, D), cos/sin (B, 1, S, hd), input_pos (S,), mask (B, 1, S, max_seq_len).

        Keys and values of all S tokens go into the cache; with ``last_only`` only the last
        token attends, and the output is (B, 1, D).
        """
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        if last_only:
            x, cos, sin, mask, S = x[:, -1:], cos[:, :, -1:], sin[:, :, -1:], mask[:, :, -1:], 1
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)
        gqa = self.num_kv_heads != self.num_heads  # SDPA maps query heads onto KV groups
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        d, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = activation(config.hidden_act)
        self.gate_proj = nn.Linear(d, i, bias=bias)
        self.up_proj = nn.Linear(d, i, bias=bias)
        self.down_proj = nn.Linear(i, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, input_pos, mask, last_only: bool = False) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D), or (B, 1, D) for the last token with ``last_only``."""
        h = self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token embeddings, decoder layers, final norm and LM head (tied to the embeddings when
    ``config.tie_word_embeddings``, in which case there is no ``lm_head`` module)."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.max_seq_len = 0
        self.inv_freq: torch.Tensor | None = None

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate zeroed KV caches for ``batch_size`` sequences of ``max_seq_len`` slots.

        dtype and device default to the embedding weight's. A cache of the same shape, dtype
        and device is zeroed and kept (no reallocation, and a compiled decode step sees the
        same buffers); any other replaces it.
        """
        weight = self.embed_tokens.weight
        dtype = dtype or weight.dtype
        device = torch.device(device or weight.device)
        c = self.config
        shape = (batch_size, c.num_key_value_heads, max_seq_len, c.head_dim)
        caches = [layer.self_attn.kv_cache for layer in self.layers]
        if caches and all(
            x is not None
            and x.k.shape == shape
            and x.k.dtype == dtype
            and x.k.device.type == device.type
            and device.index in (None, x.k.device.index)
            for x in caches
        ):
            for x in caches:
                x.k.zero_()
                x.v.zero_()
            return
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(
                batch_size, max_seq_len, c.num_key_value_heads, c.head_dim, dtype, device
            )
        self.max_seq_len = max_seq_len
        # Computed here rather than in __init__ so that models built on the meta device
        # (checkpoint loading) get real frequencies.
        self.inv_freq = rope_inv_freq(c, device)

    @property
    def cache_batch_size(self) -> int:
        """Batch size of the allocated cache (0 when there is none)."""
        cache = self.layers[0].self_attn.kv_cache if len(self.layers) else None
        return 0 if cache is None else cache.k.shape[0]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, S) int64 -> (B, S, D)."""
        return self.embed_tokens(ids)

    def forward(
        self,
        embeds: torch.Tensor,
        input_pos: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run S new tokens per sequence through the decoder, writing them into the cache.

        Args:
            embeds: (B, S, D) input embeddings.
            input_pos: (S,) int64 cache slots the S tokens are written to (same for all rows).
            positions: (B, S) int64 RoPE positions (slot minus left padding for padded rows).
            key_mask: (B, max_seq_len) bool, True where a slot holds a real token, including
                the slots being written now. A token at slot t attends to the slots s <= t
                whose key_mask is True.
            last_only: compute logits for the last of the S tokens only (prefill).

        Returns:
            logits (B, S, V), or (B, 1, V) with ``last_only``, in the weights' dtype.
        """
        if self.inv_freq is None:
            raise RuntimeError("call setup_cache(batch_size, max_seq_len) before forward")
        B = embeds.shape[0]
        if B != self.cache_batch_size or key_mask.shape != (B, self.max_seq_len):
            raise ValueError(
                f"embeds batch {B} / key_mask {tuple(key_mask.shape)} do not match the cache "
                f"(batch {self.cache_batch_size}, max_seq_len {self.max_seq_len})"
            )
        slots = torch.arange(self.max_seq_len, device=embeds.device)
        causal = slots[None, :] <= input_pos[:, None]  # (S, L)
        mask = causal[None] & key_mask[:, None, :]  # (B, S, L)
        # A padding token attends to itself: its row stays finite (no all-masked softmax, which
        # would give NaN keys/values that leak into real rows as NaN * 0).
        mask = mask | (slots[None, :] == input_pos[:, None])[None]
        mask = mask[:, None]
        cos, sin = rope_cos_sin(self.inv_freq, positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            # Only the last token's output is needed from the last layer (its keys and values
            # are cached for all tokens): skip the other queries' attention and MLP there.
            x = layer(x, cos, sin, input_pos, mask, last_only and i == len(self.layers) - 1)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight)
        return self.lm_head(x)
