"""Pose and content recovery against known ground truth (post-hoc, numpy)."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "circular_correlation",
    "angular_errors",
    "median_angular_error",
    "fraction_within",
    "pearson",
    "translation_correlation",
    "knn_accuracy",
    "clustering_accuracy",
]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def circular_correlation(estimate, truth, *, symmetry: int = 1) -> float:
    """Circular correlation coefficient (Jammalamadaka & SenGupta) between two sets of angles.

    With ``symmetry = n`` the angles are compared modulo ``2 pi / n`` (correlation of ``n * theta``).
    It is invariant to a global offset of either set; 1 means perfectly related, ~0 unrelated.
    """
    a, b = symmetry * _numpy(estimate), symmetry * _numpy(truth)
    sa = np.sin(a - np.angle(np.exp(1j * a).mean()))
    sb = np.sin(b - np.angle(np.exp(1j * b).mean()))
    denominator = math.sqrt(float((sa**2).sum() * (sb**2).sum()))
    return float((sa * sb).sum() / denominator) if denominator > 0 else 0.0


def angular_errors(estimate, truth, *, symmetry: int = 1, resolution: int = 3600) -> np.ndarray:
    """Absolute angular errors (radians) after removing the single global offset that minimises their
    median; with ``symmetry = n`` errors are taken modulo ``2 pi / n``."""
    period = 2 * math.pi / symmetry
    diff = _numpy(estimate) - _numpy(truth)
    offsets = np.linspace(0.0, period, resolution, endpoint=False)
    best, best_median = None, math.inf
    for chunk in np.array_split(offsets, max(1, resolution // 256)):
        wrapped = np.remainder(diff[None, :] - chunk[:, None] + period / 2, period) - period / 2
        medians = np.median(np.abs(wrapped), axis=1)
        i = int(np.argmin(medians))
        if medians[i] < best_median:
            best_median, best = float(medians[i]), np.abs(wrapped[i])
    return best


def median_angular_error(estimate, truth, *, symmetry: int = 1) -> float:
    """Median absolute angular error in radians after the best global offset."""
    return float(np.median(angular_errors(estimate, truth, symmetry=symmetry)))


def fraction_within(estimate, truth, degrees: float = 15.0, *, symmetry: int = 1) -> float:
    """Fraction of angles within ``degrees`` of the truth after the best global offset."""
    errors = angular_errors(estimate, truth, symmetry=symmetry)
    return float((errors <= math.radians(degrees)).mean())


def pearson(a, b) -> float:
    a, b = _numpy(a).ravel(), _numpy(b).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def translation_correlation(estimate, truth) -> tuple[float, float]:
    """Pearson r of each component of ``dx`` ``(N, 2)``: ``(r_x, r_y)``."""
    e, t = _numpy(estimate), _numpy(truth)
    return pearson(e[:, 0], t[:, 0]), pearson(e[:, 1], t[:, 1])


def knn_accuracy(z_train, labels_train, z_test, labels_test, *, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour classifier fit on training ``z`` and scored on test ``z``."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k).fit(_numpy(z_train), _numpy(labels_train))
    return float(classifier.score(_numpy(z_test), _numpy(labels_test)))


def clustering_accuracy(z, labels, *, n_clusters: int | None = None, seed: int = 0) -> float:
    """KMeans on ``z`` with Hungarian matching of clusters to labels: the best one-to-one accuracy."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    labels = _numpy(labels).astype(np.int64)
    classes = np.unique(labels)
    n_clusters = n_clusters or classes.size
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(_numpy(z))
    counts = np.zeros((n_clusters, classes.size))
    for c, label in zip(clusters, np.searchsorted(classes, labels), strict=True):
        counts[c, label] += 1
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / labels.size)
