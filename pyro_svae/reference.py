"""A reference posterior: NUTS on the pose and content of single images with the trained decoder fixed.

The amortized guide is an approximation twice over (its family, and one encoder for all images). For a
handful of images, :func:`nuts_posterior` samples the exact posterior ``p(z, theta, dx | image)`` of the
trained model with Pyro's NUTS (several chains, run one after the other, each started from the guide:
chain 0 at the guide's posterior mean, the others at draws from the guide), converts the draws to ArviZ
``InferenceData``, summarizes them (``r_hat``, bulk and tail ESS, HDIs) and sets the guide's posterior for
the same image beside them::

    ref = nuts_posterior(model, guide, test.images[0], num_samples=300, warmup_steps=300, num_chains=2)
    ref.summary        # az.summary of the NUTS draws
    ref.comparison     # per scalar variable: NUTS mean/sd vs guide mean/sd, overlap, guide mass in the HDI

``theta`` is an angle: NUTS runs on the real line, where a circular prior makes the posterior periodic, so
before any summary both NUTS and guide draws are unwrapped relative to the guide's circular mean
(``m + wrap(theta - m)``), which is exact for any posterior narrower than a half turn and keeps chains
that sit one turn apart from being reported as disagreeing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from .coords import wrap_angle

__all__ = [
    "ReferencePosterior",
    "nuts_posterior",
    "reference_posteriors",
    "compare_samples",
    "overview",
]


@dataclass
class ReferencePosterior:
    """NUTS draws and the guide's draws for one image, with their summaries."""

    nuts: az.InferenceData
    guide: az.InferenceData
    summary: pd.DataFrame
    comparison: pd.DataFrame
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def max_r_hat(self) -> float:
        return float(self.summary["r_hat"].max())

    @property
    def min_ess_bulk(self) -> float:
        return float(self.summary["ess_bulk"].min())


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """The module's parameters do not require gradients inside the block (the decoder stays fixed and
    NUTS differentiates the latents only)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        module.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _flatten(samples: dict[str, np.ndarray], event_ndims: dict[str, int]) -> dict[str, np.ndarray]:
    """``{"z": (..., 2)} -> {"z[0]": (...), "z[1]": (...)}`` (ArviZ's naming of vector components)."""
    flat = {}
    for site, values in samples.items():
        if event_ndims[site] == 0:
            flat[site] = values
        else:
            for i in range(values.shape[-1]):
                flat[f"{site}[{i}]"] = values[..., i]
    return flat


def _overlap(a: np.ndarray, b: np.ndarray, bins: int = 40) -> float:
    """Overlap coefficient of two samples: ``sum min(p_a, p_b)`` over shared histogram bins (1 = same
    distribution, 0 = disjoint)."""
    low, high = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    if not high > low:
        return 1.0
    edges = np.linspace(low, high, bins + 1)
    pa = np.histogram(a, edges)[0] / a.size
    pb = np.histogram(b, edges)[0] / b.size
    return float(np.minimum(pa, pb).sum())


def compare_samples(
    nuts: dict[str, np.ndarray], guide: dict[str, np.ndarray], *, hdi_prob: float = 0.9
) -> pd.DataFrame:
    """Per scalar variable (``nuts`` ``(chains, draws)``, ``guide`` ``(draws,)``): means and sds side by
    side, the guide's mean shift in NUTS sds, the sd ratio (< 1: the guide is over-confident), the overlap
    coefficient of the two marginals and the guide's mass inside the NUTS HDI (``hdi_prob`` if equal)."""
    rows = {}
    for name, draws in nuts.items():
        p = np.asarray(draws).reshape(-1)
        q = np.asarray(guide[name]).reshape(-1)
        low, high = az.hdi(p, hdi_prob=hdi_prob)
        sd = float(p.std(ddof=1))
        rows[name] = {
            "nuts_mean": float(p.mean()),
            "guide_mean": float(q.mean()),
            "nuts_sd": sd,
            "guide_sd": float(q.std(ddof=1)),
            "mean_shift_sd": float((q.mean() - p.mean()) / sd) if sd > 0 else math.nan,
            "sd_ratio": float(q.std(ddof=1) / sd) if sd > 0 else math.nan,
            "overlap": _overlap(p, q),
            "guide_in_hdi": float(((q >= low) & (q <= high)).mean()),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


@torch.no_grad()
def _guide_draws(guide, image: torch.Tensor, num_samples: int) -> tuple[dict, dict]:
    q = guide.distributions(image[None])
    means = {site: value[0] for site, value in guide.posterior_means(image[None]).items()}
    draws = {site: d.sample((num_samples,))[:, 0] for site, d in q.items()}
    return means, draws


def nuts_posterior(
    model,
    guide,
    image: torch.Tensor,
    *,
    num_samples: int = 300,
    warmup_steps: int = 300,
    num_chains: int = 2,
    guide_samples: int = 2000,
    hdi_prob: float = 0.9,
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.8,
    seed: int | None = 0,
    num_threads: int | None = 1,
    progress: bool = False,
) -> ReferencePosterior:
    """NUTS on ``z``, ``theta``, ``dx`` of one image ``(C, H, W)`` under ``model`` with its weights fixed.

    Chains run one after the other (``num_chains >= 2`` for ``r_hat``); chain 0 starts at the guide's
    posterior mean, the others at draws from the guide. ``seed`` seeds Pyro once per chain
    (``seed + chain``). ``num_threads`` sets torch's intra-op threads for the run (restored after):
    one image is too small a problem for several threads, which only add synchronisation (``None``
    keeps the current setting). Returns a :class:`ReferencePosterior` whose ``summary`` is
    ``az.summary`` of the NUTS draws (``theta`` unwrapped around the guide's mean) and whose ``comparison`` is
    :func:`compare_samples` against ``guide_samples`` draws from the guide.
    """
    if num_chains < 1 or num_samples < 1 or warmup_steps < 0:
        raise ValueError(
            f"need num_chains >= 1, num_samples >= 1, warmup_steps >= 0; got {num_chains}, {num_samples}, "
            f"{warmup_steps}"
        )
    if not 0 < hdi_prob < 1:
        raise ValueError(f"hdi_prob must be in (0, 1), got {hdi_prob}")
    device = next(model.parameters()).device
    image = torch.as_tensor(image, dtype=torch.float32, device=device)
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if tuple(image.shape) != tuple(model.image_shape):
        raise ValueError(f"expected one image of shape {tuple(model.image_shape)}, got {tuple(image.shape)}")
    sites = dict(model.latent_sites)
    if "theta_bin" in sites:
        raise ValueError(
            "NUTS cannot sample the discrete site 'theta_bin'; use a model without rotation_bins"
        )
    if seed is not None:
        pyro.set_rng_seed(seed)
    means, guide_draws = _guide_draws(guide, image, max(guide_samples, num_chains))
    chains: list[dict[str, np.ndarray]] = []
    info = {"divergences": [], "step_size": [], "num_samples": num_samples, "warmup_steps": warmup_steps}
    started = time.perf_counter()
    with _frozen(model), _threads(num_threads or torch.get_num_threads()):
        for chain in range(num_chains):
            if seed is not None:
                pyro.set_rng_seed(seed + chain)
            start = means if chain == 0 else {site: guide_draws[site][chain] for site in sites}
            init = {site: value[None].clone() for site, value in start.items()}
            kernel = NUTS(
                model,
                init_strategy=init_to_value(values=init),
                max_tree_depth=max_tree_depth,
                target_accept_prob=target_accept_prob,
            )
            mcmc = MCMC(
                kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
            )
            mcmc.run(image[None])
            samples = mcmc.get_samples()
            chains.append({site: samples[site][:, 0].detach().cpu().numpy() for site in sites})
            divergences = mcmc.diagnostics().get("divergences", {})
            info["divergences"].append(sum(len(v) for v in divergences.values()))
            info["step_size"].append(float(kernel.step_size))
    seconds = time.perf_counter() - started

    nuts = {site: np.stack([c[site] for c in chains]) for site in sites}  # (chains, draws, ...)
    guide_np = {site: value.detach().cpu().numpy() for site, value in guide_draws.items()}
    if "theta" in sites:
        centre = float(means["theta"])
        info["theta_centre"] = centre
        nuts["theta"] = centre + wrap_angle(torch.as_tensor(nuts["theta"] - centre)).numpy()
        guide_np["theta"] = centre + wrap_angle(torch.as_tensor(guide_np["theta"] - centre)).numpy()
    nuts_idata = az.from_dict(posterior=nuts)
    guide_idata = az.from_dict(posterior={site: value[None] for site, value in guide_np.items()})
    summary = az.summary(nuts_idata, hdi_prob=hdi_prob)
    event_ndims = {site: len(shape) for site, shape in sites.items()}
    comparison = compare_samples(
        _flatten(nuts, event_ndims), _flatten(guide_np, event_ndims), hdi_prob=hdi_prob
    )
    return ReferencePosterior(nuts_idata, guide_idata, summary, comparison, seconds, info)


def reference_posteriors(model, guide, images: Sequence[torch.Tensor] | torch.Tensor, **kwargs) -> list:
    """:func:`nuts_posterior` for each image of ``images`` ``(N, C, H, W)``."""
    return [nuts_posterior(model, guide, image, **kwargs) for image in images]


def overview(references: Sequence[ReferencePosterior], labels: Sequence | None = None) -> pd.DataFrame:
    """One row per image: the worst ``r_hat``, the smallest bulk ESS, divergences, seconds, and where the
    guide differs most from NUTS (largest mean shift in NUTS sds, smallest sd ratio, smallest overlap)."""
    rows = []
    for i, ref in enumerate(references):
        c = ref.comparison
        shift = c["mean_shift_sd"].abs()
        rows.append(
            {
                "image": labels[i] if labels is not None else i,
                "max_r_hat": ref.max_r_hat,
                "min_ess_bulk": ref.min_ess_bulk,
                "divergences": int(sum(ref.info.get("divergences", []))),
                "seconds": ref.seconds,
                "largest_shift": f"{shift.idxmax()} ({shift.max():.2f} sd)",
                "smallest_sd_ratio": f"{c['sd_ratio'].idxmin()} ({c['sd_ratio'].min():.2f})",
                "min_overlap": f"{c['overlap'].idxmin()} ({c['overlap'].min():.2f})",
            }
        )
    return pd.DataFrame(rows).set_index("image")
