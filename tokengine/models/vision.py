"""CLIP vision transformer, run up to LLaVA's feature layer.

Module names follow HF's ``CLIPVisionTransformer`` (with ``embeddings.`` and ``encoder.``
flattened away), so checkpoint loading is a prefix rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokengine.models.activations import activation
from tokengine.models.config import VisionConfig


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) -> (B, N, D), full (non-causal) self-attention."""
        B, N, D = x.shape
        q, k, v = (
            proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """CLIP ViT returning the hidden state LLaVA feeds its projector.

    Only the first ``feature_layer`` encoder layers exist: LLaVA reads ``hidden_states
    [feature_layer]`` (0 = embeddings after ``pre_layrnorm``), so later layers and
    ``post_layernorm`` would be computed for nothing.
    """

    def __init__(self, config: VisionConfig, feature_layer: int, select_strategy: str) -> None:
        super().__init__()
        self.config = config
        self.drop_cls = select_strategy == "default"
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, d, config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(feature_layer))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: (B, C, H, W) normalised, H = W = image_size.

        Returns (B, N, D): N = num_patches ("default", CLS dropped) or num_patches + 1
        ("full", CLS first), patches in row-major order.
        """
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (
            self.config.num_channels,
            size,
            size,
        ):
            raise ValueError(
                f"pixel_values must have shape (B, {self.config.num_channels}, {size}, {size}), "
                f"got {tuple(pixel_values.shape)}"
            )
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.drop_cls else x
