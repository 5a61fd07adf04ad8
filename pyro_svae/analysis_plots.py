"""Figures of a latent analysis (:mod:`pyro_svae.analysis`): matplotlib ``Figure`` objects, no pyplot
state; the caller saves them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .plots import _numpy, _range, _show, tile_images

__all__ = ["embedding_figure", "clusters_figure", "cluster_montage_figure", "trajectory_figure"]


def _xy(points: Any) -> np.ndarray:
    array = _numpy(points).astype(np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[1] == 1:  # one dimension: spread along x, zero on y
        array = np.column_stack([array[:, 0], np.zeros(len(array))])
    return array[:, :2]


def embedding_figure(
    points: Any,
    values: Any | None = None,
    *,
    title: str = "",
    axis_label: str = "PC",
    colour_label: str = "",
    categorical: bool = False,
) -> Figure:
    """Scatter of 2-D points ``(N, 2)`` (``(N, 1)`` along x) coloured by ``values`` ``(N,)``: a colour bar
    for continuous values, a legend for categorical ones (at most 20 classes shown by name)."""
    xy = _xy(points)
    figure = Figure(figsize=(4.6, 3.8), layout="constrained")
    ax = figure.subplots()
    size = max(1.0, min(12.0, 3000.0 / len(xy)))
    if values is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="tab:blue", alpha=0.6, linewidths=0)
    elif categorical:
        values = np.asarray(_numpy(values)).reshape(-1)
        classes = np.unique(values)
        colours = _categorical_colours(len(classes))
        for index, value in enumerate(classes):
            mask = values == value
            label = str(value) if len(classes) <= 20 else None
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colours[index], label=label, linewidths=0)
        if len(classes) <= 20:
            ax.legend(title=colour_label or None, fontsize=7, markerscale=max(1.0, 6.0 / size), loc="best")
    else:
        values = np.asarray(_numpy(values), dtype=np.float64).reshape(-1)
        order = np.argsort(values, kind="stable")  # dense points on top
        artist = ax.scatter(xy[order, 0], xy[order, 1], s=size, c=values[order], cmap="viridis", linewidths=0)
        figure.colorbar(artist, ax=ax, label=colour_label)
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2" if _numpy(points).ndim == 2 and _numpy(points).shape[1] > 1 else "")
    if title:
        ax.set_title(title, fontsize=10)
    return figure


def _categorical_colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def clusters_figure(points: Any, labels: Any, *, title: str = "", axis_label: str = "PC") -> Figure:
    """Scatter of 2-D points coloured by k-means cluster, each cluster's number at its median point."""
    xy = _xy(points)
    labels = np.asarray(labels).reshape(-1)
    figure = embedding_figure(
        xy, labels, title=title, axis_label=axis_label, colour_label="cluster", categorical=True
    )
    ax = figure.axes[0]
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()
    for k in np.unique(labels):
        x, y = np.median(xy[labels == k], axis=0)
        ax.annotate(
            str(int(k)),
            (x, y),
            ha="center",
            va="center",
            fontsize=8,
            weight="bold",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.8, "lw": 0},
        )
    return figure


def cluster_montage_figure(
    centres: Any, members: Sequence[Any], *, sizes: Sequence[int] | None = None, columns: int = 8
) -> Figure:
    """One row per cluster: its centre decoded upright (first column, framed) then up to ``columns``
    member particles ``members[k]`` ``(m, C, H, W)`` as they were given (not aligned)."""
    centres = _numpy(centres)
    k = centres.shape[0]
    figure = Figure(figsize=(0.75 * (columns + 1) + 1.0, 0.75 * k + 0.6), layout="constrained")
    axes = np.atleast_2d(figure.subplots(k, 2, width_ratios=[1, columns], squeeze=False))
    for row in range(k):
        centre_ax, member_ax = axes[row]
        vmin, vmax = _range(centres[row])
        _show(centre_ax, tile_images(centres[row][None], 1), vmin=vmin, vmax=vmax)
        for spine in centre_ax.spines.values():
            spine.set_edgecolor("tab:red")
            spine.set_linewidth(1.5)
        size = "" if sizes is None else f" ({int(sizes[row])})"
        centre_ax.set_ylabel(f"{row}{size}", fontsize=8, rotation=0, ha="right", va="center")
        group = _numpy(members[row]) if len(members[row]) else None
        if group is None:
            member_ax.axis("off")
            continue
        group = group[:columns]
        padded = np.full((columns, *group.shape[1:]), np.nan, dtype=np.float32)
        padded[: len(group)] = group
        low, high = float(np.nanmin(group)), float(np.nanmax(group))
        _show(member_ax, tile_images(padded, columns), vmin=low, vmax=high)
    axes[0, 0].set_title("centre", fontsize=8)
    axes[0, 1].set_title("member particles", fontsize=8)
    return figure


def trajectory_figure(images: Any, values: Any, *, title: str = "") -> Figure:
    """Images ``(steps, C, H, W)`` decoded along a trajectory, in one row, each titled with its
    coordinate ``values`` ``(steps,)``."""
    images = _numpy(images)
    values = np.asarray(_numpy(values)).reshape(-1)
    steps = images.shape[0]
    figure = Figure(figsize=(0.8 * steps + 0.4, 1.3), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, steps))
    vmin, vmax = _range(images)
    for ax, image, value in zip(axes, images, values, strict=True):
        _show(ax, tile_images(image[None], 1), vmin=vmin, vmax=vmax)
        ax.set_title(f"{value:+.2f}", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure
