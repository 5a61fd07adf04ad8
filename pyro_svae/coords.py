"""Coordinate grids and pose transforms of them (no Pyro).

Conventions (pinned by ``tests/test_coords.py``):

* A grid of an ``H x W`` image is a ``(H * W, 2)`` tensor of ``(x, y)`` points in ``[-1, 1]``, in the
  row-major order of ``image.flatten()``: ``x`` grows to the right along a row, ``y`` points *up*, so the
  first row of the image is ``y = +1``.
* A pose ``(theta, dx, scale)`` is the transform applied to the *content*: the content is scaled by
  ``scale``, turned counter-clockwise by ``theta`` (radians) and its centre moved to ``dx`` (grid units,
  so ``dx = 0.1`` is 5 % of the image width).  Rendering evaluates the canonical image ``f`` at
  ``u = ((x - dx) @ R(theta)) / scale`` with ``R(theta) = [[cos, -sin], [sin, cos]]``, i.e. the paper's
  ``x R(theta) + dx`` written so that ``dx`` is the physical shift of the content.
* All functions broadcast over leading batch dimensions: angles ``(...)``, shifts ``(..., 2)`` and grids
  ``(P, 2)`` or ``(..., P, 2)`` give coordinates ``(..., P, 2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "pixel_grid",
    "rotate",
    "translate",
    "scale",
    "affine",
    "pose_coordinates",
    "transform_images",
    "principal_pose",
    "wrap_angle",
    "bin_centres",
]


def pixel_grid(
    height: int,
    width: int | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Centred pixel grid of an image, ``(height * width, 2)`` points ``(x, y)`` in ``[-1, 1]``, y up."""
    width = height if width is None else width
    if height < 1 or width < 1:
        raise ValueError(f"grid size must be positive, got {height}x{width}")
    dtype = dtype or torch.get_default_dtype()
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype) if width > 1 else None
    ys = torch.linspace(1.0, -1.0, height, device=device, dtype=dtype) if height > 1 else None
    if xs is None:
        xs = torch.zeros(1, device=device, dtype=dtype)
    if ys is None:
        ys = torch.zeros(1, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def rotate(coords: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Coordinates at which to evaluate the canonical image so that its content turns by ``theta``.

    ``coords`` ``(..., P, 2)``, ``theta`` ``(...)`` -> ``(..., P, 2)``; computes ``coords @ R(theta)``.
    """
    cos = torch.cos(theta)[..., None]
    sin = torch.sin(theta)[..., None]
    x, y = coords[..., 0], coords[..., 1]
    return torch.stack([x * cos + y * sin, y * cos - x * sin], dim=-1)


def translate(coords: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Coordinates that move the content by ``dx`` ``(..., 2)``: ``coords - dx`` ``(..., P, 2)``."""
    return coords - dx[..., None, :]


def scale(coords: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Coordinates that magnify the content by ``factor`` ``(...)``: ``coords / factor``."""
    return coords / factor[..., None, None]


def affine(coords: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """General map of the content ``v -> v @ matrix.T + offset``: ``(coords - offset) @ inv(matrix).T``.

    ``matrix`` ``(..., 2, 2)``, ``offset`` ``(..., 2)``; rotation, translation and scale are special cases.
    """
    inverse = torch.linalg.inv(matrix)
    return (coords - offset[..., None, :]) @ inverse.transpose(-1, -2)


def pose_coordinates(
    grid: torch.Tensor,
    theta: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    magnification: torch.Tensor | None = None,
) -> torch.Tensor:
    """Canonical-frame coordinates of ``grid`` ``(P, 2)`` for a batch of poses -> ``(..., P, 2)``.

    Composes translation, then rotation, then scale (each optional): ``((grid - dx) @ R(theta)) / s``.
    With no pose component at all the grid is returned unchanged ``(P, 2)``.
    """
    coords = grid
    if dx is not None:
        coords = translate(coords, dx)
    if theta is not None:
        coords = rotate(coords, theta)
    if magnification is not None:
        coords = scale(coords, magnification)
    return coords


def transform_images(
    images: torch.Tensor,
    theta: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    magnification: torch.Tensor | None = None,
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Pose a batch of images ``(B, C, H, W)`` by bilinear resampling with zero padding.

    Uses the same transform as the model (:func:`pose_coordinates`), so ``transform_images(x, theta, dx)``
    is what a decoder that renders ``x`` at pose zero renders at ``(theta, dx)``.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    grid = pixel_grid(height, width, device=images.device, dtype=images.dtype)
    zeros = images.new_zeros(batch)
    theta = zeros if theta is None else theta.to(images)
    coords = pose_coordinates(grid, theta, dx, magnification)  # (B, P, 2), y up
    coords = coords.expand(batch, -1, -1)
    # grid_sample wants (x, y) with y pointing down the rows, both in [-1, 1] (align_corners=True).
    sample_at = torch.stack([coords[..., 0], -coords[..., 1]], dim=-1).reshape(batch, height, width, 2)
    return F.grid_sample(images, sample_at, mode=mode, padding_mode="zeros", align_corners=True)


def principal_pose(images: torch.Tensor, *, iterations: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Orientation and centre of each image's light from its second moments: ``angle`` ``(B,)`` in
    ``[-pi/2, pi/2)`` (the major axis, counter-clockwise from ``x``; defined modulo ``pi``) and ``centre``
    ``(B, 2)`` (grid units), for images ``(B, C, H, W)`` (channels summed).

    The light is the image minus its median, clipped at zero (a flat sky pedestal drops out). The first
    pass weighs every pixel by its light; each further pass weighs the light by a Gaussian of twice the
    measured covariance around the measured centre (the adaptive moments of galaxy-shape measurement),
    which damps the noise of far-out pixels. Turning an image by ``alpha`` (:func:`transform_images`)
    turns ``angle`` by ``alpha`` and ``centre`` with it, up to resampling error; for round light the
    angle is noise.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with torch.autocast(images.device.type, enabled=False):  # poses stay float32 under autocast
        return _principal_pose(images.float(), iterations)


def _principal_pose(images: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, height, width = images.shape
    grid = pixel_grid(height, width, device=images.device, dtype=images.dtype)
    light = images.sum(1).flatten(1)
    light = (light - light.median(-1, keepdim=True).values).clamp(min=0)
    weight = torch.ones_like(light)
    eye = torch.eye(2, device=images.device, dtype=images.dtype)
    for step in range(iterations):
        weighted = light * weight
        total = weighted.sum(-1, keepdim=True)
        total = torch.where(total.abs() > 1e-12, total, torch.ones_like(total))
        centre = (weighted @ grid) / total
        offsets = grid - centre.unsqueeze(-2)  # (B, P, 2)
        covariance = torch.einsum("bp,bpi,bpj->bij", weighted, offsets, offsets) / total.unsqueeze(-1)
        if step + 1 < iterations:
            # a small floor keeps the window invertible for point-like or empty images
            window = torch.linalg.inv(2 * covariance + 1e-4 * eye)
            weight = torch.exp(-0.5 * torch.einsum("bpi,bij,bpj->bp", offsets, window, offsets))
    angle = 0.5 * torch.atan2(2 * covariance[:, 0, 1], covariance[:, 0, 0] - covariance[:, 1, 1])
    return angle, centre


def bin_centres(
    bins: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Centres ``2 pi k / K`` of K rotation bins wrapped to ``[-pi, pi)``, ``(K,)``; bin 0 is upright."""
    angles = torch.arange(bins, device=device, dtype=dtype or torch.get_default_dtype()) * (
        2 * math.pi / bins
    )
    return wrap_angle(angles)


def wrap_angle(theta: torch.Tensor, *, period: float = 2 * math.pi) -> torch.Tensor:
    """Angles wrapped into ``[-period / 2, period / 2)``, same shape: ``((theta + pi) mod 2 pi) - pi`` for
    radians, ``period=360.0`` for degrees."""
    half = period / 2
    wrapped = torch.remainder(theta + half, period) - half
    return torch.where(wrapped >= half, wrapped - period, wrapped)  # a remainder rounded up to the period
