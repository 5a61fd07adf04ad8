"""Encoder networks (no Pyro): images ``(B, C, H, W)`` -> features ``(B, out_features)``.

Guides put one linear head per sample site on top of the features; together with the paper's MLP below
that is exactly the paper's inference network (its last linear layer split by site).
"""

from __future__ import annotations

import torch
from torch import nn

from .decoders import make_activation

__all__ = ["MLPEncoder"]


class MLPEncoder(nn.Module):
    """The paper's inference network body: ``num_layers`` fully connected layers with an activation."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        *,
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if hidden_dim < 1 or num_layers < 1:
            raise ValueError(f"hidden_dim and num_layers must be >= 1, got {hidden_dim}, {num_layers}")
        channels, height, width = image_shape
        layers: list[nn.Module] = [nn.Linear(channels * height * width, hidden_dim)]
        layers.append(make_activation(activation))
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), make_activation(activation)]
        self.net = nn.Sequential(*layers)
        self.out_features = hidden_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(-3))
