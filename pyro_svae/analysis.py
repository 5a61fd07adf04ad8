"""Analysis of the content latents ``z`` of a trained run (what ``cryodrgn analyze`` gives, for 2-D).

Every function returns data and writes no file: principal components (:func:`pca`), a UMAP embedding
(:func:`umap_embedding`, needs ``umap-learn``), k-means clusters with their centres and the particle
nearest each centre (:func:`kmeans`), the purity of clusters against a known discrete truth or a binned
continuous one (:func:`purity`, :func:`bin_truth`, :func:`cluster_truth_table`), trajectories in ``z``
along principal components (:func:`pc_trajectory`) and images decoded upright, at ``theta = 0``,
``dx = 0`` and ``scale = 1`` (:func:`decode_upright`). Figures live in :mod:`pyro_svae.analysis_plots`;
``pyro-svae analyze`` writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "PCAResult",
    "KMeansResult",
    "pca",
    "umap_embedding",
    "kmeans",
    "bin_truth",
    "purity",
    "cluster_truth_table",
    "pc_trajectory",
    "decode_upright",
    "point_density",
]


def _points(z: Any, what: str = "z") -> np.ndarray:
    if isinstance(z, torch.Tensor):
        z = z.detach().float().cpu().numpy()
    array = np.asarray(z, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"{what}: expected points (N >= 2, d), got shape {np.shape(z)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: holds NaN or infinite values")
    return array


@dataclass
class PCAResult:
    """``coords`` ``(N, k)`` the points in principal coordinates; ``components`` ``(k, d)`` unit axes (the
    sign chosen so each axis' largest component is positive); ``mean`` ``(d,)``; ``explained_variance``
    and ``explained_variance_ratio`` ``(k,)``."""

    coords: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray


def pca(z: Any, n_components: int | None = None) -> PCAResult:
    """Principal components of ``z`` ``(N, d)`` (all ``min(N, d)`` of them by default)."""
    points = _points(z)
    n, d = points.shape
    k = min(n, d) if n_components is None else int(n_components)
    if not 1 <= k <= min(n, d):
        raise ValueError(f"n_components must be in [1, {min(n, d)}], got {n_components}")
    mean = points.mean(0)
    _, singular, vh = np.linalg.svd(points - mean, full_matrices=False)
    axes = vh[:k]
    axes = axes * np.sign(axes[np.arange(k), np.abs(axes).argmax(1)])[:, None]
    variance = singular**2 / max(n - 1, 1)
    total = variance.sum()
    return PCAResult(
        coords=(points - mean) @ axes.T,
        components=axes,
        mean=mean,
        explained_variance=variance[:k],
        explained_variance_ratio=variance[:k] / total if total > 0 else np.zeros(k),
    )


def umap_embedding(z: Any, *, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """A 2-D UMAP embedding ``(N, 2)`` of ``z`` (``umap-learn``; ``n_neighbors`` capped at ``N - 1``)."""
    points = _points(z)
    try:
        import umap
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("UMAP needs umap-learn: pip install umap-learn") from error
    n = points.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {n}")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=max(2, min(n_neighbors, n - 1)),
        min_dist=min_dist,
        random_state=seed,
        init="spectral" if n > 50 else "random",
        n_jobs=1,
    )
    return np.asarray(reducer.fit_transform(points), dtype=np.float32)


@dataclass
class KMeansResult:
    """``labels`` ``(N,)`` in ``0..k-1``, ``centers`` ``(k, d)``, ``nearest`` ``(k,)`` the index of the
    point nearest each centre (a real particle to show for the cluster), ``sizes`` ``(k,)``."""

    labels: np.ndarray
    centers: np.ndarray
    nearest: np.ndarray
    sizes: np.ndarray


def kmeans(z: Any, k: int, *, seed: int = 0) -> KMeansResult:
    """k-means of ``z`` with ``k`` clusters (scikit-learn, 10 initialisations, seeded)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import pairwise_distances_argmin

    points = _points(z)
    if not 1 <= k <= points.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= N = {points.shape[0]} clusters, got {k}")
    fitted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    labels = fitted.labels_.astype(np.int64)
    centers = fitted.cluster_centers_
    return KMeansResult(
        labels=labels,
        centers=centers.astype(np.float32),
        nearest=pairwise_distances_argmin(centers, points).astype(np.int64),
        sizes=np.bincount(labels, minlength=k).astype(np.int64),
    )


def bin_truth(values: Any, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """A continuous truth ``(N,)`` in ``bins`` equal-width bins over its range: ``(bin index (N,), edges
    (bins + 1,))``."""
    array = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values)
    array = array.astype(np.float64).reshape(-1)
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    low, high = float(array.min()), float(array.max())
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, array, side="right") - 1, 0, bins - 1)
    return index.astype(np.int64), edges


def cluster_truth_table(labels: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """Contingency table ``(clusters, truth classes)`` of counts and the truth classes (its columns)."""
    labels = np.asarray(labels).reshape(-1)
    truth = np.asarray(truth).reshape(-1)
    if labels.shape != truth.shape:
        raise ValueError(f"labels and truth differ in length: {labels.shape[0]} and {truth.shape[0]}")
    classes, truth_index = np.unique(truth, return_inverse=True)
    clusters = int(labels.max()) + 1
    table = np.zeros((clusters, len(classes)), dtype=np.int64)
    np.add.at(table, (labels, truth_index), 1)
    return table, classes


def purity(labels: Any, truth: Any) -> float:
    """Cluster purity: the fraction of points whose cluster's most common truth class is their own
    (``1.0``: every cluster holds one truth class; a cluster may share its class with others)."""
    table, _ = cluster_truth_table(labels, truth)
    return float(table.max(1).sum() / table.sum())


def pc_trajectory(
    pcs: PCAResult, component: int, *, steps: int = 10, percentiles: tuple[float, float] = (5.0, 95.0)
) -> tuple[np.ndarray, np.ndarray]:
    """``(z (steps, d), t (steps,))``: points along principal axis ``component`` (0-based) through the mean
    of ``z``, from the ``percentiles[0]`` to the ``percentiles[1]`` percentile of the data's coordinate
    ``t`` on that axis (cryoDRGN's PC trajectories)."""
    if steps < 2:
        raise ValueError(f"a trajectory needs at least 2 steps, got {steps}")
    if not 0 <= component < pcs.components.shape[0]:
        raise ValueError(f"component must be in [0, {pcs.components.shape[0]}), got {component}")
    low, high = np.percentile(pcs.coords[:, component], percentiles)
    t = np.linspace(low, high, steps)
    z = pcs.mean[None, :] + t[:, None] * pcs.components[component][None, :]
    return z.astype(np.float32), t.astype(np.float32)


@torch.no_grad()
def decode_upright(model, z: Any, *, batch_size: int = 256) -> torch.Tensor:
    """Images ``(N, C, H, W)`` (CPU) decoded from ``z`` ``(N, z_dim)`` at ``theta = 0``, ``dx = 0`` and
    ``scale = 1`` (no CTF), in the model's eval mode."""
    device = model.grid.device
    points = torch.as_tensor(np.asarray(z, dtype=np.float32)).to(device)
    if points.ndim == 1:
        points = points[:, None]
    was_training = model.training
    model.eval()
    out = []
    try:
        for chunk in points.split(batch_size):
            zeros = chunk.new_zeros(chunk.shape[:-1])
            theta = zeros if getattr(model, "rotate", False) else None
            dx = chunk.new_zeros((*chunk.shape[:-1], 2)) if getattr(model, "translate", False) else None
            scale = chunk.new_ones(chunk.shape[:-1]) if getattr(model, "scale", False) else None
            images = (
                model.decode(chunk, theta, dx, scale) if scale is not None else model.decode(chunk, theta, dx)
            )
            out.append(images.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def point_density(points: Any, *, bins: int = 64) -> np.ndarray:
    """A density value per 2-D point ``(N,)``: the count of its cell in a ``bins x bins`` histogram,
    smoothed with a Gaussian of one cell (fast for any ``N``; for colouring scatter plots)."""
    from scipy.ndimage import gaussian_filter

    xy = _points(points, "points")
    if xy.shape[1] == 1:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    counts, xedges, yedges = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins)
    smooth = gaussian_filter(counts, 1.0)
    ix = np.clip(np.searchsorted(xedges, xy[:, 0], side="right") - 1, 0, bins - 1)
    iy = np.clip(np.searchsorted(yedges, xy[:, 1], side="right") - 1, 0, bins - 1)
    return smooth[ix, iy]
