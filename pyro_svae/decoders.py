"""Generator networks (no Pyro): the spatial decoder and the vanilla decoder baseline."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import onednn_bf16_supported

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


def _posed_projection(
    weight: torch.Tensor,
    theta: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """The coordinate projection with the pose folded in: ``M = R(theta) W^T / s``, ``(..., 2, H)``.

    Rendering at coordinates ``u = ((x - dx) R(theta)) / s`` (see :mod:`pyro_svae.coords`), the first
    layer ``u W^T + b`` equals ``x M + (b - dx M)``: one small ``(2, H)`` matrix per image instead of a
    ``(P, 2)`` coordinate set per image, and no gradient through ``B P`` transformed coordinates.
    """
    projection = weight.t()
    if theta is not None:
        cos, sin = torch.cos(theta), torch.sin(theta)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        projection = rotation @ projection
    if scale is not None:
        projection = projection / scale[..., None, None]
    return projection


def _linear_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``tanh(x W^T + b)`` as one oneDNN primitive (the tanh applied as the product's post-op), opaque
    to the compiler, which has no lowering for it outside frozen inference graphs."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "tanh", [], "")


def _linear_tanh_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if hasattr(torch.library, "custom_op"):  # torch >= 2.4; older releases keep the compiler's own tanh
    _linear_tanh_op = torch.library.custom_op("pyro_svae::linear_tanh", mutates_args=())(_linear_tanh)
    _linear_tanh_op.register_fake(_linear_tanh_shape)
else:  # pragma: no cover - depends on the torch release
    _linear_tanh_op = None


class _LinearTanh(torch.autograd.Function):
    """``tanh(x W^T + b)`` with the oneDNN forward and the two products of the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = _linear_tanh_op(x, weight, bias)
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, out = ctx.saved_tensors
        grad = grad * (1 - out * out)
        rows = grad.reshape(-1, grad.shape[-1])
        return grad @ weight, rows.t() @ x.reshape(-1, x.shape[-1]), rows.sum(0)


def _fusable_tanh(
    device: torch.device, dtype: torch.dtype, activation: str, num_linears: int, bf16_primitives: bool
) -> bool:
    """Whether the hidden layers can run as oneDNN linear+tanh primitives: on the CPU, in float32, or in
    bf16 where oneDNN builds bf16 primitives (not on AVX2-only CPUs)."""
    supported = dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_primitives)
    return (
        activation == "tanh"
        and num_linears > 2
        and device.type == "cpu"
        and supported
        and torch.backends.mkldnn.is_available()
        and _linear_tanh_op is not None
    )


def _spatial_forward(
    grid: torch.Tensor,
    theta: torch.Tensor | None,
    dx: torch.Tensor | None,
    scale: torch.Tensor | None,
    latent: torch.Tensor | None,
    linears: list[tuple[torch.Tensor, torch.Tensor]],
    activation: str,
    fuse_tanh: bool = False,
    bf16_primitives: bool = False,
) -> torch.Tensor:
    """The spatial decoder as a pure function of its weights (what ``torch.compile`` traces): the posed
    coordinate projection of ``grid`` ``(P, 2)`` plus the broadcast latent projection, then the MLP tail.
    The small pose-times-weight products stay in the grid's dtype under autocast; the per-pixel
    products do not. ``fuse_tanh`` runs each hidden ``Linear`` and its tanh as one oneDNN primitive on
    the CPU (the compiled decoder's path: measured 2.5-5 % faster per paper-size bf16 step than the compiler's
    own tanh kernel; no faster uncompiled), in bf16 only with ``bf16_primitives`` (oneDNN builds bf16
    primitives on this CPU: :func:`~pyro_svae.runtime.onednn_bf16_supported`)."""
    act = _FUNCTIONAL[activation]
    weight, bias = linears[0]
    with torch.autocast(grid.device.type, enabled=False):
        dtype = grid.dtype
        projection = _posed_projection(weight.to(dtype), theta, scale)
        offset = bias.to(dtype)
        if dx is not None:
            offset = offset - (dx.unsqueeze(-2) @ projection).squeeze(-2)
        if latent is not None:
            offset = offset + latent.to(dtype)
    hidden = torch.matmul(grid, projection)
    # add the offset in the product's dtype: a float32 offset would promote the (..., P, H) activations
    # back to float32 under autocast (a full-size copy and a float32 tanh)
    hidden = hidden + offset.unsqueeze(-2).to(hidden.dtype)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
    if fuse_tanh and _fusable_tanh(hidden.device, dtype, activation, len(linears), bf16_primitives):
        out = act(hidden)
        for weight, bias in linears[1:-1]:
            out = _LinearTanh.apply(out.to(dtype), weight.to(dtype), bias.to(dtype))
        weight, bias = linears[-1]
        return F.linear(out, weight, bias)
    for weight, bias in linears[1:]:
        hidden = F.linear(act(hidden), weight, bias)
    return hidden


class SpatialDecoder(nn.Module):
    """The paper's spatial generator: pixel value parameters as a function of (coordinate, z).

    The first layer is ``coords @ W_c + z @ W_z + b``: a coordinate projection ``(..., P, H)`` plus a
    per-image latent projection broadcast over pixels, never a ``(B, P, 2 + z_dim)`` concatenation.
    ``forward(coords (..., P, D) or (P, D), z (..., z_dim)) -> (..., P, out_dim)`` evaluates at given
    coordinates; :meth:`render` evaluates a shared grid at a batch of poses with the pose folded into
    the first layer's weights (the same function, measured cheaper: see ``benchmarks/throughput.py``).

    ``coord_frequency`` multiplies the coordinate projection's initial weights (PyTorch's default draws
    them within ``±1/sqrt(coord_dim)``: features about as wide as the whole frame). Objects that fill a
    small part of the frame, such as galaxies in a cut-out, want finer features from the start (``10``
    for objects a tenth of the frame wide); with the default the decoder draws them in a frame magnified
    by a ``scale`` site, when the model has one.
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
        coord_frequency: float = 1.0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(hidden_dim, num_layers, out_dim)
        if not coord_frequency > 0:
            raise ValueError(f"coord_frequency must be positive, got {coord_frequency!r}")
        self.z_dim, self.out_dim, self.coord_dim = z_dim, out_dim, coord_dim
        self.activation = activation
        self.coord_linear = nn.Linear(coord_dim, hidden_dim)
        with torch.no_grad():
            self.coord_linear.weight.mul_(coord_frequency)
        self.latent_linear = nn.Linear(z_dim, hidden_dim, bias=False) if z_dim > 0 else None
        # the activation modules inside ``tail`` are not called (``_spatial_forward`` applies the activation
        # functionally); they keep the Linear layers' indices, so state dicts and checkpoints stay as before
        self.tail = mlp_tail(hidden_dim, num_layers, out_dim, activation)
        # compiled as a function of the weights, so that module attribute lookups (Pyro's param store
        # behind PyroModule) stay outside the traced graph
        # whether oneDNN builds bf16 primitives here, asked once outside the traced function
        fused = functools.partial(_spatial_forward, fuse_tanh=True, bf16_primitives=onednn_bf16_supported())
        self._forward_fn = torch.compile(fused, dynamic=None) if compile else _spatial_forward

    def _weights(self, z: torch.Tensor | None):
        latent = None
        if self.latent_linear is not None and z is not None:
            latent = self.latent_linear(z)
        linears = [(self.coord_linear.weight, self.coord_linear.bias)]
        linears += [(m.weight, m.bias) for m in self.tail if isinstance(m, nn.Linear)]
        return latent, linears

    def forward(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        latent, linears = self._weights(z)
        return self._forward_fn(coords, None, None, None, latent, linears, self.activation)

    def render(
        self,
        grid: torch.Tensor,
        z: torch.Tensor | None,
        theta: torch.Tensor | None = None,
        dx: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Outputs ``(..., P, out_dim)`` at ``grid`` ``(P, 2)`` posed by ``theta`` ``(...)``, ``dx``
        ``(..., 2)``, ``scale`` ``(...)`` (each optional): ``forward(pose_coordinates(grid, ...), z)``."""
        latent, linears = self._weights(z)
        return self._forward_fn(grid, theta, dx, scale, latent, linears, self.activation)


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
