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
