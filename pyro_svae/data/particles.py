"""Cryo-EM particle stacks: RELION pose conventions (this part), readers, preprocessing and STAR export.

Pose conventions. An MRC image array ``a[row, col]`` is shown by RELION with columns as +x and rows as +y
(row 0 at the bottom); pyro_svae shows the same array with row 0 at the *top* (``y`` up, see
:mod:`pyro_svae.coords`). RELION's ``rlnAnglePsi = psi`` turns the content *clockwise* in its frame about
pixel ``(N/2, N/2)``; a vertical flip turns clockwise into counter-clockwise, so in pyro_svae's frame the
content turns counter-clockwise by ``theta = psi`` (radians). A positive origin ``(ox, oy)`` (pixels) moves
the content by ``(-ox, -oy)`` in RELION's frame, i.e. by ``(-ox, +oy)`` pixels in ours. The rotation centre
``c`` (pixel ``N/2``) is half a pixel off the grid centre ``(N - 1)/2`` of pyro_svae's grid, so the content
shift in grid units is ``dx = s + c - R(theta) c`` with ``s`` the converted origin shift.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["relion_to_pose", "pose_to_relion"]


def _grid_units_per_pixel(box_size: int) -> float:
    return 2.0 / (box_size - 1)


def _relion_centre(box_size: int) -> np.ndarray:
    """RELION's rotation centre (pixel ``N/2`` on both axes) in pyro_svae grid units ``(x, y)``."""
    offset = (box_size / 2 - (box_size - 1) / 2) * _grid_units_per_pixel(box_size)
    return np.array([offset, -offset])


def _rotate_points(points: np.ndarray, theta: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(theta), np.sin(theta)
    x, y = points[..., 0], points[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)


def relion_to_pose(
    psi_degrees, origin_x_pixels, origin_y_pixels, box_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION in-plane pose -> pyro_svae's ``theta`` ``(N,)`` radians and ``dx`` ``(N, 2)`` grid units."""
    if box_size < 2:
        raise ValueError(f"box_size must be >= 2, got {box_size}")
    psi = np.deg2rad(np.asarray(psi_degrees, dtype=np.float64).reshape(-1))
    origin = np.stack(
        [
            np.asarray(origin_x_pixels, np.float64).reshape(-1),
            np.asarray(origin_y_pixels, np.float64).reshape(-1),
        ],
        axis=-1,
    )
    unit = _grid_units_per_pixel(box_size)
    shift = np.stack([-origin[:, 0], origin[:, 1]], axis=-1) * unit
    centre = _relion_centre(box_size)
    dx = shift + centre - _rotate_points(np.broadcast_to(centre, shift.shape), psi)
    theta = np.angle(np.exp(1j * psi))  # wrapped to (-pi, pi]
    return torch.as_tensor(theta, dtype=torch.float32), torch.as_tensor(dx, dtype=torch.float32)


def pose_to_relion(theta, dx, box_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`relion_to_pose`: ``(psi_degrees, origin_x_pixels, origin_y_pixels)``, each (N,)."""
    theta = np.asarray(torch.as_tensor(theta).detach().cpu(), dtype=np.float64).reshape(-1)
    dx = np.asarray(torch.as_tensor(dx).detach().cpu(), dtype=np.float64).reshape(-1, 2)
    centre = _relion_centre(box_size)
    shift = dx - centre + _rotate_points(np.broadcast_to(centre, dx.shape), theta)
    unit = _grid_units_per_pixel(box_size)
    origin_x, origin_y = -shift[:, 0] / unit, shift[:, 1] / unit
    psi = np.rad2deg(theta) % 360.0
    return psi, origin_x, origin_y
