"""Observation models: decoder outputs ``(..., P, k * C)`` -> a distribution with event shape ``(P, C)``.

Each likelihood declares ``params_per_channel`` (``k``): the decoder emits that many numbers per pixel and
channel, the first ``C`` being the mean parameter of each channel. ``params_for_moments(mean, std)`` is
the inverse: the decoder output whose distribution has that pixel mean (and spread, where the likelihood
has one), used to start a decoder at the data's mean image (:meth:`SpatialVAE.init_output_bias`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

__all__ = [
    "GreyBernoulli",
    "Likelihood",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "LearnedGaussianLikelihood",
    "PixelGaussianLikelihood",
    "LIKELIHOODS",
    "make_likelihood",
]


class GreyBernoulli(dist.Bernoulli):
    """Bernoulli on logits whose log-density also accepts grey values ``y`` in ``[0, 1]``.

    ``log p(y) = y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))``: the binary cross-entropy the original
    spatial-VAE trained with, so ELBOs compare with the paper. Samples are still 0/1.
    """

    support = constraints.unit_interval

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.logits, value)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none")


class Likelihood(nn.Module):
    """Base class: ``forward(params)`` with ``params`` ``(..., P, k * C)`` returns a distribution."""

    params_per_channel: int = 1
    #: whether the first ``C`` parameters are the pixel means themselves, so a linear filter of the image
    #: (the CTF) may act on them
    linear_mean: bool = False

    def forward(self, params: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Expected pixel values ``(..., P, C)`` for display."""
        return self(params).mean

    def params_for_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Decoder outputs ``(..., k * C)`` whose distribution has pixel mean ``mean`` ``(..., C)`` (and
        standard deviation ``std`` ``(..., C)`` where the likelihood models it)."""
        raise NotImplementedError(f"{type(self).__name__} does not define params_for_moments")


# pixel means are kept this far inside (0, 1) so that the logits stay finite (|logit| <= 6.9)
_MEAN_MARGIN = 1e-3


class BernoulliLikelihood(Likelihood):
    """The paper's likelihood: Bernoulli on logits, accepting grey values (see :class:`GreyBernoulli`)."""

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return GreyBernoulli(logits=params).to_event(2)

    def params_for_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return torch.logit(mean.clamp(_MEAN_MARGIN, 1 - _MEAN_MARGIN))


class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli on logits: the properly normalized density on ``[0, 1]``."""

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=params).to_event(2)

    def params_for_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        # the mean rises with the logits, with no closed-form inverse: bisect within +-15, where float32
        # probabilities are not clamped (means 0.067 to 0.933: beyond, the nearest end)
        target = mean.clamp(_MEAN_MARGIN, 1 - _MEAN_MARGIN)
        low, high = torch.full_like(target, -15.0), torch.full_like(target, 15.0)
        for _ in range(40):
            middle = (low + high) / 2
            below = dist.ContinuousBernoulli(logits=middle).mean < target
            low, high = torch.where(below, middle, low), torch.where(below, high, middle)
        return (low + high) / 2


class GaussianLikelihood(Likelihood):
    """Gaussian with a fixed noise standard deviation ``sigma`` (full density, constants kept)."""

    linear_mean = True

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"Gaussian sigma must be positive, got {sigma}")
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.sigma.to(params.dtype)).to_event(2)

    def params_for_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return mean.clone()


class LearnedGaussianLikelihood(PyroModule):
    """Gaussian with one learned noise standard deviation shared by all pixels (a ``PyroParam``)."""

    params_per_channel = 1
    linear_mean = True

    def __init__(self, init_sigma: float = 1.0) -> None:
        super().__init__()
        if not init_sigma > 0:
            raise ValueError(f"Gaussian sigma must be positive, got {init_sigma}")
        self.sigma = PyroParam(torch.tensor(float(init_sigma)), constraint=constraints.positive)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        return dist.Normal(params, self.sigma.to(params.dtype)).to_event(2)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params

    params_for_moments = GaussianLikelihood.params_for_moments


class PixelGaussianLikelihood(Likelihood):
    """Gaussian whose standard deviation per pixel and channel comes from the decoder ("colored noise").

    The decoder emits ``2 C`` numbers per pixel: means, then ``softplus(raw) + min_sigma`` as sigmas.
    """

    params_per_channel = 2
    linear_mean = True

    def __init__(self, min_sigma: float = 1e-3) -> None:
        super().__init__()
        self.min_sigma = float(min_sigma)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, raw = params.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + self.min_sigma).to_event(2)

    def params_for_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        excess = (std - self.min_sigma).clamp_min(self.min_sigma)  # softplus(raw) = sigma - min_sigma
        return torch.cat([mean, excess + torch.log(-torch.expm1(-excess))], dim=-1)


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_learned": LearnedGaussianLikelihood,
    "gaussian_pixel": PixelGaussianLikelihood,
}


def make_likelihood(likelihood: str | nn.Module, **kwargs) -> nn.Module:
    """A likelihood module from its name (one of ``LIKELIHOODS``) or the module itself."""
    if isinstance(likelihood, nn.Module):
        return likelihood
    try:
        cls = LIKELIHOODS[likelihood]
    except KeyError:
        raise ValueError(
            f"unknown likelihood '{likelihood}'; expected one of {sorted(LIKELIHOODS)}"
        ) from None
    return cls(**kwargs)
