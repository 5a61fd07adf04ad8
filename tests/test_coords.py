import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from pyro_svae.coords import (
    affine,
    pixel_grid,
    pose_coordinates,
    principal_pose,
    rotate,
    transform_images,
    wrap_angle,
)


def blobs(coords: torch.Tensor) -> torch.Tensor:
    """An asymmetric canonical image: a big blob right of centre and a small one above it."""
    x, y = coords[..., 0], coords[..., 1]
    big = torch.exp(-((x - 0.45) ** 2 + y**2) / 0.02)
    small = 0.6 * torch.exp(-((x - 0.1) ** 2 + (y - 0.4) ** 2) / 0.01)
    return big + small


def centre_of_mass(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    weights = image.reshape(-1)
    return (weights[:, None] * grid).sum(0) / weights.sum()


def test_grid_is_row_major_with_y_up():
    grid = pixel_grid(3, 4)
    assert grid.shape == (12, 2)
    assert grid[0].tolist() == [-1.0, 1.0]  # first pixel: top-left
    assert grid[3].tolist() == [1.0, 1.0]  # end of the first row: top-right
    assert grid[-1].tolist() == [1.0, -1.0]  # last pixel: bottom-right
    assert torch.allclose(grid.reshape(3, 4, 2)[:, 0, 1], torch.tensor([1.0, 0.0, -1.0]))


def test_positive_theta_turns_content_counter_clockwise():
    grid = pixel_grid(64)
    rendered = blobs(pose_coordinates(grid, torch.tensor(math.pi / 2)))
    # the big blob sat at (+0.45, 0): a quarter turn counter-clockwise puts it at (0, +0.45)
    peak = grid[rendered.argmax()]
    assert torch.allclose(peak, torch.tensor([0.0, 0.45]), atol=0.04)


def test_dx_moves_the_content():
    grid = pixel_grid(64)
    still = centre_of_mass(blobs(grid), grid)
    moved = centre_of_mass(blobs(pose_coordinates(grid, dx=torch.tensor([0.2, -0.1]))), grid)
    assert torch.allclose(moved - still, torch.tensor([0.2, -0.1]), atol=1e-3)


@pytest.mark.parametrize("degrees", [30.0, -75.0, 160.0])
def test_rendering_at_theta_matches_an_independent_resampler(degrees):
    size = 65  # odd: scipy rotates about the centre pixel, which is our grid's origin
    grid = pixel_grid(size)
    canonical = blobs(grid).reshape(size, size).numpy()
    rendered = blobs(pose_coordinates(grid, torch.tensor(math.radians(degrees)))).reshape(size, size)
    # scipy.ndimage.rotate turns an array counter-clockwise as displayed (row 0 on top)
    reference = ndimage.rotate(canonical, degrees, reshape=False, order=3, mode="constant")
    assert np.abs(rendered.numpy() - reference).max() < 0.02


def test_transform_images_matches_rendering_at_the_pose():
    size = 48
    grid = pixel_grid(size)
    canonical = blobs(grid).reshape(1, 1, size, size).repeat(2, 1, 1, 1)
    theta = torch.tensor([0.7, -2.0])
    dx = torch.tensor([[0.1, 0.05], [-0.08, 0.0]])
    posed = transform_images(canonical, theta, dx)
    expected = blobs(pose_coordinates(grid, theta, dx)).reshape(2, 1, size, size)
    assert (posed - expected).abs().max() < 0.05


def test_transforms_broadcast_over_leading_dimensions():
    grid = pixel_grid(5)
    theta = torch.zeros(3, 4)
    dx = torch.zeros(3, 4, 2)
    assert pose_coordinates(grid, theta, dx).shape == (3, 4, 25, 2)
    assert rotate(grid, torch.zeros(7)).shape == (7, 25, 2)


def test_affine_generalises_rotation_translation_and_scale():
    grid = pixel_grid(6)
    theta, dx, s = torch.tensor([0.4]), torch.tensor([[0.1, -0.2]]), torch.tensor([1.5])
    c, n = torch.cos(theta), torch.sin(theta)
    matrix = s[:, None, None] * torch.stack([torch.stack([c, -n], -1), torch.stack([n, c], -1)], -2)
    expected = pose_coordinates(grid, theta, dx, s)
    assert torch.allclose(affine(grid, matrix, dx), expected, atol=1e-6)


def test_wrap_angle():
    wrapped = wrap_angle(torch.tensor([math.pi, -math.pi, 3 * math.pi / 2, 0.1]))
    assert torch.allclose(wrapped, torch.tensor([-math.pi, -math.pi, -math.pi / 2, 0.1]))
    degrees = wrap_angle(torch.tensor([180.0, -180.0, 540.0, 359.5, -190.0]), period=360.0)
    assert degrees.tolist() == [-180.0, -180.0, -180.0, -0.5, 170.0]
    # just below -pi: the remainder rounds up to 2 pi, which would give +pi
    pi = torch.tensor(math.pi, dtype=torch.float64)
    below = torch.nextafter(-pi, -2 * pi)
    assert float(torch.remainder(below + math.pi, 2 * math.pi) - math.pi) == math.pi
    assert float(wrap_angle(below)) == -math.pi


def test_grid_follows_requested_device_and_dtype():
    grid = pixel_grid(4, device="cpu", dtype=torch.float64)
    assert grid.dtype == torch.float64 and grid.device.type == "cpu"


def ellipse(angle: float, centre: tuple[float, float], size: int = 32, pedestal: float = 0.0) -> torch.Tensor:
    """A Gaussian blob of axis ratio 0.4, long axis at ``angle``, around ``centre``: ``(1, 1, H, W)``."""
    grid = pixel_grid(size)
    turned = rotate(grid - torch.tensor(centre), torch.tensor(angle))  # coordinates along / across the axis
    light = torch.exp(-0.5 * ((turned[:, 0] / 0.25) ** 2 + (turned[:, 1] / 0.1) ** 2)) + pedestal
    return light.reshape(1, 1, size, size)


def angle_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference of axis angles modulo pi."""
    return (torch.remainder(a - b + math.pi / 2, math.pi) - math.pi / 2).abs()


@pytest.mark.parametrize("angle", [0.0, 0.4, 1.3, -1.0, 2.8])
def test_principal_pose_finds_the_long_axis_and_the_centre(angle):
    measured, centre = principal_pose(ellipse(angle, (0.2, -0.1), pedestal=0.3))  # a flat sky drops out
    assert angle_gap(measured, torch.tensor(angle)).item() < 1e-3
    assert torch.allclose(centre, torch.tensor([[0.2, -0.1]]), atol=1e-3)
    assert -math.pi / 2 <= measured.item() < math.pi / 2


def test_principal_pose_turns_with_the_image():
    images = torch.cat([ellipse(a, (0.1, 0.05)) for a in (0.3, -0.7, 2.0)])
    alpha = torch.tensor([0.5, 2.5, -1.2])
    before, centre = principal_pose(images)
    after, moved = principal_pose(transform_images(images, alpha))
    assert angle_gap(after, before + alpha).max().item() < math.radians(1)
    turned = rotate(centre[:, None], -alpha)[:, 0]  # R(alpha) centre
    assert torch.allclose(moved, turned, atol=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # measured in float32 under autocast too
        assert torch.equal(principal_pose(images)[0], before)
    # the adaptive passes give the same axis for a clean blob as the plain moments
    assert angle_gap(principal_pose(images, iterations=1)[0], before).max().item() < 1e-3


def test_principal_pose_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        principal_pose(torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="iterations"):
        principal_pose(torch.rand(1, 1, 8, 8), iterations=0)
    angle, centre = principal_pose(torch.zeros(2, 1, 8, 8))  # empty images: finite, not NaN
    assert torch.isfinite(angle).all() and torch.isfinite(centre).all()
