"""Matplotlib figures of a trained spatial-VAE: training curves, latent manifold, reconstructions, pose.

Every ``*_figure`` function takes plain data (arrays, tensors, metric records) and returns a
:class:`matplotlib.figure.Figure` built without ``pyplot`` (no global figure state, no display backend
needed); save it with ``fig.savefig(path)``. The two helpers that touch a model, :func:`latent_grid` and
:func:`decode_manifold`, only compute the images to plot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .checkpoint import atomic_write

__all__ = [
    "tile_images",
    "latent_grid",
    "decode_manifold",
    "training_curves_figure",
    "manifold_figure",
    "reconstructions_figure",
    "theta_scatter_figure",
    "image_grid_figure",
    "traversal_latents",
    "traversal_animation",
]

_SPLIT_STYLE = {"train": {"color": "tab:blue"}, "test": {"color": "tab:orange"}}


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def tile_images(images: Any, columns: int, *, pad: int = 1) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` or ``(N, H, W)`` row-major into one picture.

    Returns ``(rows * (H + pad) - pad, columns * (W + pad) - pad)`` for one channel, or the same with a
    trailing channel axis for 3 or 4 channels (``imshow`` order). Empty cells and padding are NaN
    (grey scale) so they show as the axes background.
    """
    array = _numpy(images).astype(np.float32)
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W) or (N, H, W), got shape {array.shape}")
    count, channels, height, width = array.shape
    if channels not in (1, 3, 4):
        array, channels = array[:, :1], 1
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    canvas = np.full(
        (rows * (height + pad) - pad, columns * (width + pad) - pad, channels), np.nan, np.float32
    )
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = r * (height + pad), c * (width + pad)
        canvas[top : top + height, left : left + width] = array[index].transpose(1, 2, 0)
    return canvas[..., 0] if channels == 1 else canvas


def _show(ax, canvas: np.ndarray, *, vmin: float | None = None, vmax: float | None = None) -> None:
    if canvas.ndim == 3:  # colour: imshow wants values in [0, 1]
        low, high = np.nanmin(canvas), np.nanmax(canvas)
        canvas = np.nan_to_num((canvas - low) / max(high - low, 1e-12), nan=1.0)
        ax.imshow(canvas, interpolation="nearest")
    else:
        ax.imshow(canvas, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_facecolor("white")
    ax.set_xticks([])
    ax.set_yticks([])


def _range(*arrays: np.ndarray) -> tuple[float, float]:
    """Display range: ``[0, 1]`` for data inside it (Bernoulli means), else the data's own range."""
    low = min(float(np.nanmin(a)) for a in arrays)
    high = max(float(np.nanmax(a)) for a in arrays)
    if low >= 0.0 and high <= 1.0:
        return 0.0, 1.0
    return low, high


# --------------------------------------------------------------------------------------------------
# Computing what to plot from a model
# --------------------------------------------------------------------------------------------------
def _prior_quantiles(prior: torch.distributions.Distribution, probabilities: torch.Tensor) -> torch.Tensor:
    """Quantiles ``(steps, z_dim)`` of each coordinate of ``prior`` (standard normal if it has none)."""
    base = prior
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    columns = probabilities[:, None]
    try:
        return base.icdf(columns).to(probabilities.dtype)
    except (NotImplementedError, AttributeError):
        return torch.distributions.Normal(0.0, 1.0).icdf(columns).expand(-1, prior.event_shape[-1])


@torch.no_grad()
def latent_grid(model, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``steps x steps`` grid over the first two coordinates of the content ``z`` at the prior's quantiles.

    Returns ``(z, values)``: ``z`` ``(steps, steps, z_dim)`` on the model's device, row ``i`` varying
    ``z[1]`` from high to low (so it reads like a plot's y axis) and column ``j`` varying ``z[0]``; other
    coordinates sit at the prior's median. ``values`` ``(steps, 2)``: the ``z[0]`` and ``z[1]`` values used.
    """
    device = model.grid.device
    probabilities = (torch.arange(steps, device=device, dtype=torch.float32) + 0.5) / steps
    prior = model.z_prior()
    quantiles = _prior_quantiles(prior, probabilities)  # (steps, z_dim)
    median = _prior_quantiles(prior, torch.full((1,), 0.5, device=device))[0]  # (z_dim,)
    z = median.expand(steps, steps, -1).clone()
    z[:, :, 0] = quantiles[:, 0][None, :]
    if z.shape[-1] > 1:
        z[:, :, 1] = quantiles[:, 1].flip(0)[:, None]
    second = quantiles[:, 1] if z.shape[-1] > 1 else torch.zeros_like(quantiles[:, 0])
    return z, torch.stack([quantiles[:, 0], second], dim=-1)


@torch.no_grad()
def decode_manifold(
    model, steps: int = 10, *, scale: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(steps, steps, C, H, W)`` decoded over :func:`latent_grid` at ``theta = 0``, ``dx = 0``
    (and magnification ``scale`` for a model with a scale site, e.g. the median inferred one; default 1),
    and the grid's ``z`` values ``(steps, 2)``; both on the CPU."""
    z, values = latent_grid(model, steps)
    zeros = z.new_zeros(z.shape[:-1])
    theta = zeros if getattr(model, "rotate", False) else None
    dx = z.new_zeros((*z.shape[:-1], 2)) if getattr(model, "translate", False) else None
    magnification = None
    if scale is not None:
        if "scale" not in getattr(model, "latent_sites", {}):
            raise ValueError("scale applies to a model with a scale site (SpatialVAE(scale=True))")
        magnification = torch.as_tensor(scale, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
    was_training = model.training
    model.eval()
    try:
        images = model.decode(z, theta, dx, magnification)
    finally:
        model.train(was_training)
    return images.float().cpu(), values.float().cpu()


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
def training_curves_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """ELBO, reconstruction term and KL (nats per image) against epoch, one line per split.

    ``records``: the rows of ``History.records`` / ``metrics.csv`` (``epoch``, ``split``, ``elbo``,
    ``reconstruction``, ``kl``).
    """
    figure = Figure(figsize=(11, 3.2), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, key, title in zip(
        axes,
        ("elbo", "reconstruction", "kl"),
        ("ELBO per image", "reconstruction log-likelihood", "KL"),
        strict=True,
    ):
        for split, style in _SPLIT_STYLE.items():
            rows = [r for r in records if r.get("split") == split and r.get(key) not in (None, "")]
            if not rows:
                continue
            epochs = [int(r["epoch"]) for r in rows]
            values = [float(r[key]) for r in rows]
            ax.plot(epochs, values, marker="o" if len(rows) < 30 else None, ms=3, label=split, **style)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend()
    return figure


def manifold_figure(images: Any, values: Any | None = None, *, title: str | None = None) -> Figure:
    """The latent manifold: images ``(rows, cols, C, H, W)`` (e.g. from :func:`decode_manifold`) tiled,
    with the ``z`` values ``(steps, 2)`` of columns and rows on the axes when given."""
    array = _numpy(images)
    rows, columns = array.shape[:2]
    height, width = array.shape[-2:]
    flat = array.reshape(rows * columns, *array.shape[2:])
    canvas = tile_images(flat, columns, pad=0)
    figure = Figure(figsize=(6, 6), layout="constrained")
    ax = figure.subplots()
    _show(ax, canvas, **dict(zip(("vmin", "vmax"), _range(flat), strict=True)))
    if values is not None:
        values = _numpy(values)
        ax.set_xticks(np.arange(columns) * width + (width - 1) / 2)
        ax.set_xticklabels([f"{v:.1f}" for v in values[:, 0]], fontsize=7)
        ax.set_yticks(np.arange(rows) * height + (height - 1) / 2)
        ax.set_yticklabels([f"{v:.1f}" for v in values[::-1, 1]], fontsize=7)
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
    ax.set_title(title or r"latent manifold at $\theta = 0$, $\Delta x = 0$")
    return figure


def reconstructions_figure(
    inputs: Any,
    reconstructions: Any,
    aligned: Any | None = None,
    *,
    columns: int = 10,
) -> Figure:
    """Inputs ``(N, C, H, W)`` above their reconstructions ``(N, C, H, W)`` (and, when given, the
    content rendered at pose zero ``(N, C, H, W)``), one column per image."""
    rows = [("input", _numpy(inputs)), ("reconstruction", _numpy(reconstructions))]
    if aligned is not None:
        rows.append((r"content at $\theta=0$, $\Delta x=0$", _numpy(aligned)))
    count = min(columns, rows[0][1].shape[0])
    vmin, vmax = _range(*(array[:count] for _, array in rows))
    figure = Figure(figsize=(0.8 * count + 2.2, 0.85 * len(rows) + 0.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (label, array) in zip(axes, rows, strict=True):
        _show(ax, tile_images(array[:count], count), vmin=vmin, vmax=vmax)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    return figure


def theta_scatter_figure(inferred: Any, true: Any, *, circular_correlation: float | None = None) -> Figure:
    """Posterior-mean rotation against the true rotation, both in degrees wrapped to ``[-180, 180)``."""
    inferred_deg = np.degrees(np.angle(np.exp(1j * _numpy(inferred).astype(np.float64))))
    true_deg = np.degrees(np.angle(np.exp(1j * _numpy(true).astype(np.float64))))
    figure = Figure(figsize=(4.2, 4.2), layout="constrained")
    ax = figure.subplots()
    ax.scatter(true_deg, inferred_deg, s=4, alpha=0.5, color="tab:blue", linewidths=0)
    ax.plot([-180, 180], [-180, 180], color="0.5", lw=0.8, ls="--")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(range(-180, 181, 90))
    ax.set_yticks(range(-180, 181, 90))
    ax.set_aspect("equal")
    ax.set_xlabel(r"true $\theta$ (degrees)")
    ax.set_ylabel(r"inferred $\theta$ (degrees)")
    title = "rotation: inferred vs true"
    if circular_correlation is not None:
        title += f"\ncircular correlation {circular_correlation:.3f}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return figure


def image_grid_figure(images: Any, *, columns: int = 8, title: str | None = None) -> Figure:
    """Images ``(N, C, H, W)`` tiled ``columns`` to a row (e.g. samples from the model)."""
    array = _numpy(images)
    columns = max(1, min(columns, array.shape[0]))
    rows = math.ceil(array.shape[0] / columns)
    figure = Figure(figsize=(0.8 * columns + 0.4, 0.8 * rows + 0.6), layout="constrained")
    ax = figure.subplots()
    vmin, vmax = _range(array)
    _show(ax, tile_images(array, columns), vmin=vmin, vmax=vmax)
    if title:
        ax.set_title(title, fontsize=10)
    return figure


# --------------------------------------------------------------------------------------------------
# Traversal animation
# --------------------------------------------------------------------------------------------------
TRAVERSAL_PROBABILITIES = (0.025, 0.975)  # the traversal spans the central 95 % of its distribution


@torch.no_grad()
def traversal_latents(
    model, *, steps: int = 24, dim: int = 0, means: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(z, values, label)`` of a traversal: ``z`` ``(steps, z_dim)``, its coordinate ``(steps,)``.

    Without ``means`` (or with ``z_dim = 1``): coordinate ``dim`` of ``z`` runs over the prior's
    quantiles from 2.5 % to 97.5 %, the other coordinates at the prior's median. With posterior means
    ``(N, z_dim)`` and ``z_dim > 1``: ``z`` runs along the ``dim``-th principal axis of the means
    (sign chosen so the axis' largest component is positive), through their centre, from -1.96 to +1.96
    standard deviations of the means along that axis (the 2.5 % and 97.5 % quantiles of a normal fit),
    so the traversal follows the direction in which the data's content varies most.
    """
    if steps < 2:
        raise ValueError(f"a traversal needs at least 2 steps, got {steps}")
    z_dim = int(model.z_dim)
    device = model.grid.device
    if means is not None and z_dim > 1:
        points = torch.as_tensor(_numpy(means), dtype=torch.float32)
        if points.ndim != 2 or points.shape[1] != z_dim or points.shape[0] < 2:
            raise ValueError(f"means must be (N >= 2, {z_dim}), got shape {tuple(points.shape)}")
        if not 0 <= dim < z_dim:
            raise ValueError(f"dim must be in [0, {z_dim}), got {dim}")
        centre = points.mean(0)
        _, singular, vh = torch.linalg.svd(points - centre, full_matrices=False)
        axis = vh[dim]
        axis = axis * torch.sign(axis[axis.abs().argmax()])
        spread = float(singular[dim]) / math.sqrt(points.shape[0] - 1)
        normal = torch.distributions.Normal(0.0, 1.0)
        low, high = (float(normal.icdf(torch.tensor(p))) * spread for p in TRAVERSAL_PROBABILITIES)
        t = torch.linspace(low, high, steps)
        z = centre + t[:, None] * axis
        return z.to(device), t, f"posterior-mean PC {dim + 1}"
    if not 0 <= dim < z_dim:
        raise ValueError(f"dim must be in [0, {z_dim}), got {dim}")
    prior = model.z_prior()
    low, high = TRAVERSAL_PROBABILITIES
    probabilities = torch.linspace(low, high, steps, device=device)
    quantiles = _prior_quantiles(prior, probabilities)  # (steps, z_dim)
    median = _prior_quantiles(prior, torch.full((1,), 0.5, device=device))[0]
    z = median.expand(steps, z_dim).clone()
    z[:, dim] = quantiles[:, dim]
    return z, quantiles[:, dim].float().cpu(), f"$z_{{{dim + 1}}}$"


@torch.no_grad()
def traversal_animation(
    model,
    path: str | os.PathLike,
    *,
    steps: int = 24,
    dim: int = 0,
    means: Any | None = None,
    fps: int = 8,
    dpi: int = 80,
    latents: tuple[Any, Any, str] | None = None,
) -> Path:
    """Write an animated GIF decoding ``z`` along a traversal (:func:`traversal_latents`), one frame per
    step, at ``theta = 0``, ``dx = 0`` (and ``scale = 1``); returns ``path``. ``latents`` ``(z (steps,
    z_dim), values (steps,), label)`` gives the path instead (e.g. a trajectory of
    :func:`pyro_svae.analysis.pc_trajectory`); ``steps``, ``dim`` and ``means`` are then unused.

    Uses :class:`matplotlib.animation.FuncAnimation` with the Pillow writer; the file is written to a
    temporary name and moved into place. Every frame shares one grey (or colour) range, and its title
    gives the traversal coordinate, so the ``steps`` frames are all distinct.
    """
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if latents is None:
        z, values, label = traversal_latents(model, steps=steps, dim=dim, means=means)
    else:
        z, values, label = latents
        z = torch.as_tensor(_numpy(z), dtype=torch.float32).to(model.grid.device)
        values = torch.as_tensor(_numpy(values), dtype=torch.float32).reshape(-1)
    zeros = z.new_zeros(z.shape[:-1])
    theta = zeros if getattr(model, "rotate", False) else None
    dx = z.new_zeros((*z.shape[:-1], 2)) if getattr(model, "translate", False) else None
    scale = z.new_ones(z.shape[:-1]) if getattr(model, "scale", False) else None
    was_training = model.training
    model.eval()
    try:
        images = model.decode(z, theta, dx, scale) if scale is not None else model.decode(z, theta, dx)
    finally:
        model.train(was_training)
    frames = _numpy(images)  # (steps, C, H, W)
    vmin, vmax = _range(frames)
    figure = Figure(figsize=(3.0, 3.3))
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.02, 0.02, 0.96, 0.84))
    canvases = [tile_images(frame[None], 1) for frame in frames]
    _show(ax, canvases[0], vmin=vmin, vmax=vmax)
    image = ax.get_images()[0]
    if canvases[0].ndim == 3:  # colour: one normalization for all frames, as _show does for one
        low, high = float(np.nanmin(frames)), float(np.nanmax(frames))
        canvases = [np.nan_to_num((c - low) / max(high - low, 1e-12), nan=1.0) for c in canvases]
    title = figure.suptitle("", fontsize=9)

    def draw(index: int):
        image.set_data(canvases[index])
        title.set_text(f"{label} = {float(values[index]):+.2f}\n" r"$\theta = 0$, $\Delta x = 0$")
        return image, title

    animation = FuncAnimation(figure, draw, frames=len(canvases), blit=False, repeat=False)
    path = Path(path)
    save = lambda tmp: animation.save(tmp, writer=PillowWriter(fps=fps), dpi=dpi)  # noqa: E731
    atomic_write(path, save, suffix=".tmp.gif")  # Pillow picks the format by the extension
    return path
