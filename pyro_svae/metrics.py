"""Pose and content recovery against known ground truth (post-hoc, numpy)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .coords import transform_images, wrap_angle

__all__ = [
    "CIRCULAR_CORRELATIONS",
    "circular_correlation",
    "circular_correlation_within",
    "angular_errors",
    "median_angular_error",
    "fraction_within",
    "pearson",
    "translation_correlation",
    "knn_accuracy",
    "clustering_accuracy",
    "best_spearman",
    "knn_regression_r2",
    "log_scale_correlation",
    "equivariance_correlation",
    "tracked_turns",
]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


CIRCULAR_CORRELATIONS = ("jammalamadaka", "fisher-lee")


def circular_correlation(estimate, truth, *, symmetry: int = 1, method: str = "jammalamadaka") -> float:
    """Circular correlation coefficient between two sets of angles; 1 means perfectly related up to a
    global offset, ~0 unrelated, -1 related by a reflection (one set turning the other way).

    ``method="jammalamadaka"`` (Jammalamadaka & SenGupta) centres each set on its mean direction. Angles
    spread uniformly over the circle have no mean direction (the resultant of ``n`` of them is
    ``O(1/sqrt(n))`` long and points anywhere), so the centring is noise and the coefficient of the same
    estimates can swing widely, even change sign, from one sample of ``n`` to the next: use it for
    concentrated angles (the paper's ``N(0, pi/4)``). ``method="fisher-lee"`` (Fisher & Lee 1983) compares
    all pairs, ``sum sin(a_i - a_j) sin(b_i - b_j)`` normalized, and needs no centre: the coefficient for
    uniformly posed data (for them it is about the squared mean resultant length of the errors,
    ``|mean exp(i (a - b))|^2``), computed in ``O(n)``. With ``symmetry = n`` the angles are compared modulo
    ``2 pi / n`` (correlation of ``n * theta``).
    """
    if method not in CIRCULAR_CORRELATIONS:
        raise ValueError(f"unknown method {method!r}; expected one of {CIRCULAR_CORRELATIONS}")
    a, b = symmetry * _numpy(estimate), symmetry * _numpy(truth)
    if method == "fisher-lee":
        # sum_ij sin(x_ij) sin(y_ij) = (|sum exp(i(a-b))|^2 - |sum exp(i(a+b))|^2) / 2, and
        # sum_ij sin^2(a_i - a_j) = (n^2 - |sum exp(2ia)|^2) / 2
        n = a.size
        difference, total = np.exp(1j * (a - b)).sum(), np.exp(1j * (a + b)).sum()
        spread_a = n**2 - abs(np.exp(2j * a).sum()) ** 2
        spread_b = n**2 - abs(np.exp(2j * b).sum()) ** 2
        denominator = math.sqrt(max(spread_a * spread_b, 0.0))
        return float((abs(difference) ** 2 - abs(total) ** 2) / denominator) if denominator > 0 else 0.0
    sa = np.sin(a - np.angle(np.exp(1j * a).mean()))
    sb = np.sin(b - np.angle(np.exp(1j * b).mean()))
    denominator = math.sqrt(float((sa**2).sum() * (sb**2).sum()))
    return float((sa * sb).sum() / denominator) if denominator > 0 else 0.0


def circular_correlation_within(
    estimate, truth, groups, *, symmetry: int = 1, method: str = "jammalamadaka"
) -> float:
    """Circular correlation computed inside each group (e.g. digit class) with its own offset, averaged
    with weights by group size.

    Under uniform rotations a model may choose a different "up" for each kind of content (a 6 drawn as
    an upside-down 9, a 4 lying on its side): :func:`circular_correlation` charges that to pose recovery,
    this does not, so the two together tell a wrong pose from a per-content choice of frame.
    """
    estimate, truth, groups = _numpy(estimate), _numpy(truth), _numpy(groups)
    if not (len(estimate) == len(truth) == len(groups)):
        raise ValueError(f"lengths differ: {len(estimate)}, {len(truth)}, {len(groups)}")
    total, weight = 0.0, 0
    for group in np.unique(groups):
        members = groups == group
        count = int(members.sum())
        if count > 1:
            correlation = circular_correlation(
                estimate[members], truth[members], symmetry=symmetry, method=method
            )
            total += count * correlation
            weight += count
    return total / weight if weight else 0.0


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


def best_spearman(z, factor) -> tuple[float, int]:
    """``|Spearman rho|`` between a factor ``(N,)`` and the best-matching dimension of ``z`` ``(N, d)``.

    Returns ``(|rho|, dimension)``; a constant dimension (or factor) counts as ``rho = 0``.
    """
    from scipy.stats import rankdata

    z, factor = _numpy(z), _numpy(factor).ravel()
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] != factor.shape[0]:
        raise ValueError(
            f"expected z of shape (N, d) and a factor of shape (N,), got {z.shape} and {factor.shape}"
        )
    ranked = rankdata(factor)
    rhos = [abs(pearson(rankdata(z[:, j]), ranked)) for j in range(z.shape[1])]
    best = int(np.argmax(rhos))
    return float(rhos[best]), best


def knn_regression_r2(z_train, y_train, z_test, y_test, *, k: int = 10) -> float:
    """R^2 on test of a k-nearest-neighbour regressor of a continuous factor ``y`` ``(N,)`` from ``z``.

    1 is perfect, 0 is no better than predicting the test mean, and it can be negative.
    """
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsRegressor

    z_train, z_test = _numpy(z_train), _numpy(z_test)
    z_train = z_train[:, None] if z_train.ndim == 1 else z_train
    z_test = z_test[:, None] if z_test.ndim == 1 else z_test
    regressor = KNeighborsRegressor(n_neighbors=min(k, z_train.shape[0]))
    regressor.fit(z_train, _numpy(y_train).ravel())
    return float(r2_score(_numpy(y_test).ravel(), regressor.predict(z_test)))


def log_scale_correlation(estimate, truth) -> float:
    """Pearson r between the logarithms of estimated and true scales (both positive, ``(N,)``)."""
    estimate, truth = _numpy(estimate).ravel(), _numpy(truth).ravel()
    if (estimate <= 0).any() or (truth <= 0).any():
        raise ValueError("scales must be positive to take their logarithm")
    return pearson(np.log(estimate), np.log(truth))


def tracked_turns(
    infer_theta: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, angles: torch.Tensor
) -> torch.Tensor:
    """How far inferred angles turn when the images are turned: ``(N,)``, wrapped to ``[-pi, pi)``.

    Each image ``(N, C, H, W)`` is turned counter-clockwise by its angle ``alpha`` ``(N,)`` with
    :func:`pyro_svae.coords.transform_images` (bilinear, zero padding: content should lie inside the
    inscribed circle, on a background near 0); ``infer_theta`` maps images to angles ``(N,)`` and is
    called on the originals and on the turned images. Returns ``theta_turned - theta_original``, which
    an exactly equivariant estimator makes equal to ``alpha``; compare them with
    :func:`circular_correlation` (as :func:`equivariance_correlation` does) or :func:`fraction_within`.
    """
    angles = torch.as_tensor(angles, dtype=images.dtype, device=images.device)
    if angles.shape != images.shape[:1]:
        raise ValueError(
            f"expected one angle per image, shape {tuple(images.shape[:1])}, got {tuple(angles.shape)}"
        )
    with torch.no_grad():
        turned = transform_images(images, angles)
        theta_original = torch.as_tensor(infer_theta(images)).reshape(-1)
        theta_turned = torch.as_tensor(infer_theta(turned)).reshape(-1)
    return wrap_angle(theta_turned - theta_original.to(theta_turned.device))


def equivariance_correlation(
    infer_theta: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    angles: torch.Tensor,
    *,
    symmetry: int = 1,
    method: str = "jammalamadaka",
) -> float:
    """How well inferred angles follow a known rotation of the images (no ground-truth pose needed).

    ``circular_correlation(tracked_turns(infer_theta, images, angles), angles, symmetry=symmetry,
    method=method)`` (see :func:`tracked_turns`): 1 for an exactly equivariant estimator (``theta``
    follows the content), ~0 for one that ignores it. Draw the angles uniformly over the circle (and
    prefer ``method="fisher-lee"`` for such angles): the circular correlation measures co-variation, so
    angles confined to a small arc give a small, noisy denominator. Use ``symmetry = 2`` for content that
    looks the same after a half turn (an angle is then only defined modulo ``pi``).
    """
    turns = tracked_turns(infer_theta, images, angles)
    return circular_correlation(turns, angles, symmetry=symmetry, method=method)
