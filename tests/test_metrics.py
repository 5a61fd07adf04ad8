import math

import numpy as np
import pytest

from pyro_svae import metrics as M


def test_circular_correlation_ignores_a_global_offset_and_sees_noise():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-math.pi, math.pi, 500)
    assert M.circular_correlation(truth + 1.3, truth) == pytest.approx(1.0)
    assert abs(M.circular_correlation(rng.uniform(-math.pi, math.pi, 500), truth)) < 0.1
    noisy = truth + rng.normal(0, 0.3, 500)
    assert 0.8 < M.circular_correlation(noisy, truth) < 0.99


def test_symmetry_compares_angles_modulo_the_period():
    rng = np.random.default_rng(1)
    truth = rng.uniform(-math.pi, math.pi, 400)
    flipped = truth + math.pi * rng.integers(0, 2, 400)  # C2: theta and theta + pi look alike
    assert M.circular_correlation(flipped, truth) < 0.5
    assert M.circular_correlation(flipped, truth, symmetry=2) == pytest.approx(1.0)
    assert M.median_angular_error(flipped, truth, symmetry=2) < 1e-2


def test_median_error_after_best_offset_and_fraction_within():
    rng = np.random.default_rng(2)
    truth = rng.uniform(-math.pi, math.pi, 300)
    estimate = truth - 2.0 + np.radians(rng.normal(0.0, 5.0, 300))
    # the median |error| of N(0, 5 degrees) is 0.674 * 5 = 3.4 degrees
    assert math.degrees(M.median_angular_error(estimate, truth)) == pytest.approx(3.4, abs=0.5)
    assert M.fraction_within(estimate, truth, 15.0) > 0.98
    assert M.fraction_within(estimate, truth, 0.5) < 0.15


def test_translation_correlation_and_knn_and_clustering():
    rng = np.random.default_rng(3)
    dx = rng.normal(size=(200, 2))
    rx, ry = M.translation_correlation(dx * 2 + 0.1, dx)
    assert rx == pytest.approx(1.0) and ry == pytest.approx(1.0)
    labels = np.repeat(np.arange(3), 50)
    z = np.eye(3)[labels] * 5 + rng.normal(scale=0.3, size=(150, 3))
    assert M.knn_accuracy(z[::2], labels[::2], z[1::2], labels[1::2]) == 1.0
    assert M.clustering_accuracy(z, labels) == 1.0
    assert M.clustering_accuracy(rng.normal(size=(150, 3)), labels) < 0.6


def test_best_spearman_finds_the_monotone_dimension_whatever_its_sign():
    rng = np.random.default_rng(4)
    factor = rng.uniform(0.2, 1.0, 300)
    z = rng.normal(size=(300, 4))
    z[:, 2] = -np.exp(3 * factor) + rng.normal(0, 0.05, 300)  # monotone (decreasing), not linear
    rho, dim = M.best_spearman(z, factor)
    assert dim == 2 and rho > 0.95
    rho_noise, _ = M.best_spearman(rng.normal(size=(300, 4)), factor)
    assert rho_noise < 0.2
    assert M.best_spearman(np.ones((10, 2)), np.arange(10.0)) == (0.0, 0)


def test_knn_regression_r2_high_for_a_smooth_function_and_about_zero_for_noise():
    rng = np.random.default_rng(5)
    z = rng.uniform(-1, 1, size=(600, 2))
    y = np.sin(2 * z[:, 0]) + z[:, 1] ** 2
    assert M.knn_regression_r2(z[:400], y[:400], z[400:], y[400:]) > 0.9
    noise = rng.normal(size=600)
    assert M.knn_regression_r2(z[:400], noise[:400], z[400:], noise[400:]) < 0.1


def test_log_scale_correlation_is_invariant_to_powers_and_factors():
    rng = np.random.default_rng(6)
    truth = np.exp(rng.uniform(0, math.log(2), 200))
    assert M.log_scale_correlation(3 * truth**1.7, truth) == pytest.approx(1.0)
    assert abs(M.log_scale_correlation(np.exp(rng.normal(size=200)), truth)) < 0.2
    with pytest.raises(ValueError, match="positive"):
        M.log_scale_correlation(truth - 1.5, truth)


def _elongated_blobs(n: int, size: int, seed: int):
    """Anisotropic Gaussian blobs (N, 1, H, W) with major-axis angles drawn uniformly."""
    import torch

    from pyro_svae.coords import pixel_grid

    generator = torch.Generator().manual_seed(seed)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.pi
    grid = pixel_grid(size)  # (P, 2), y up
    u = grid[:, 0] * torch.cos(angle)[:, None] + grid[:, 1] * torch.sin(angle)[:, None]
    v = -grid[:, 0] * torch.sin(angle)[:, None] + grid[:, 1] * torch.cos(angle)[:, None]
    return torch.exp(-(u**2) / (2 * 0.3**2) - v**2 / (2 * 0.1**2)).reshape(n, 1, size, size)


def _principal_axis_angle(images):
    """Major-axis angle (counter-clockwise from +x, modulo pi) of each image from its second moments."""
    import torch

    from pyro_svae.coords import pixel_grid

    grid = pixel_grid(images.shape[-2], images.shape[-1])
    w = images.sum(1).flatten(1)
    w = w / w.sum(1, keepdim=True)
    x, y = grid[:, 0], grid[:, 1]
    mx, my = (w * x).sum(1, keepdim=True), (w * y).sum(1, keepdim=True)
    cxx, cyy = (w * (x - mx) ** 2).sum(1), (w * (y - my) ** 2).sum(1)
    cxy = (w * (x - mx) * (y - my)).sum(1)
    return 0.5 * torch.atan2(2 * cxy, cxx - cyy)


def test_equivariance_correlation_of_a_principal_axis_estimator_and_of_noise():
    import torch

    images = _elongated_blobs(200, 33, seed=0)
    angles = (torch.rand(200, generator=torch.Generator().manual_seed(1)) * 2 - 1) * math.pi
    # the estimator is only defined modulo pi, so it is equivariant with symmetry 2
    assert M.equivariance_correlation(_principal_axis_angle, images, angles, symmetry=2) > 0.98
    fisher_lee = M.equivariance_correlation(
        _principal_axis_angle, images, angles, symmetry=2, method="fisher-lee"
    )
    assert fisher_lee > 0.95
    # and it does follow the counter-clockwise convention: a sign error gives a negative value
    assert M.equivariance_correlation(lambda x: -_principal_axis_angle(x), images, angles, symmetry=2) < -0.9
    generator = torch.Generator().manual_seed(2)
    random = M.equivariance_correlation(
        lambda x: (torch.rand(x.shape[0], generator=generator) * 2 - 1) * math.pi, images, angles
    )
    assert abs(random) < 0.2
    with pytest.raises(ValueError, match="one angle per image"):
        M.equivariance_correlation(_principal_axis_angle, images, angles[:5])


def test_circular_correlation_within_groups_forgives_a_frame_per_group_but_not_noise():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-math.pi, math.pi, 600)
    groups = np.repeat([0, 1, 2], 200)
    # each group posed perfectly in its own frame (e.g. 6s drawn as upside-down 9s)
    estimate = truth + np.array([0.3, 0.3 + math.pi, 2.0])[groups]
    assert M.circular_correlation(estimate, truth) < 0.5
    assert M.circular_correlation_within(estimate, truth, groups) == pytest.approx(1.0)
    noisy = estimate.copy()
    noisy[groups == 2] = rng.uniform(-math.pi, math.pi, 200)  # one group not posed at all
    assert M.circular_correlation_within(noisy, truth, groups) == pytest.approx(2 / 3, abs=0.1)
    with pytest.raises(ValueError, match="lengths"):
        M.circular_correlation_within(estimate, truth, groups[:10])


def _fisher_lee_by_pairs(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = np.sin(a[:, None] - a[None, :]), np.sin(b[:, None] - b[None, :])
    return float((sa * sb).sum() / math.sqrt((sa**2).sum() * (sb**2).sum()))


def test_fisher_lee_equals_its_definition_over_pairs_and_sees_offsets_and_reflections():
    rng = np.random.default_rng(0)
    truth = rng.uniform(-math.pi, math.pi, 300)
    estimate = truth + 1.3 + rng.normal(0.0, 0.5, 300)
    fl = M.circular_correlation(estimate, truth, method="fisher-lee")
    assert fl == pytest.approx(_fisher_lee_by_pairs(estimate, truth), abs=1e-10)
    assert M.circular_correlation(truth + 2.0, truth, method="fisher-lee") == pytest.approx(1.0)
    assert M.circular_correlation(0.5 - truth, truth, method="fisher-lee") == pytest.approx(-1.0)
    halves = M.circular_correlation(estimate, truth, symmetry=2, method="fisher-lee")
    assert halves == pytest.approx(_fisher_lee_by_pairs(2 * estimate, 2 * truth), abs=1e-10)
    with pytest.raises(ValueError, match="fisher-lee"):
        M.circular_correlation(estimate, truth, method="pearson")


def test_fisher_lee_is_steady_for_uniform_angles_where_the_centred_coefficient_swings():
    # the same noise model drawn 20 times: Jammalamadaka's coefficient centres on mean directions that
    # uniform angles do not have, so it swings (even changes sign); Fisher-Lee's stays put
    rng = np.random.default_rng(1)
    centred, pairs = [], []
    for _ in range(20):
        truth = rng.uniform(-math.pi, math.pi, 1000)
        estimate = truth + rng.normal(0.0, 0.6, 1000)
        centred.append(M.circular_correlation(estimate, truth))
        pairs.append(M.circular_correlation(estimate, truth, method="fisher-lee"))
    assert max(centred) - min(centred) > 0.5
    assert max(pairs) - min(pairs) < 0.05
    resultant = math.exp(-(0.6**2) / 2)  # E exp(i noise): Fisher-Lee ~ its square for uniform angles
    assert np.mean(pairs) == pytest.approx(resultant**2, abs=0.02)


def test_tracked_turns_are_the_turns_for_an_equivariant_estimator():
    import torch

    images = _elongated_blobs(100, 33, seed=3)
    angles = (torch.rand(100, generator=torch.Generator().manual_seed(4)) * 2 - 1) * math.pi
    turns = M.tracked_turns(_principal_axis_angle, images, angles)
    assert turns.shape == (100,) and bool((turns.abs() <= math.pi).all())
    # the axis is defined modulo pi: within 5 degrees of each turn, modulo a half turn
    assert M.fraction_within(turns, angles, 5.0, symmetry=2) > 0.9
    assert M.fraction_within(-turns, angles, 5.0, symmetry=2) < 0.2  # a sign error would show
    with pytest.raises(ValueError, match="one angle per image"):
        M.tracked_turns(_principal_axis_angle, images, angles[:5])
