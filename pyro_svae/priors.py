"""Priors for the sites ``z``, ``theta`` and ``dx`` as small modules that return a Pyro distribution.

A prior is any ``torch.nn.Module`` whose ``forward()`` returns a distribution with an empty batch shape and
the site's event shape. :func:`as_prior` turns a plain distribution into such a module
(:class:`DistributionPrior`), whose tensors then move with ``.to(device)`` like buffers, so a prior passed
by the user follows the model to CUDA. A prior with learnable parameters is a ``PyroModule`` whose
``forward`` builds the distribution from ``PyroParam`` attributes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import nn

__all__ = [
    "DistributionPrior",
    "as_prior",
    "standard_normal_z",
    "normal_theta",
    "normal_dx",
]


def _map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict):
    """Apply ``fn`` to every tensor reachable from a distribution (nested distributions, transforms)."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, torch.Tensor):
        result = fn(obj)
    elif isinstance(obj, dist.torch_distribution.TorchDistributionMixin | torch.distributions.Distribution):
        result = copy.copy(obj)
        memo[key] = result
        for name, value in vars(obj).items():
            setattr(result, name, _map_tensors(value, fn, memo))
    elif isinstance(obj, torch.distributions.transforms.Transform):
        result = copy.copy(obj)
        memo[key] = result
        for name, value in vars(obj).items():
            if not name.startswith("_cached"):
                setattr(result, name, _map_tensors(value, fn, memo))
    elif isinstance(obj, list | tuple):
        result = type(obj)(_map_tensors(item, fn, memo) for item in obj)
    elif isinstance(obj, dict):
        result = {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    else:
        result = obj
    memo[key] = result
    return result


class DistributionPrior(nn.Module):
    """A fixed prior distribution held by a module so that ``.to(device)`` / ``.double()`` move it."""

    def __init__(self, distribution: torch.distributions.Distribution) -> None:
        super().__init__()
        self.distribution = distribution

    def _apply(self, fn, recurse: bool = True):  # noqa: D401 - follows nn.Module._apply
        super()._apply(fn, recurse)
        self.distribution = _map_tensors(self.distribution, fn, {})
        return self

    def forward(self) -> torch.distributions.Distribution:
        return self.distribution

    def extra_repr(self) -> str:
        return repr(self.distribution)


def as_prior(
    prior: torch.distributions.Distribution | nn.Module, *, site: str, event_shape: tuple[int, ...]
) -> nn.Module:
    """Wrap ``prior`` as a prior module for ``site`` and check that it fits the site.

    Raises ``ValueError`` when the distribution's batch shape is not empty or its event shape is not
    ``event_shape`` (e.g. a ``Normal(0, 1)`` passed for the ``(2,)``-dimensional ``dx``: use
    ``Normal(0, 1).expand([2]).to_event(1)``).
    """
    if isinstance(prior, torch.distributions.Distribution):
        module: nn.Module = DistributionPrior(prior)
    elif isinstance(prior, nn.Module):
        module = prior
    else:
        raise TypeError(
            f"prior for site '{site}' must be a torch/Pyro distribution or an nn.Module returning one, "
            f"got {type(prior).__name__}"
        )
    distribution = module()
    if not isinstance(distribution, torch.distributions.Distribution):
        raise TypeError(f"prior module for site '{site}' returned {type(distribution).__name__}")
    if tuple(distribution.batch_shape) != () or tuple(distribution.event_shape) != tuple(event_shape):
        hint = ""
        if tuple(distribution.event_shape) == () and len(event_shape) == 1:
            hint = f"; wrap it as `.expand([{event_shape[0]}]).to_event(1)`"
        raise ValueError(
            f"prior for site '{site}' must have batch shape () and event shape {tuple(event_shape)}, "
            f"found batch shape {tuple(distribution.batch_shape)} and event shape "
            f"{tuple(distribution.event_shape)}{hint}"
        )
    return module


def standard_normal_z(z_dim: int) -> dist.Distribution:
    """The paper's content prior ``z ~ N(0, I)``, event shape ``(z_dim,)``."""
    return dist.Normal(torch.zeros(z_dim), torch.ones(z_dim)).to_event(1)


def normal_theta(std: float = math.pi / 4) -> dist.Distribution:
    """The paper's rotation prior ``theta ~ N(0, std)`` (radians), event shape ``()``."""
    if not std > 0:
        raise ValueError(f"theta prior std must be positive, got {std}")
    return dist.Normal(torch.tensor(0.0), torch.tensor(float(std)))


def normal_dx(std: float = 0.1) -> dist.Distribution:
    """The paper's translation prior ``dx ~ N(0, std I)`` in grid units, event shape ``(2,)``."""
    if not std > 0:
        raise ValueError(f"dx prior std must be positive, got {std}")
    return dist.Normal(torch.zeros(2), torch.full((2,), float(std))).to_event(1)
