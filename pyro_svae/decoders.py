"""Generator networks (no Pyro): the spatial decoder and the vanilla decoder baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATIONS", "make_activation", "mlp_tail", "SpatialDecoder", "VanillaDecoder"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation '{name}'; expected one of {sorted(ACTIVATIONS)}") from None


def mlp_tail(hidden_dim: int, num_layers: int, out_dim: int, activation: str) -> nn.Sequential:
    """Activation, ``num_layers - 1`` hidden ``Linear + activation`` blocks, and the output layer."""
    layers: list[nn.Module] = [make_activation(activation)]
    for _ in range(num_layers - 1):
        layers += [nn.Linear(hidden_dim, hidden_dim), make_activation(activation)]
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


def _check_sizes(hidden_dim: int, num_layers: int, out_dim: int) -> None:
    if hidden_dim < 1 or num_layers < 1 or out_dim < 1:
        raise ValueError(
            f"hidden_dim, num_layers and out_dim must be >= 1, got {hidden_dim}, {num_layers}, {out_dim}"
        )


_FUNCTIONAL = {"tanh": torch.tanh, "relu": F.relu, "leaky_relu": F.leaky_relu, "silu": F.silu}


def _spatial_forward(
    coords: torch.Tensor,
    latent: torch.Tensor | None,
    linears: list[tuple[torch.Tensor, torch.Tensor]],
    activation: str,
) -> torch.Tensor:
    """The spatial decoder as a pure function of its weights (what ``torch.compile`` traces): the
    coordinate projection ``linears[0]`` plus the broadcast latent projection, then the MLP tail."""
    act = _FUNCTIONAL[activation]
    weight, bias = linears[0]
    hidden = F.linear(coords, weight, bias)
    if latent is not None:
        hidden = hidden + latent.unsqueeze(-2)
    for weight, bias in linears[1:]:
        hidden = F.linear(act(hidden), weight, bias)
    return hidden


class SpatialDecoder(nn.Module):
    """The paper's spatial generator: pixel value parameters as a function of (coordinate, z).

    The first layer is ``coords @ W_c + z @ W_z + b``: a coordinate projection ``(..., P, H)`` plus a
    per-image latent projection broadcast over pixels, never a ``(B, P, 2 + z_dim)`` concatenation.
    ``forward(coords (..., P, D) or (P, D), z (..., z_dim)) -> (..., P, out_dim)``.
    """

    def __init__(
        self,
        z_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
        coord_dim: int = 2,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(hidden_dim, num_layers, out_dim)
        self.z_dim, self.out_dim, self.coord_dim = z_dim, out_dim, coord_dim
        self.activation = activation
        self.coord_linear = nn.Linear(coord_dim, hidden_dim)
        self.latent_linear = nn.Linear(z_dim, hidden_dim, bias=False) if z_dim > 0 else None
        self.tail = mlp_tail(hidden_dim, num_layers, out_dim, activation)
        # compiled as a function of the weights, so that module attribute lookups (Pyro's param store
        # behind PyroModule) stay outside the traced graph
        self._forward_fn = torch.compile(_spatial_forward, dynamic=None) if compile else _spatial_forward

    def forward(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        latent = None
        if self.latent_linear is not None and z is not None:
            latent = self.latent_linear(z)
        linears = [(self.coord_linear.weight, self.coord_linear.bias)]
        linears += [(m.weight, m.bias) for m in self.tail if isinstance(m, nn.Linear)]
        return self._forward_fn(coords, latent, linears, self.activation)


class VanillaDecoder(nn.Module):
    """The vanilla VAE baseline: an MLP from ``z`` to every pixel at once.

    ``forward(z (..., z_dim)) -> (..., P, out_dim)`` with ``P = num_pixels``.
    """

    def __init__(
        self,
        z_dim: int,
        num_pixels: int,
        out_dim: int,
        *,
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        _check_sizes(hidden_dim, num_layers, out_dim)
        self.num_pixels, self.out_dim = num_pixels, out_dim
        self.latent_linear = nn.Linear(z_dim, hidden_dim)
        self.tail = mlp_tail(hidden_dim, num_layers, num_pixels * out_dim, activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = self.tail(self.latent_linear(z))
        return flat.unflatten(-1, (self.num_pixels, self.out_dim))
