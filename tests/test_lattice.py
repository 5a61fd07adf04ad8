import math

import pytest
import torch

from pyro_svae.coords import bin_centres, pixel_grid, pose_coordinates
from pyro_svae.lattice import FULL_RADIUS, LATTICE_RADIUS, RenderLattice, resolve_bin_render


def smooth(points: torch.Tensor) -> torch.Tensor:
    """A smooth two-channel function of the coordinates ``(..., 2)`` -> ``(..., 2)``."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack([torch.sin(3 * x) * torch.cos(2 * y), x * y + 0.5 * y], -1)


def test_lattice_reads_a_smooth_render_at_every_bin_and_shift_within_interpolation_error():
    lattice = RenderLattice(32, 32)
    weights = torch.arange(1.0, 6.0).view(5, 1, 1)  # five different renders
    values = smooth(lattice.points) * weights  # (5, N, 2)
    dx = 0.1 * torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    coords = pose_coordinates(pixel_grid(32), bin_centres(16).view(16, 1), dx)  # (16, 5, P, 2)
    read = lattice.sample(values, coords)
    assert read.shape == (16, 5, 32 * 32, 2)
    error = (read - smooth(coords) * weights).abs().max()
    assert error < 0.05  # bilinear at a spacing of 2/31: about h^2 / 8 times the curvature
    # a coarser lattice interpolates worse: the error is the interpolation's, not an offset or a flip
    coarse = RenderLattice(16, 16)
    coarse_coords = pose_coordinates(pixel_grid(16), bin_centres(16).view(16, 1), dx)
    coarse_error = (
        coarse.sample(smooth(coarse.points) * weights, coarse_coords) - smooth(coarse_coords) * weights
    )
    assert coarse_error.abs().max() > 2 * error


def test_quarter_turns_without_shift_land_on_lattice_points_and_read_exactly():
    lattice = RenderLattice(12, 12)
    values = smooth(lattice.points)
    coords = pose_coordinates(pixel_grid(12), bin_centres(4).view(4, 1), torch.zeros(1, 2))
    assert torch.allclose(lattice.sample(values, coords), smooth(coords), atol=1e-5)


def test_broadcasting_matches_reading_each_render_alone_and_gradients_reach_values_and_coords():
    lattice = RenderLattice(8, 10, radius=1.2)
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(3, lattice.num_points, 2, dtype=torch.float64, generator=generator)
    coords = (torch.rand(4, 3, 7, 2, dtype=torch.float64, generator=generator) - 0.5) * 2
    values.requires_grad_(True)
    coords.requires_grad_(True)
    read = lattice.sample(values, coords)
    one_by_one = torch.stack(
        [torch.stack([lattice.sample(values[b], coords[k, b]) for b in range(3)]) for k in range(4)]
    )
    assert torch.allclose(read, one_by_one)
    assert lattice.sample(values[0], coords[0, 0]).shape == (7, 2)  # no batch dims at all
    torch.autograd.gradcheck(lambda v, c: lattice.sample(v, c), (values, coords[:1, :, :2]))


def test_coordinates_outside_the_disk_read_its_edge_and_bad_shapes_are_refused():
    lattice = RenderLattice(16, 16, radius=LATTICE_RADIUS)
    values = smooth(lattice.points)
    far = torch.tensor([[3.0, 0.0], [0.0, -5.0]])
    edge = torch.tensor([[LATTICE_RADIUS, 0.0], [0.0, -LATTICE_RADIUS]])
    assert torch.allclose(lattice.sample(values, far), lattice.sample(values, edge))
    assert (
        lattice.num_points
        < 1.25 * 16 * 16
        < 2 * 16 * 16
        < RenderLattice(16, 16, radius=FULL_RADIUS).num_points
    )
    with pytest.raises(ValueError, match=r"expected values \(\.\.\., \d+, C\)"):
        lattice.sample(values[:-1], far)
    with pytest.raises(ValueError, match="at least 2x2"):
        RenderLattice(1, 16)
    with pytest.raises(ValueError, match="radius must be > 0"):
        RenderLattice(16, 16, radius=-1.0)
    assert resolve_bin_render(None, True) == "lattice" and resolve_bin_render(None, False) == "exact"
    assert resolve_bin_render("exact", True) == "exact"
    assert math.isclose(FULL_RADIUS, math.sqrt(2) + 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_lattice_reads_on_the_device_of_its_values():
    lattice = RenderLattice(12, 12)
    values = smooth(lattice.points)
    coords = pose_coordinates(pixel_grid(12), bin_centres(8).view(8, 1), torch.zeros(2, 2))
    on_gpu = lattice.to("cuda").sample(values.cuda(), coords.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), RenderLattice(12, 12).sample(values, coords), atol=1e-5)
