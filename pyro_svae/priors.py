"""Priors for the sites ``z``, ``theta`` and ``dx`` as small modules that return a Pyro distribution.

A prior is any ``torch.nn.Module`` whose ``forward()`` returns a distribution with an empty batch shape and
the site's event shape. :func:`as_prior` turns a plain distribution into such a module
(:class:`DistributionPrior`), whose tensors then move with ``.to(device)`` like buffers, so a prior passed
by the user follows the model to CUDA. A prior with learnable parameters is a ``PyroModule`` whose
``forward`` builds the distribution from ``PyroParam`` attributes (:class:`LearnableVonMises`); SVI then
trains it with the model.

One short constructor per prior (any other distribution of the right shape works as well)::

    SpatialVAE((28, 28), theta_prior=priors.von_mises_theta(0.0, 2.0), dx_prior=priors.student_t_dx(3, 0.1))

Rotation ``theta`` (event shape ``()``, radians):

* :func:`normal_theta` -- the paper's ``N(0, std)`` on the real line.
* :func:`von_mises_theta` -- ``VonMises(loc, concentration)``, a density on the circle.
* :func:`circular_uniform_theta` -- the flat prior ``1 / (2 pi)`` on the circle (:class:`CircularUniform`).
* :func:`symmetric_theta` -- an equal mixture of ``n`` von Mises at ``loc + 2 pi k / n`` (poses that
  come in ``n`` orientations, e.g. an object with ``C_n`` symmetry in how it is placed).
* :class:`LearnableVonMises` -- a von Mises whose concentration (and optionally location) is learned.
* :class:`LearnableLogNormalScale` -- a log-normal magnification prior whose location is learned.
* :class:`BinnedRotationPrior` -- any of these split into K rotation bins: a discrete site ``theta_bin``
  and a continuous angle within the bin (``SpatialVAE(rotation_bins=K)``; :mod:`pyro_svae.pose_search`).

Circular priors have a density that is 2 pi-periodic on the real line (their ``support`` is
``constraints.real``): they are *exact* for a circular guide (values are angles, any representative
modulo 2 pi) and only approximate for a Normal guide on the real line, whose entropy counts the same
angle many times (see :func:`is_circular` and :mod:`pyro_svae.guides`).

Translation ``dx`` (event shape ``(2,)``, grid units): :func:`normal_dx` (the paper), :func:`laplace_dx`,
:func:`student_t_dx` (heavy tails) and :func:`uniform_box_dx` (flat inside a box; the guide then uses a
family whose support is the box).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

from .coords import bin_centres
from .registry import register_prior

__all__ = [
    "BinnedRotationPrior",
    "CircularUniform",
    "DistributionPrior",
    "LearnableVonMises",
    "LearnableLogNormalScale",
    "as_prior",
    "circular_uniform_theta",
    "is_circular",
    "laplace_dx",
    "log_normal_scale",
    "normal_dx",
    "normal_theta",
    "standard_normal_z",
    "student_t_dx",
    "symmetric_theta",
    "uniform_box_dx",
    "von_mises_theta",
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
    # Checking the shape must not register a learnable prior's parameters in the global param store
    # under a provisional name (the model renames the module when it adopts it): outside ``__call__``
    # a PyroModule reads its parameters locally.
    distribution = module.forward() if isinstance(module, PyroModule) else module()
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


@register_prior("standard_normal_z")
def standard_normal_z(z_dim: int) -> dist.Distribution:
    """The paper's content prior ``z ~ N(0, I)``, event shape ``(z_dim,)``."""
    return dist.Normal(torch.zeros(z_dim), torch.ones(z_dim)).to_event(1)


@register_prior("normal_theta")
def normal_theta(std: float = math.pi / 4) -> dist.Distribution:
    """The paper's rotation prior ``theta ~ N(0, std)`` (radians), event shape ``()``."""
    if not std > 0:
        raise ValueError(f"theta prior std must be positive, got {std}")
    return dist.Normal(torch.tensor(0.0), torch.tensor(float(std)))


@register_prior("normal_dx")
def normal_dx(std: float = 0.1) -> dist.Distribution:
    """The paper's translation prior ``dx ~ N(0, std I)`` in grid units, event shape ``(2,)``."""
    if not std > 0:
        raise ValueError(f"dx prior std must be positive, got {std}")
    return dist.Normal(torch.zeros(2), torch.full((2,), float(std))).to_event(1)


@register_prior("log_normal_scale")
def log_normal_scale(std: float = 0.25) -> dist.Distribution:
    """Magnification prior ``log s ~ N(0, std)`` (``std = 0.25``: sizes within about 1.6x either way at
    two standard deviations), event shape ``()``."""
    if not std > 0:
        raise ValueError(f"scale prior std must be positive, got {std}")
    return dist.LogNormal(torch.tensor(0.0), torch.tensor(float(std)))


def _positive(value: float, what: str) -> float:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{what} must be a positive finite number, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Rotation priors on the circle
# --------------------------------------------------------------------------------------------------
class CircularUniform(dist.TorchDistribution):
    """The uniform distribution of an angle: density ``1 / (2 pi)`` for every real value.

    Angles are identified modulo ``2 pi`` (the model's rotation is ``2 pi``-periodic), so the density
    is constant on the whole real line (``support = constraints.real``) and samples are drawn in
    ``[loc - pi, loc + pi)``. This is the exact flat prior for a *circular* guide (von Mises, projected
    or wrapped normal). It is not a proper density on the real line: against a Normal guide on the
    real line the ELBO is unbounded above (a wider Normal always gains entropy), which is why
    :class:`~pyro_svae.guides.AmortizedGuide` warns about that pairing. ``VonMises(0, 0)`` would be the
    same density but has no well-defined sampler and NaN gradients at zero concentration;
    ``Uniform(-pi, pi)`` works too but has a bounded support, which a Normal guide would step outside.
    """

    arg_constraints = {"loc": constraints.real}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc: torch.Tensor | float = 0.0, validate_args: bool | None = None) -> None:
        self.loc = torch.as_tensor(loc, dtype=torch.get_default_dtype()) if not torch.is_tensor(loc) else loc
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(CircularUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        super(CircularUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (2.0 * u - 1.0) * math.pi

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return torch.zeros_like(value + self.loc) - math.log(2 * math.pi)

    def entropy(self) -> torch.Tensor:
        return torch.full_like(self.loc, math.log(2 * math.pi))

    @property
    def mean(self) -> torch.Tensor:
        """No circular mean exists; ``loc`` (the centre of the sampling window) stands in for it."""
        return self.loc

    @property
    def variance(self) -> torch.Tensor:
        return torch.full_like(self.loc, math.pi**2 / 3)


@register_prior("von_mises_theta")
def von_mises_theta(loc: float = 0.0, concentration: float = 2.0) -> dist.Distribution:
    """``theta ~ VonMises(loc, concentration)``: a density on the circle, ``1 / concentration`` being
    roughly the variance for large concentration (``concentration = 1 / std**2``)."""
    _positive(concentration, "von Mises concentration")
    return dist.VonMises(torch.tensor(float(loc)), torch.tensor(float(concentration)))


@register_prior("circular_uniform_theta")
def circular_uniform_theta() -> dist.Distribution:
    """The flat prior on the circle (:class:`CircularUniform`): every in-plane rotation equally likely."""
    return CircularUniform(torch.tensor(0.0))


@register_prior("symmetric_theta")
def symmetric_theta(n: int, concentration: float = 4.0, loc: float = 0.0) -> dist.Distribution:
    """An equal mixture of ``n`` von Mises at ``loc + 2 pi k / n``, ``k = 0 .. n-1``.

    For poses that come in ``n`` orientations related by ``C_n``: e.g. ``n = 2`` when objects appear
    upright or upside down. It is invariant under a turn by ``2 pi / n``. With ``concentration -> 0`` it
    tends to the circular-uniform prior.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the symmetry order n must be an integer >= 1, got {n!r}")
    _positive(concentration, "von Mises concentration")
    locs = float(loc) + 2 * math.pi * torch.arange(n, dtype=torch.get_default_dtype()) / n
    locs = torch.remainder(locs + math.pi, 2 * math.pi) - math.pi
    return dist.MixtureSameFamily(
        dist.Categorical(torch.full((n,), 1.0 / n)),
        dist.VonMises(locs, torch.full((n,), float(concentration))),
    )


@register_prior("learnable_von_mises")
class LearnableVonMises(PyroModule):
    """A von Mises prior on ``theta`` whose concentration is a learned parameter (``PyroParam``, kept
    positive), and optionally its location: an empirical-Bayes prior fitted by the same SVI run.

    Pass it as ``SpatialVAE(..., theta_prior=LearnableVonMises(concentration=1.0))``; after training,
    ``model.theta_prior.concentration`` is the fitted value. ``learn_loc=False`` keeps ``loc`` fixed (a
    buffer), which pins the canonical orientation of the learned content.
    """

    def __init__(self, loc: float = 0.0, concentration: float = 1.0, *, learn_loc: bool = False) -> None:
        super().__init__()
        _positive(concentration, "initial von Mises concentration")
        self.concentration = PyroParam(torch.tensor(float(concentration)), constraint=constraints.positive)
        if learn_loc:
            self.loc = PyroParam(torch.tensor(float(loc)))
        else:
            self.register_buffer("loc", torch.tensor(float(loc)))

    def forward(self) -> dist.Distribution:
        return dist.VonMises(self.loc, self.concentration)


@register_prior("learnable_log_normal_scale")
class LearnableLogNormalScale(PyroModule):
    """A log-normal magnification prior whose location (and optionally spread) is learned:
    ``log s ~ N(loc, std)``, an empirical-Bayes prior fitted by the same SVI run.

    The scale site measures size in the decoder's own unit, and the decoder chooses that unit: a coordinate
    network renders a small object more easily in a magnified frame, and on small galaxies the inferred
    scales settle far below 1 (near 0.05 in ``benchmarks/galaxies.py``), where the fixed ``log s ~ N(0, std)``
    charges tens of nats per image and pushes size into ``z``. Learning ``loc`` lets the prior follow the
    frame; ``std`` stays the spread of sizes around it (``learn_std=True`` fits it too). Pass it as
    ``SpatialVAE(..., scale_prior=LearnableLogNormalScale())``, or by name: ``scale_prior="learned"``
    (location fitted) or ``"learned_std"`` (location and spread).
    """

    def __init__(self, loc: float = 0.0, std: float = 0.25, *, learn_std: bool = False) -> None:
        super().__init__()
        _positive(std, "scale prior std")
        self.learn_std = bool(learn_std)
        self.initial_std = float(std)
        self.loc = PyroParam(torch.tensor(float(loc)))
        if learn_std:
            self.std = PyroParam(torch.tensor(float(std)), constraint=constraints.positive)
        else:
            self.register_buffer("std", torch.tensor(float(std)))

    def forward(self) -> dist.Distribution:
        return dist.LogNormal(self.loc, self.std)


class BinnedRotationPrior(nn.Module):
    """A rotation prior split into ``bins`` bins: the program samples a discrete site ``theta_bin`` and then
    ``theta`` within the bin (:meth:`sample`), the sites a pose search enumerates or samples.

    Bin ``k`` is centred at ``2 pi k / K`` (wrapped to ``[-pi, pi)``, :func:`~pyro_svae.coords.bin_centres`;
    bin 0 is upright), ``p(bin = k)`` is proportional to the theta prior's density at the centre, and within
    a bin the angle is ``N(centre, pi / K)`` (:meth:`within_bin`), so that the bins tile the theta prior (a
    uniform prior gives a nearly flat mixture on the circle).

    ``enumerate=False``: sites ``theta_bin`` and ``theta | bin ~ N(centre, pi / K)``; guides enumerate the bin
    (``TraceEnum_ELBO``) or sample it (``TraceGraph_ELBO``). ``enumerate=True`` moves the search into the
    model: ``theta_bin`` is marked for parallel enumeration, ``theta_offset ~ N(0, pi / K)`` is a
    continuous site shared by all bins and ``theta = centre + theta_offset`` a deterministic site, so
    ``TraceEnum_ELBO`` sums the bin out exactly (the decoder renders every image at all K angles and the
    likelihood picks the pose, as the exhaustive pose searches of cryo-EM do).
    """

    def __init__(self, bins: int, *, enumerate: bool = False) -> None:
        super().__init__()
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise ValueError(f"the number of rotation bins must be an integer >= 2, got {bins!r}")
        self.bins = bins
        self.enumerate = bool(enumerate)
        self.bin_scale = math.pi / bins
        self.register_buffer("centres", bin_centres(bins), persistent=False)

    @property
    def latent_sites(self) -> dict[str, tuple[int, ...]]:
        """Its latent sample sites and their event shapes, in sampling order."""
        return {"theta_bin": (), ("theta_offset" if self.enumerate else "theta"): ()}

    def within_bin(self, centre: torch.Tensor) -> dist.Distribution:
        """The angle within a bin: ``N(centre, pi / K)``."""
        return dist.Normal(centre, self.bin_scale)

    def sample(self, theta_prior: torch.distributions.Distribution) -> torch.Tensor:
        """Sample ``theta_bin``, then the angle, for a ``theta_prior`` of event shape ``()``; returns
        ``theta``."""
        if self.enumerate:
            centre, offset = self.sample_parts(theta_prior)
            return centre + offset
        index = pyro.sample("theta_bin", dist.Categorical(logits=theta_prior.log_prob(self.centres)))
        return pyro.sample("theta", self.within_bin(self.centres[index]))

    def sample_parts(
        self, theta_prior: torch.distributions.Distribution
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``enumerate=True``: sample ``theta_bin``, ``theta_offset`` and the deterministic ``theta``; returns
        the bin's centre (``(K, 1)`` under enumeration) and the offset (``(B,)``), for a decoder that poses
        one render at every bin (:class:`~pyro_svae.lattice.RenderLattice`)."""
        if not self.enumerate:
            raise ValueError("sample_parts splits theta into a bin and an offset: it needs enumerate=True")
        bins = dist.Categorical(logits=theta_prior.log_prob(self.centres))
        index = pyro.sample("theta_bin", bins, infer={"enumerate": "parallel"})
        offset = pyro.sample("theta_offset", self.within_bin(self.centres.new_zeros(())))
        centre = self.centres[index]
        pyro.deterministic("theta", centre + offset)
        return centre, offset

    def extra_repr(self) -> str:
        return f"bins={self.bins}, enumerate={self.enumerate}"


def is_circular(distribution: torch.distributions.Distribution) -> bool:
    """Whether a (``theta``) distribution is a density on the circle: 2 pi-periodic on the real line.

    True for von Mises, :class:`CircularUniform`, a mixture of those, and the circular guide families
    of :mod:`pyro_svae.guides` (which set ``circular = True``); also for ``Uniform(-pi, pi)``.
    """
    if getattr(distribution, "circular", False):
        return True
    if isinstance(distribution, torch.distributions.Independent):
        return is_circular(distribution.base_dist)
    if isinstance(distribution, dist.VonMises | torch.distributions.VonMises | CircularUniform):
        return True
    if isinstance(distribution, torch.distributions.MixtureSameFamily):
        return is_circular(distribution.component_distribution)
    if isinstance(distribution, torch.distributions.Uniform):
        width = (distribution.high - distribution.low).detach()
        return bool(torch.allclose(width, torch.full_like(width, 2 * math.pi)))
    return False


# --------------------------------------------------------------------------------------------------
# Translation priors
# --------------------------------------------------------------------------------------------------
@register_prior("laplace_dx")
def laplace_dx(scale: float = 0.1) -> dist.Distribution:
    """``dx ~ Laplace(0, scale)`` per component (grid units): sharper peak, heavier tails than Normal."""
    _positive(scale, "dx prior scale")
    return dist.Laplace(torch.zeros(2), torch.full((2,), float(scale))).to_event(1)


@register_prior("student_t_dx")
def student_t_dx(df: float = 3.0, scale: float = 0.1) -> dist.Distribution:
    """``dx ~ StudentT(df, 0, scale)`` per component: heavy tails for a few far-off-centre objects."""
    _positive(df, "Student-t degrees of freedom")
    _positive(scale, "dx prior scale")
    return dist.StudentT(
        torch.full((2,), float(df)), torch.zeros(2), torch.full((2,), float(scale))
    ).to_event(1)


@register_prior("uniform_box_dx")
def uniform_box_dx(half_width: float = 0.2) -> dist.Distribution:
    """``dx`` uniform in the box ``[-half_width, half_width]^2`` (grid units).

    Its support is bounded: :class:`~pyro_svae.guides.AmortizedGuide` then picks the
    ``"constrained_normal"`` family for ``dx`` (a Normal pushed through a sigmoid onto the box).
    """
    _positive(half_width, "dx box half-width")
    a = float(half_width)
    return dist.Uniform(torch.full((2,), -a), torch.full((2,), a)).to_event(1)
