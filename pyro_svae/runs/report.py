"""The final report of a run: ``summary.json`` contents, figures, the environment."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from ..checkpoint import atomic_write
from ..data import (
    ImageDataset,
)
from ..guides import AmortizedGuide
from ..infer import evaluate, posterior_means, recovery_metrics
from ..model import SpatialVAE


# --------------------------------------------------------------------------------------------------
def final_report(
    model: SpatialVAE,
    guide: AmortizedGuide,
    test: ImageDataset,
    *,
    train: ImageDataset | None = None,
    num_particles: int = 16,
    batch_size: int = 100,
    seed: int | None = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Test ELBO and importance-weighted bound (``num_particles`` samples per image), pose recovery and
    content metrics (k-NN accuracy from training ``z``, KMeans clustering accuracy) where the truth is
    known. Returns ``(report, posterior means of the test images)``."""
    result = evaluate(model, guide, test, num_particles=num_particles, batch_size=batch_size, seed=seed)
    report: dict[str, Any] = {
        key: result[key] for key in ("elbo", "iw_elbo", "reconstruction", "kl", "num_particles")
    }
    report["num_images"] = len(test)
    means = posterior_means(guide, test)
    train_means = posterior_means(guide, train) if train is not None and train.labels is not None else None
    report.update(recovery_metrics(means, test, train_means=train_means, train=train))
    if test.labels is not None and len(torch.unique(test.labels)) > 1:
        report["clustering_accuracy"] = M.clustering_accuracy(means["z"], test.labels)
    for name, factor in test.factors.items():  # e.g. the conformation of simulated particles
        if len(test) > 2 and float(factor.std()) > 0:
            report[f"z_spearman_{name}"] = M.best_spearman(means["z"], factor)[0]
    return report, means


def _save(figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    return path


@torch.no_grad()
def write_figures(
    folder: str | os.PathLike,
    *,
    model: SpatialVAE,
    test: ImageDataset,
    means: Mapping[str, torch.Tensor],
    records: Sequence[Mapping[str, Any]] | None = None,
    report: Mapping[str, Any] | None = None,
    manifold_steps: int = 10,
    num_reconstructions: int = 10,
) -> list[Path]:
    """Save the run's PNG figures in ``folder``; returns their paths.

    ``training_curves.png`` (when ``records``), ``manifold.png``, ``reconstructions.png`` (inputs
    spread over ``test``, reconstructions at the inferred pose, content at pose zero) and ``theta.png``
    (when the model rotates and the test data know their rotations).
    """
    from .. import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if records:
        written.append(_save(plots.training_curves_figure(records), folder / "training_curves.png"))
    steps = manifold_steps
    typical_scale = means["scale"].median() if "scale" in means else None  # the decoder picks its own unit
    images, values = plots.decode_manifold(model, steps, scale=typical_scale)
    if model.z_dim == 1:
        images = images[:1]
    written.append(_save(plots.manifold_figure(images, values), folder / "manifold.png"))

    device = model.grid.device
    count = min(num_reconstructions, len(test))
    pick = torch.linspace(0, len(test) - 1, count).round().long()  # spread over the data set
    inputs = test.images[pick]
    z = means["z"][pick].to(device)
    theta = means["theta"][pick].to(device) if "theta" in means else None
    dx = means["dx"][pick].to(device) if "dx" in means else None
    scale = means["scale"][pick].to(device) if "scale" in means else None
    blur = model.psf_fwhm is not None  # as the telescope records them
    was_training = model.training
    model.eval()
    try:
        reconstructions = model.decode(z, theta, dx, scale, blur=blur).cpu()
        aligned = None
        if theta is not None or dx is not None:
            zero_theta = None if theta is None else torch.zeros_like(theta)
            zero_dx = None if dx is None else torch.zeros_like(dx)
            aligned = model.decode(z, zero_theta, zero_dx, scale, blur=blur).cpu()
    finally:
        model.train(was_training)
    figure = plots.reconstructions_figure(inputs, reconstructions, aligned)
    written.append(_save(figure, folder / "reconstructions.png"))

    if "theta" in means and test.theta is not None:
        correlation = None if report is None else report.get("theta_circ_corr")
        figure = plots.theta_scatter_figure(means["theta"], test.theta, circular_correlation=correlation)
        written.append(_save(figure, folder / "theta.png"))
    return written


def write_traversal(
    folder: str | os.PathLike,
    model: SpatialVAE,
    *,
    means: Mapping[str, torch.Tensor] | None = None,
    steps: int = 24,
) -> Path:
    """``folder/traversal.gif``: ``z`` decoded at pose zero along the prior's central 95 % (``z_dim`` 1) or
    along the first principal axis of the posterior means ``means["z"]`` (``z_dim > 1``; without
    means, along ``z_1``); see :func:`pyro_svae.plots.traversal_animation`."""
    from .. import plots

    z = None if means is None else means.get("z")
    return plots.traversal_animation(model, Path(folder) / "traversal.gif", steps=steps, means=z)


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions and hardware of this process, for ``summary.json``."""
    import pyro

    from .. import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "pyro_svae": __version__,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "numpy": np.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info
