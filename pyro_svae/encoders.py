"""Encoder networks (no Pyro): images ``(B, C, H, W)`` -> features ``(B, out_features)``.

Guides put one linear head per sample site on top of the features; together with the paper's MLP below
that is exactly the paper's inference network (its last linear layer split by site).
"""

from __future__ import annotations

import torch
from torch import nn

from .decoders import make_activation
from .registry import register_encoder

__all__ = ["ENCODERS", "CNNEncoder", "MLPEncoder", "make_encoder"]


@register_encoder("mlp")
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


@register_encoder("cnn")
class CNNEncoder(nn.Module):
    """A small convolutional encoder: ``len(channels)`` blocks of ``3x3`` convolution (stride 2) and an
    activation, then a fully connected layer to ``hidden_dim`` features.

    Convolutions share weights across the image, so it needs far fewer parameters than the MLP for the
    same feature size and sees local structure (strokes, edges) directly; it is not rotation invariant.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        *,
        channels: tuple[int, ...] = (32, 64),
        hidden_dim: int = 128,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if hidden_dim < 1 or not channels or min(channels) < 1:
            raise ValueError(f"hidden_dim and channels must be >= 1, got {hidden_dim}, {channels}")
        in_channels, height, width = image_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
                make_activation(activation),
            ]
            in_channels = out_channels
            height, width = (height + 1) // 2, (width + 1) // 2
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(in_channels * height * width, hidden_dim), make_activation(activation)
        )
        self.out_features = hidden_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch_shape = images.shape[:-3]
        features = self.conv(images.reshape(-1, *images.shape[-3:]))
        return self.fc(features.flatten(1)).reshape(*batch_shape, self.out_features)


ENCODERS = {"mlp": MLPEncoder, "cnn": CNNEncoder}


def make_encoder(name: str, image_shape: tuple[int, int, int], **kwargs) -> nn.Module:
    """An encoder by name (``"mlp"`` or ``"cnn"``) with its keyword arguments."""
    try:
        return ENCODERS[name](image_shape, **kwargs)
    except KeyError:
        raise ValueError(f"unknown encoder '{name}'; expected one of {sorted(ENCODERS)}") from None
