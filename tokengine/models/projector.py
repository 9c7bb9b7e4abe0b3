"""LLaVA's ``mlp2x_gelu`` projector from vision width to language-model width."""

from __future__ import annotations

import torch
from torch import nn

from tokengine.models.activations import activation


class Projector(nn.Module):
    """linear_1 -> activation -> linear_2 (HF ``LlavaMultiModalProjector``)."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n, Dv) -> (B, n, Dlm)."""
        return self.linear_2(self.act(self.linear_1(x)))
