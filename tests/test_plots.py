"""Figures: each function takes data and returns a matplotlib Figure that saves as PNG."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_svae import SpatialVAE, plots
from pyro_svae.checkpoint import current_umask


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


def test_tile_images_lays_images_out_row_major_with_nan_padding():
    images = np.arange(5, dtype=np.float32)[:, None, None, None] * np.ones((5, 1, 3, 4), np.float32)
    canvas = plots.tile_images(images, columns=2, pad=1)
    assert canvas.shape == (3 * 3 + 2, 2 * 4 + 1)
    assert canvas[0, 0] == 0 and canvas[0, 5] == 1 and canvas[4, 0] == 2 and canvas[8, 0] == 4
    assert np.isnan(canvas[3, 0])  # padding row
    assert np.isnan(canvas[8, 5])  # the empty sixth cell
    colour = plots.tile_images(np.zeros((2, 3, 4, 4)), columns=2)
    assert colour.shape == (4, 9, 3)
    with pytest.raises(ValueError, match="expected images"):
        plots.tile_images(np.zeros((4, 4)), columns=2)


def test_latent_grid_spans_the_prior_quantiles_of_the_first_two_dimensions():
    model = SpatialVAE((8, 8), 4, hidden_dim=8)
    z, values = plots.latent_grid(model, steps=5)
    assert z.shape == (5, 5, 4) and values.shape == (5, 2)
    expected = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(5) + 0.5) / 5)
    assert torch.allclose(z[0, :, 0], expected, atol=1e-5)  # columns: z[0] increasing
    assert torch.allclose(z[:, 0, 1], expected.flip(0), atol=1e-5)  # rows: z[1] from high to low
    assert torch.all(z[..., 2:] == 0)  # the other dimensions at the prior's median
    assert torch.allclose(z[2, 2, :2], torch.zeros(2), atol=1e-6)  # the centre is the prior's mode


def test_decode_manifold_renders_at_zero_pose():
    model = SpatialVAE((1, 6, 6), 2, hidden_dim=8)
    images, values = plots.decode_manifold(model, steps=3)
    assert images.shape == (3, 3, 1, 6, 6) and values.shape == (3, 2)
    z, _ = plots.latent_grid(model, steps=3)
    with torch.no_grad():
        direct = model.decode(z, torch.zeros(3, 3), torch.zeros(3, 3, 2))
    assert torch.allclose(images, direct)
    vanilla = SpatialVAE((6, 6), 1, vanilla=True, hidden_dim=8)
    images, _ = plots.decode_manifold(vanilla, steps=4)
    assert images.shape == (4, 4, 1, 6, 6)
    with pytest.raises(ValueError, match="scale site"):
        plots.decode_manifold(model, steps=2, scale=0.5)
    scaled = SpatialVAE((1, 6, 6), 2, hidden_dim=8, scale=True)
    images, _ = plots.decode_manifold(scaled, steps=3, scale=0.5)  # at a magnification, e.g. the median
    z, _ = plots.latent_grid(scaled, steps=3)
    with torch.no_grad():
        direct = scaled.decode(z, torch.zeros(3, 3), torch.zeros(3, 3, 2), torch.full((3, 3), 0.5))
    assert torch.allclose(images, direct)


def test_training_curves_have_one_line_per_split_and_quantity():
    records = []
    for epoch in (1, 2, 3):
        for split in ("train", "test"):
            elbo = -100.0 + epoch
            records.append(
                {"epoch": epoch, "split": split, "elbo": elbo, "reconstruction": elbo - 5, "kl": 5.0}
            )
    figure = plots.training_curves_figure(records)
    assert len(figure.axes) == 3
    for ax in figure.axes:
        assert len(ax.get_lines()) == 2
    elbo_line = figure.axes[0].get_lines()[0]
    assert list(elbo_line.get_xdata()) == [1, 2, 3] and elbo_line.get_ydata()[-1] == -97.0
    assert png_bytes(figure)[:4] == b"\x89PNG"


def test_manifold_reconstruction_and_grid_figures_save_as_png():
    rng = np.random.default_rng(0)
    manifold = plots.manifold_figure(rng.random((4, 4, 1, 6, 6)), np.zeros((4, 2)))
    assert png_bytes(manifold)[:4] == b"\x89PNG"
    inputs, recon = rng.random((7, 1, 6, 6)), rng.random((7, 1, 6, 6))
    two_rows = plots.reconstructions_figure(inputs, recon)
    three_rows = plots.reconstructions_figure(inputs, recon, aligned=recon, columns=5)
    assert len(two_rows.axes) == 2 and len(three_rows.axes) == 3
    assert three_rows.axes[0].get_images()[0].get_array().shape == (6, 5 * 7 - 1)
    grid = plots.image_grid_figure(torch.rand(10, 1, 6, 6), columns=4, title="samples")
    assert png_bytes(grid)[:4] == b"\x89PNG"


def test_theta_scatter_wraps_angles_to_degrees():
    truth = torch.tensor([0.0, math.pi / 2, 3 * math.pi / 2])
    figure = plots.theta_scatter_figure(truth + 2 * math.pi, truth, circular_correlation=0.99)
    points = figure.axes[0].collections[0].get_offsets()
    assert np.allclose(points[:, 0], [0.0, 90.0, -90.0], atol=1e-3)
    assert np.allclose(points[:, 1], points[:, 0], atol=1e-3)
    assert "0.990" in figure.axes[0].get_title()


# --------------------------------------------------------------------------------------------------
# traversal animation
# --------------------------------------------------------------------------------------------------
def test_traversal_of_one_dimension_spans_the_prior_central_95_percent():
    model = SpatialVAE((8, 8), 3, hidden_dim=8)
    z, values, _ = plots.traversal_latents(model, steps=5, dim=1)
    assert z.shape == (5, 3)
    expected = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.025, 0.975, 5))
    assert torch.allclose(z[:, 1], expected, atol=1e-5) and torch.allclose(values, expected, atol=1e-5)
    assert torch.all(z[:, [0, 2]] == 0)  # the other coordinates at the prior's median
    with pytest.raises(ValueError, match="dim must be in"):
        plots.traversal_latents(model, steps=5, dim=3)


def test_traversal_along_the_first_principal_axis_of_the_means():
    model = SpatialVAE((8, 8), 2, hidden_dim=8)
    generator = torch.Generator().manual_seed(0)
    t = torch.randn(400, generator=generator)
    direction = torch.tensor([0.6, -0.8])
    means = torch.tensor([1.0, 2.0]) + 3.0 * t[:, None] * direction + 0.05 * torch.randn(400, 2)
    z, values, label = plots.traversal_latents(model, steps=7, means=means)
    assert "PC 1" in label
    steps = z[1:] - z[:-1]
    assert torch.allclose(steps / steps.norm(dim=-1, keepdim=True), -direction.expand(6, 2), atol=0.02)
    assert torch.allclose(z[3], means.mean(0), atol=1e-4)  # symmetric about the centre
    assert abs(float(values[-1]) - 1.96 * 3.0) < 0.4  # +1.96 standard deviations along the axis


@pytest.mark.parametrize(("shape", "z_dim"), [((1, 10, 10), 1), ((3, 10, 10), 2)])
def test_traversal_animation_writes_a_gif_with_one_frame_per_step(tmp_path, shape, z_dim):
    from PIL import Image

    model = SpatialVAE(shape, z_dim, hidden_dim=8, scale=True)
    means = torch.randn(30, z_dim) if z_dim > 1 else None
    path = plots.traversal_animation(model, tmp_path / "figures" / "traversal.gif", steps=6, means=means)
    assert path == tmp_path / "figures" / "traversal.gif"
    assert [p.name for p in path.parent.iterdir()] == ["traversal.gif"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as a plain open() would make it
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == 6 and gif.is_animated
        gif.seek(5)
        assert gif.convert("L").getextrema()[1] > 0
