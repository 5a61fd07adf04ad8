"""Posterior draws and per-image summaries of a trained guide (``posterior.nc``; circular for theta)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write
from ..coords import wrap_angle
from ..data import (
    ImageDataset,
)
from ..guides import AmortizedGuide, ProjectedNormalAngle, WrappedNormal
from ..infer import guide_inputs
from .folder import _jsonable


# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_posterior(
    guide: AmortizedGuide, data: ImageDataset, *, draws: int = 100, batch_size: int = 500
) -> dict[str, np.ndarray]:
    """Draws from ``q(site | image)`` for every image: ``{site: (draws, N, *event_shape)}`` on the CPU.

    Uses the global torch RNG (seed it first for reproducible draws).
    """
    if draws < 1:
        raise ValueError(f"the number of posterior draws must be positive, got {draws}")
    device = next(guide.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    for index in torch.arange(len(data)).split(batch_size):
        inputs = guide_inputs(guide, data, index, device)
        for site, q in guide.distributions(data.images[index].to(device), **inputs).items():
            out.setdefault(site, []).append(q.sample((draws,)).float().cpu())
    return {site: torch.cat(values, dim=1).numpy() for site, values in out.items()}


def posterior_inference_data(
    samples: Mapping[str, np.ndarray], data: ImageDataset, *, attrs: Mapping[str, Any] | None = None
):
    """An ArviZ ``InferenceData``: group ``posterior`` with ``z`` ``(chain, draw, image, z_dim)``,
    ``theta`` ``(chain, draw, image)`` (radians, wrapped to ``[-pi, pi)``) and ``dx``
    ``(chain, draw, image, xy)``; group ``constant_data`` with the known truth (``theta_true``,
    ``dx_true``, ``label``) of the images."""
    az = _arviz()
    posterior = {site: np.asarray(values)[None] for site, values in samples.items()}
    if "theta" in posterior:
        posterior["theta"] = wrap_angle(torch.from_numpy(posterior["theta"])).numpy()
    dims: dict[str, list[str]] = {
        "z": ["image", "z_dim"],
        "theta": ["image"],
        "theta_bin": ["image"],
        "theta_offset": ["image"],
        "dx": ["image", "xy"],
        "scale": ["image"],
    }
    coords: dict[str, Any] = {"image": np.arange(len(data)), "xy": ["x", "y"]}
    if "z" in samples:
        coords["z_dim"] = np.arange(samples["z"].shape[-1])
    constant: dict[str, np.ndarray] = {}
    if data.theta is not None:
        constant["theta_true"] = data.theta.numpy()
        dims["theta_true"] = ["image"]
    if data.dx is not None:
        constant["dx_true"] = data.dx.numpy()
        dims["dx_true"] = ["image", "xy"]
    if data.scale is not None:
        constant["scale_true"] = data.scale.numpy()
        dims["scale_true"] = ["image"]
    if data.labels is not None:
        constant["label"] = data.labels.numpy()
        dims["label"] = ["image"]
    info = {
        "data": data.name,
        "theta_units": "radians, counter-clockwise, in [-pi, pi)",
        "dx_units": "grid units (the image spans [-1, 1])",
        **(attrs or {}),
    }
    return az.from_dict(
        posterior=posterior,
        constant_data=constant or None,
        coords=coords,
        dims={k: v for k, v in dims.items() if k in posterior or k in constant},
        posterior_attrs=_jsonable(info),
        constant_data_attrs=_jsonable(info) if constant else None,
    )


def write_posterior(path: str | os.PathLike, inference_data) -> None:
    """Write an ``InferenceData`` as NetCDF (h5netcdf engine), atomically."""
    atomic_write(path, lambda tmp: inference_data.to_netcdf(tmp, engine="h5netcdf"))


def load_posterior(path: str | os.PathLike):
    """Read a ``posterior.nc`` written by :func:`write_posterior` as an ArviZ ``InferenceData``."""
    return _arviz().from_netcdf(str(path))


def _arviz():
    with warnings.catch_warnings():  # arviz announces its refactor with a FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _analytic_std(q: torch.distributions.Distribution) -> torch.Tensor | None:
    base = q
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    normal = (
        torch.distributions.Normal,
        torch.distributions.MultivariateNormal,
        torch.distributions.LowRankMultivariateNormal,
    )
    return q.stddev if isinstance(base, normal) else None


def _circular_moment(q: torch.distributions.Distribution) -> torch.Tensor | None:
    """``E[exp(i theta)]`` (complex, batch shape) of an angle's distribution where it has a closed form:
    (wrapped) Normal ``exp(i loc - scale^2 / 2)``, von Mises ``exp(i loc) I1(k) / I0(k)``, the angle of a
    projected normal, mixtures of these and these turned by fixed angles; None otherwise."""
    dists = torch.distributions
    while isinstance(q, dists.Independent):
        q = q.base_dist
    if isinstance(q, dists.TransformedDistribution):
        moment = _circular_moment(q.base_dist)
        for transform in q.transforms:
            turn = isinstance(transform, dists.AffineTransform) and transform.event_dim == 0
            if moment is None or not (turn and bool(torch.all(torch.as_tensor(transform.scale) == 1))):
                return None
            loc = torch.as_tensor(transform.loc, dtype=moment.real.dtype, device=moment.device)
            moment = moment * torch.polar(torch.ones_like(loc), loc)
        return moment
    if isinstance(q, dists.Normal | WrappedNormal):
        return torch.polar(torch.exp(-0.5 * q.scale**2), q.loc)
    if isinstance(q, dists.VonMises):
        k = q.concentration
        return torch.polar(torch.special.i1e(k) / torch.special.i0e(k), q.loc)
    if isinstance(q, ProjectedNormalAngle):  # unit-covariance normal vector of mean c, |c| = rho
        c = q.concentration
        rho = c.norm(dim=-1)
        half = rho**2 / 4
        length = math.sqrt(math.pi / 8) * rho * (torch.special.i0e(half) + torch.special.i1e(half))
        return torch.polar(length, torch.atan2(c[..., 1], c[..., 0]))
    if isinstance(q, dists.MixtureSameFamily):
        moment = _circular_moment(q.component_distribution)
        return None if moment is None else (q.mixture_distribution.probs * moment).sum(-1)
    return None


def circular_std(resultant: torch.Tensor) -> torch.Tensor:
    """Circular standard deviation ``sqrt(-2 ln R)`` (radians, same shape) of mean resultant lengths ``R``,
    capped at ``pi``: ``pi`` means spread over the whole circle (``R < exp(-pi^2 / 2) ~ 0.007`` cannot be
    told from a uniform angle)."""
    return torch.sqrt(-2.0 * torch.log(resultant)).clamp(max=math.pi)


@torch.no_grad()
def posterior_summaries(
    guide, data: ImageDataset, *, draws: int = 100, batch_size: int = 500
) -> dict[str, torch.Tensor]:
    """Per-image posterior means and standard deviations, on the CPU: ``<site>_mean`` and ``<site>_std``
    for each of the guide's sites ``z`` ``(N, z_dim)``, ``theta`` ``(N,)`` (radians), ``dx`` ``(N, 2)``
    (grid units) and ``scale`` ``(N,)``; with ``theta``, also ``theta_resultant`` ``(N,)``.

    The guide runs in ``eval()`` mode (no training-time augmentation). Means are its point estimates
    (:meth:`posterior_means`; for a pose-search guide ``theta`` is the angle of the most probable bin),
    ``theta_mean`` wrapped to ``[-pi, pi)``. ``theta`` is summarized as an angle: ``theta_resultant`` is
    the mean resultant length ``R = |E exp(i theta)|`` in ``[0, 1]`` and ``theta_std`` the circular
    standard deviation :func:`circular_std` (at most ``pi``); ``R`` is analytic for (wrapped) Normal, von
    Mises, projected normal families and mixtures of them, else estimated from ``draws`` samples per
    image. Other sites' standard deviations are analytic for normal families, else the sample standard
    deviation of ``draws`` samples. Uses the global torch RNG (seed it first for reproducible estimates).
    """
    if draws < 2:
        raise ValueError(f"estimating standard deviations needs at least 2 draws, got {draws}")
    device = next(guide.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        out.setdefault(key, []).append(value.float().cpu())

    was_training = guide.training
    guide.eval()
    try:
        for index in torch.arange(len(data)).split(batch_size):
            images = data.images[index].to(device)
            inputs = guide_inputs(guide, data, index, device)
            means = guide.posterior_means(images, **inputs)
            q = guide.distributions(images, **inputs)
            for site in ("z", "theta", "dx", "scale"):
                if site not in q:
                    continue
                if site == "theta":
                    moment = _circular_moment(q[site])
                    if moment is None:
                        samples = q[site].sample((draws,)).float()
                        moment = torch.polar(torch.ones_like(samples), samples).mean(0)
                    resultant = moment.abs().clamp(max=1.0)
                    keep("theta_mean", wrap_angle(means[site]))
                    keep("theta_std", circular_std(resultant))
                    keep("theta_resultant", resultant)
                    continue
                std = _analytic_std(q[site])
                if std is None:
                    std = q[site].sample((draws,)).float().std(0)
                keep(f"{site}_mean", means[site])
                keep(f"{site}_std", std)
    finally:
        guide.train(was_training)
    return {key: torch.cat(values) for key, values in out.items()}
