"""Render once, pose many times: a decoder's output on a fixed lattice, resampled at posed coordinates.

A pose search scores every image at K rotation bins. Rendering the decoder at the K posed grids costs K
decoder passes per image. :class:`RenderLattice` instead holds a square lattice at the image's pixel spacing
that covers every turn of the pixel grid (the disk of radius ``sqrt(2)`` plus a margin for shifts): the
decoder renders each image once on it, and each bin's image is read from that render by bilinear
interpolation at the bin's canonical coordinates. Only the interpolation is approximate; a point of the
pixel grid that lands on the lattice (bin 0 without shift, and the quarter turns) is read exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RenderLattice",
    "BIN_RENDERS",
    "FULL_RADIUS",
    "LATTICE_RADIUS",
    "lattice_radius",
    "resolve_bin_render",
]

#: how a model that sums over rotation bins renders them: ``"exact"``, the decoder at every bin's posed
#: grid (K passes); ``"lattice"``, one pass on a :class:`RenderLattice` over the disk of radius
#: :data:`LATTICE_RADIUS` read at each bin (a round field of view: a turned image's corners continue its
#: rim); ``"lattice_full"``, the same over the disk that holds every turn of the square (about 2.4 passes)
BIN_RENDERS = ("exact", "lattice", "lattice_full")
#: the field of view of ``bin_render="lattice"``, in grid units (the image spans [-1, 1])
LATTICE_RADIUS = 1.1
#: the radius that holds every turn of the pixel grid (``sqrt(2)``) shifted by up to 0.3 grid units
FULL_RADIUS = math.sqrt(2.0) + 0.3


def resolve_bin_render(bin_render: str | None, enumerate_bins: bool) -> str:
    """``bin_render`` with its default resolved: ``"lattice"`` for a model that sums over its bins,
    ``"exact"`` otherwise."""
    if bin_render is None:
        return "lattice" if enumerate_bins else "exact"
    return bin_render


def lattice_radius(bin_render: str) -> float | None:
    """The lattice radius of a ``bin_render`` (``None`` for ``"exact"``)."""
    return {"lattice": LATTICE_RADIUS, "lattice_full": FULL_RADIUS}.get(bin_render)


def _spacing(size: int) -> float:
    """Distance between neighbouring pixel centres of :func:`~pyro_svae.coords.pixel_grid` (``[-1, 1]``)."""
    return 2.0 / (size - 1) if size > 1 else 2.0


class RenderLattice(nn.Module):
    """A lattice at the pixel spacing of an ``height x width`` image grid, covering the disk of ``radius``
    (grid units; the default, ``sqrt(2) + 0.3``, holds every turn of the grid shifted by up to 0.3).

    :attr:`points` ``(N, 2)``: the lattice points a decoder renders (those inside the disk, with one
    spacing to spare for the interpolation); :meth:`sample` reads values given at those points at any
    coordinates. Coordinates farther out than the disk are pulled onto its edge: with a ``radius`` of 1
    plus a margin, the corners of a turned image (a tenth of its pixels at radius 1.1) continue its rim.
    """

    def __init__(self, height: int, width: int, *, radius: float = FULL_RADIUS) -> None:
        super().__init__()
        if height < 2 or width < 2:
            raise ValueError(f"a render lattice needs an image of at least 2x2 pixels, got {height}x{width}")
        if not radius > 0:
            raise ValueError(f"radius must be > 0 (grid units), got {radius!r}")
        step_x, step_y = _spacing(width), _spacing(height)
        self.radius = float(radius)
        pad_x = max(math.ceil((self.radius - 1.0) / step_x), 0) + 1
        pad_y = max(math.ceil((self.radius - 1.0) / step_y), 0) + 1
        self.shape = (height + 2 * pad_y, width + 2 * pad_x)
        self.half_extent = (1.0 + pad_x * step_x, 1.0 + pad_y * step_y)
        xs = torch.arange(self.shape[1], dtype=torch.float64) * step_x - self.half_extent[0]
        ys = self.half_extent[1] - torch.arange(self.shape[0], dtype=torch.float64) * step_y  # y up
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        lattice = torch.stack([x.reshape(-1), y.reshape(-1)], -1)
        reach = self.radius + math.hypot(step_x, step_y)  # the corners of a cell at the disk's edge
        inside = lattice.square().sum(-1) <= reach**2
        dtype = torch.get_default_dtype()
        self.register_buffer("points", lattice[inside].to(dtype), persistent=False)
        self.register_buffer("index", inside.nonzero().squeeze(-1), persistent=False)

    @property
    def num_points(self) -> int:
        """How many points the decoder renders per image."""
        return int(self.index.numel())

    def sample(self, values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``values`` ``(..., N, C)`` at :attr:`points` read at ``coords`` ``(..., P, 2)``: ``(..., P, C)``.

        The batch shapes broadcast; where ``coords`` has more batch entries than ``values`` (K bins of one
        render), each render is read at all of them without being copied.
        """
        if values.shape[-2] != self.num_points or coords.shape[-1] != 2:
            raise ValueError(
                f"expected values (..., {self.num_points}, C) and coords (..., P, 2), "
                f"got {tuple(values.shape)} and {tuple(coords.shape)}"
            )
        batch = torch.broadcast_shapes(values.shape[:-2], coords.shape[:-2])
        dims = len(batch)
        values = values.reshape((1,) * (dims - values.dim() + 2) + values.shape)
        spread = [i for i in range(dims) if values.shape[i] == 1 and batch[i] > 1]
        kept = [i for i in range(dims) if i not in spread]
        kept_shape = [batch[i] for i in kept]
        spread_shape = [batch[i] for i in spread]
        channels, pixels = values.shape[-1], coords.shape[-2]
        flat = values.squeeze(spread).reshape(-1, self.num_points, channels).to(coords.dtype)
        renders = flat.new_zeros(flat.shape[0], self.shape[0] * self.shape[1], channels)
        renders = renders.index_copy(1, self.index, flat)
        renders = renders.unflatten(1, self.shape).permute(0, 3, 1, 2)  # (N, C, rows, columns)
        coords = coords.expand(*batch, pixels, 2).permute(*kept, *spread, dims, dims + 1)
        coords = coords.reshape(flat.shape[0], -1, pixels, 2)
        norm = coords.norm(dim=-1, keepdim=True)
        coords = coords * (self.radius / norm.clamp_min(self.radius))  # onto the disk's edge
        scale = coords.new_tensor([1.0 / self.half_extent[0], -1.0 / self.half_extent[1]])
        read = F.grid_sample(renders, coords * scale, mode="bilinear", align_corners=True)
        read = read.permute(0, 2, 3, 1).reshape(*kept_shape, *spread_shape, pixels, channels)
        order = kept + spread
        return read.permute(*[order.index(i) for i in range(dims)], dims, dims + 1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, points={self.num_points}, radius={self.radius:.3f}"
