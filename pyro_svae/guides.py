"""Amortized guides: an encoder reads each image once; one head per site gives q(site | image).

The distribution family of each site is a constructor choice (:data:`FAMILIES`), so a guide can change
the family of one site without touching the others::

    AmortizedGuide(model, families={"theta": "projected_normal", "z": "full_normal"}, encoder=CNNEncoder(...))

Families (``name``: event shapes, reparameterized?):

* ``"normal"`` -- diagonal Normal, any event shape, yes (the paper's guide).
* ``"lowrank_normal"`` -- ``LowRankMultivariateNormal`` (``rank`` factors plus a diagonal), ``(d,)``, yes.
* ``"full_normal"`` -- ``MultivariateNormal`` with a Cholesky factor (full covariance), ``(d,)``, yes.
* ``"constrained_normal"`` -- a Normal pushed through ``biject_to(prior.support)`` (e.g. a sigmoid onto
  the box of :func:`~pyro_svae.priors.uniform_box_dx`), any event shape, yes. Chosen automatically for a
  site whose prior has a bounded support.
* ``"von_mises"`` -- ``VonMises`` on the circle, ``()``, **no**: ``torch`` has no reparameterized von Mises
  sampler, so train with ``TraceGraph_ELBO`` (score-function gradients, Rao-Blackwellized per image);
  :meth:`AmortizedGuide.default_loss` (which :func:`~pyro_svae.infer.fit` uses when no ``loss`` is given)
  picks it. ``TraceMeanField_ELBO`` and the importance-weighted objectives need reparameterized guides
  and refuse it.
* ``"projected_normal"`` -- the angle of a 2-D ``ProjectedNormal`` vector, ``()``, yes.
* ``"wrapped_normal"`` -- a Normal wrapped onto ``[-pi, pi)``, ``()``, yes.

**Rotation augmentation** (``AmortizedGuide(..., augment_rotation=True)``, the original code's
``--augment-rotation``): in training mode the encoder reads a copy of each image turned by a random angle
``alpha``; the posterior it gives for that copy, ``q(theta', dx' | rotated image)``, is turned back,
``theta = theta' - alpha`` and ``dx = R(-alpha) dx'`` (both bijections with unit Jacobian), so the
encoder must learn to read every orientation. In ``eval()`` mode the image is read as it is.

Circular families return angles in ``[-pi, pi)`` and their densities are 2 pi-periodic. Their location is
the angle of a 2-vector output by the head (never a raw real number), so that images turning once around
the circle can map continuously to posterior locations turning once around the circle.

**Support and the circular ELBO.** The paper's ``"normal"`` guide on the real line, used against a
circular prior (:func:`~pyro_svae.priors.is_circular`: von Mises, circular-uniform, symmetric mixture),
gives an objective that is the ELBO of the *wrapped* guide only up to the guide's mass beyond
``±pi`` around its mean: the likelihood and a circular prior are 2 pi-periodic, so only ``theta mod 2 pi``
matters, but the Normal's entropy on the real line exceeds the entropy of the angle it induces (it counts
the same angle once per turn). The objective is therefore *not* a lower bound on ``log p(x)`` and is even
unbounded above (``std -> inf`` gains entropy without limit). It is safe in practice when every posterior
std is well below pi (e.g. std < pi / 3 leaves less than 0.3 % of mass beyond ±pi), as for the paper's
rotated MNIST with a concentrated prior; it is not when the prior is flat or poses are ambiguous
(symmetric objects), where a circular family gives the exact ELBO. :class:`AmortizedGuide` warns when a
circular prior meets a real-line family, and :func:`wrapped_theta` re-evaluates a trained ``"normal"``
guide with its wrapped (circular) density, which is a valid bound again.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import AffineTransform, Transform

from .coords import principal_pose, transform_images, wrap_angle
from .encoders import MLPEncoder
from .model import SpatialVAE, images_plate, unique_name
from .priors import is_circular

__all__ = [
    "SiteFamily",
    "NormalFamily",
    "LowRankNormalFamily",
    "FullNormalFamily",
    "ConstrainedNormalFamily",
    "VonMisesFamily",
    "ProjectedNormalFamily",
    "WrappedNormalFamily",
    "WrappedNormal",
    "ProjectedNormalAngle",
    "FAMILIES",
    "EncoderGuide",
    "AmortizedGuide",
    "CircularSupportWarning",
    "wrapped_theta",
    "default_family",
    "RotateVector",
    "CANONICALIZATIONS",
]

_TWO_PI = 2 * math.pi

#: ways an :class:`AmortizedGuide` can pose each image before reading it (``canonicalize=``)
CANONICALIZATIONS = (None, "moments")


class RotateVector(Transform):
    """Bijection ``v -> R(angle) v`` of 2-vectors ``(..., 2)`` (counter-clockwise by ``angle`` ``(...)``),
    unit Jacobian."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, angle: torch.Tensor, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.angle = angle

    def _rotate(self, v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        cos, sin = torch.cos(angle), torch.sin(angle)
        x, y = v[..., 0], v[..., 1]
        return torch.stack([cos * x - sin * y, sin * x + cos * y], dim=-1)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self._rotate(x, self.angle)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._rotate(y, -self.angle)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x[..., 0])


def _is_real(support: constraints.Constraint) -> bool:
    while hasattr(support, "base_constraint"):  # independent(...), mixture-of-components constraints
        support = support.base_constraint
    return support is constraints.real or type(support) is type(constraints.real)


class CircularSupportWarning(UserWarning):
    """A real-line guide family meets a prior on the circle (the ELBO is then approximate)."""


# --------------------------------------------------------------------------------------------------
# Circular distributions with reparameterized samplers
# --------------------------------------------------------------------------------------------------
class WrappedNormal(dist.TorchDistribution):
    """A Normal ``N(loc, scale)`` wrapped onto the circle: samples in ``[-pi, pi)``, density
    ``sum_k N(theta + 2 pi k; loc, scale)`` (2 pi-periodic, ``support = real`` like ``VonMises``).

    ``rsample`` wraps a reparameterized Normal sample (the wrap is the identity almost everywhere, so the
    gradient is the Normal's). The density is summed over 7 windings for ``scale <= pi`` and evaluated by
    its Fourier series for ``scale > pi``; both are exact to float precision in their range.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True
    circular = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(WrappedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(WrappedNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return wrap_angle(self.loc + self.scale * eps)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        d = wrap_angle(value - self.loc)
        d, scale = torch.broadcast_tensors(d, self.scale)
        # windings: exact for scale <= pi (the 4th winding lies > 5 std away)
        k = torch.arange(-3, 4, dtype=d.dtype, device=d.device)
        x = (d.unsqueeze(-1) + _TWO_PI * k) / scale.unsqueeze(-1)
        windings = torch.logsumexp(-0.5 * x**2, -1) - scale.log() - 0.5 * math.log(_TWO_PI)
        # Fourier series: exact for scale > pi (exp(-n^2 scale^2 / 2) < 1e-19 from n = 3)
        n = torch.arange(1, 6, dtype=d.dtype, device=d.device)
        terms = torch.exp(-0.5 * (n * scale.unsqueeze(-1)) ** 2) * torch.cos(n * d.unsqueeze(-1))
        fourier = torch.log((1 + 2 * terms.sum(-1)).clamp_min(1e-30)) - math.log(_TWO_PI)
        return torch.where(scale <= math.pi, windings, fourier)

    @property
    def mean(self) -> torch.Tensor:
        """The circular mean direction, in ``[-pi, pi)``."""
        return wrap_angle(self.loc)

    @property
    def variance(self) -> torch.Tensor:
        """The circular variance ``1 - exp(-scale^2 / 2)``."""
        return 1 - torch.exp(-0.5 * self.scale**2)


class ProjectedNormalAngle(dist.TorchDistribution):
    """The angle of a 2-D ``ProjectedNormal(concentration)`` unit vector, in ``[-pi, pi)``.

    ``rsample`` is reparameterized (Pyro's ``ProjectedNormal`` normalizes a reparameterized Normal
    vector); the density of the angle is the projected normal's density on the unit circle (with
    respect to arc length, so it integrates to one over a turn). Its mean direction is the angle of
    ``concentration`` and its spread shrinks as ``|concentration|`` grows.
    """

    arg_constraints = {"concentration": constraints.real_vector}
    support = constraints.real
    has_rsample = True
    circular = True

    def __init__(self, concentration: torch.Tensor, validate_args: bool | None = None) -> None:
        if concentration.shape[-1:] != (2,):
            raise ValueError(
                f"concentration must end in a dimension of size 2, got {tuple(concentration.shape)}"
            )
        self.concentration = concentration
        self._projected = dist.ProjectedNormal(concentration, validate_args=False)
        super().__init__(concentration.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(ProjectedNormalAngle, _instance)
        new.concentration = self.concentration.expand(batch_shape + (2,))
        new._projected = dist.ProjectedNormal(new.concentration, validate_args=False)
        super(ProjectedNormalAngle, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()) -> torch.Tensor:
        v = self._projected.rsample(sample_shape)
        return torch.atan2(v[..., 1], v[..., 0])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        unit = torch.stack([torch.cos(value), torch.sin(value)], dim=-1)
        return self._projected.log_prob(unit)

    @property
    def mean(self) -> torch.Tensor:
        """The mean direction (the angle of ``concentration``; the density is symmetric about it)."""
        return torch.atan2(self.concentration[..., 1], self.concentration[..., 0])


# --------------------------------------------------------------------------------------------------
# Families: head outputs ``raw (..., num_params)`` -> distribution
# --------------------------------------------------------------------------------------------------
class SiteFamily(nn.Module):
    """A distribution family for one site: ``forward(raw (..., num_params))`` -> distribution with
    batch shape ``(...)`` and the site's event shape.

    ``has_rsample``: whether samples are reparameterized (else score-function gradients,
    ``TraceGraph_ELBO``); ``circular``: whether it is a distribution of an angle on the circle;
    ``support``: the constraint its samples satisfy.
    """

    name: str = "family"
    num_params: int
    has_rsample: bool = True
    circular: bool = False
    support: constraints.Constraint = constraints.real

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.event_numel = math.prod(self.event_shape)

    @classmethod
    def for_prior(cls, event_shape: tuple[int, ...], prior: torch.distributions.Distribution | None):
        """The family for a site with this prior (families that adapt to the prior's support override)."""
        return cls(event_shape)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """Posterior point estimate ``(..., *event_shape)`` (the mean, or circular mean for angles)."""
        return self(raw).mean

    def _check_vector(self) -> int:
        if len(self.event_shape) != 1:
            raise ValueError(
                f"the '{self.name}' family needs a vector site (event shape (d,)), got {self.event_shape}"
            )
        return self.event_shape[0]

    def _check_angle(self) -> None:
        if self.event_shape != ():
            raise ValueError(
                f"the '{self.name}' family is for an angle (event shape ()), got {self.event_shape}"
            )


def _prior_scale(
    prior: torch.distributions.Distribution | None, event_shape: tuple[int, ...]
) -> torch.Tensor:
    """The prior's standard deviation per element of the site (``1`` where it has none that is finite)."""
    unit = torch.ones(event_shape)
    if prior is None:
        return unit
    try:
        stddev = prior.stddev.detach().to(unit)
    except (NotImplementedError, AttributeError, RuntimeError):
        return unit
    stddev = torch.broadcast_to(stddev, event_shape)
    return torch.where(torch.isfinite(stddev) & (stddev > 0), stddev, unit)


class NormalFamily(SiteFamily):
    """Diagonal Normal: location and log standard deviation per element (the paper's guide).

    The head works in units of the prior's standard deviation (``unit``): ``loc = unit * raw_loc``,
    ``scale = unit * exp(raw_log_scale)``, so ``q`` starts as wide as the prior, as in the original code,
    which sampled ``dx`` as a standard Normal times its prior scale. With a unit prior (``z``) this is the
    plain parameterization.
    """

    name = "normal"

    def __init__(self, event_shape: tuple[int, ...], unit: torch.Tensor | float = 1.0) -> None:
        super().__init__(event_shape)
        self.num_params = 2 * self.event_numel
        unit = torch.as_tensor(unit, dtype=torch.get_default_dtype())
        self.register_buffer("unit", torch.broadcast_to(unit, self.event_shape).clone(), persistent=False)

    @classmethod
    def for_prior(cls, event_shape: tuple[int, ...], prior: torch.distributions.Distribution | None):
        return cls(event_shape, _prior_scale(prior, tuple(event_shape)))

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        loc, log_scale = raw.chunk(2, dim=-1)
        shape = raw.shape[:-1] + self.event_shape
        normal = dist.Normal(self.unit * loc.reshape(shape), self.unit * log_scale.exp().reshape(shape))
        return normal.to_event(len(self.event_shape))


class LowRankNormalFamily(SiteFamily):
    """``LowRankMultivariateNormal``: covariance ``W W^T + diag(d)`` with ``rank`` columns in ``W``."""

    name = "lowrank_normal"

    def __init__(self, event_shape: tuple[int, ...], rank: int | None = None) -> None:
        super().__init__(event_shape)
        dim = self._check_vector()
        self.rank = rank if rank is not None else (1 if dim <= 2 else 2)
        if not 1 <= self.rank <= dim:
            raise ValueError(f"rank must be between 1 and {dim}, got {self.rank}")
        self.num_params = dim * (2 + self.rank)

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        dim = self.event_shape[0]
        loc, log_diag, factor = raw.split([dim, dim, dim * self.rank], dim=-1)
        factor = factor.unflatten(-1, (dim, self.rank))
        return dist.LowRankMultivariateNormal(loc, factor, log_diag.exp())


class FullNormalFamily(SiteFamily):
    """``MultivariateNormal`` with a full covariance through its Cholesky factor (diagonal kept
    positive by ``exp``, strictly lower part unconstrained)."""

    name = "full_normal"

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__(event_shape)
        dim = self._check_vector()
        self.num_params = dim + dim * (dim + 1) // 2
        rows, cols = torch.tril_indices(dim, dim, offset=-1)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        dim = self.event_shape[0]
        loc, log_diag, lower = raw.split([dim, dim, dim * (dim - 1) // 2], dim=-1)
        tril = raw.new_zeros(raw.shape[:-1] + (dim, dim))
        tril[..., self._rows, self._cols] = lower
        tril = tril + torch.diag_embed(log_diag.exp())
        return dist.MultivariateNormal(loc, scale_tril=tril)


class ConstrainedNormalFamily(SiteFamily):
    """A diagonal Normal in unconstrained space pushed through ``biject_to(support)``: a guide whose
    samples always lie in the prior's support (e.g. inside a box). Its point estimate is the image of
    the Normal's location (the median)."""

    name = "constrained_normal"

    def __init__(
        self, event_shape: tuple[int, ...], support: constraints.Constraint = constraints.real
    ) -> None:
        super().__init__(event_shape)
        self.num_params = 2 * self.event_numel
        self.support = support
        self.transform = biject_to(support)

    @classmethod
    def for_prior(cls, event_shape, prior):
        return cls(event_shape, constraints.real if prior is None else prior.support)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.support = _map_constraint(self.support, fn)
        self.transform = biject_to(self.support)
        return self

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        loc, log_scale = raw.chunk(2, dim=-1)
        shape = raw.shape[:-1] + self.event_shape
        base = dist.Normal(loc.reshape(shape), log_scale.exp().reshape(shape)).to_event(len(self.event_shape))
        return dist.TransformedDistribution(base, self.transform)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        loc = raw.chunk(2, dim=-1)[0].reshape(raw.shape[:-1] + self.event_shape)
        return self.transform(loc)


def _map_constraint(constraint, fn):
    """Move the tensors of an interval-type constraint with the module (``.to(device)``)."""
    if isinstance(constraint, constraints.independent):
        return constraints.independent(
            _map_constraint(constraint.base_constraint, fn), constraint.reinterpreted_batch_ndims
        )
    for attrs, build in (
        (("lower_bound", "upper_bound"), lambda a, b: type(constraint)(a, b)),
        (("lower_bound",), lambda a: type(constraint)(a)),
    ):
        values = [getattr(constraint, a, None) for a in attrs]
        if all(torch.is_tensor(v) for v in values):
            try:
                return build(*(fn(v) for v in values))
            except TypeError:
                return constraint
    return constraint


def _direction_angle(raw2: torch.Tensor) -> torch.Tensor:
    return torch.atan2(raw2[..., 1], raw2[..., 0])


class VonMisesFamily(SiteFamily):
    """``VonMises(loc, concentration)`` on the circle; ``loc`` is the angle of a 2-vector and the
    concentration is ``exp`` of the third output (capped at ``e^10``). Not reparameterized: use
    ``TraceGraph_ELBO``."""

    name = "von_mises"
    has_rsample = False
    circular = True

    def __init__(self, event_shape: tuple[int, ...] = ()) -> None:
        super().__init__(event_shape)
        self._check_angle()
        self.num_params = 3

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        return dist.VonMises(_direction_angle(raw[..., :2]), raw[..., 2].clamp(max=10.0).exp())

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return _direction_angle(raw[..., :2])


class ProjectedNormalFamily(SiteFamily):
    """The angle of a 2-D projected normal (:class:`ProjectedNormalAngle`); the two outputs are its
    concentration vector (direction = mean angle, length = certainty). Reparameterized."""

    name = "projected_normal"
    circular = True

    def __init__(self, event_shape: tuple[int, ...] = ()) -> None:
        super().__init__(event_shape)
        self._check_angle()
        self.num_params = 2

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        return ProjectedNormalAngle(raw)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return _direction_angle(raw)


class WrappedNormalFamily(SiteFamily):
    """A Normal wrapped onto the circle (:class:`WrappedNormal`). Reparameterized.

    ``angle="direction"`` (default): three outputs, the location is the angle of the first two and the
    third is the log scale. ``angle="real"``: two outputs ``(loc, log_scale)`` laid out (and scaled by
    ``unit``) exactly as the ``"normal"`` family's, so a trained Normal head can be read as its wrapped
    density (:func:`wrapped_theta`).
    """

    name = "wrapped_normal"
    circular = True

    def __init__(
        self, event_shape: tuple[int, ...] = (), *, angle: str = "direction", unit: torch.Tensor | float = 1.0
    ) -> None:
        super().__init__(event_shape)
        self._check_angle()
        if angle not in ("direction", "real"):
            raise ValueError(f"angle must be 'direction' or 'real', got {angle!r}")
        self.angle = angle
        self.num_params = 3 if angle == "direction" else 2
        self.register_buffer("unit", torch.as_tensor(unit, dtype=torch.get_default_dtype()), persistent=False)

    def _loc_scale(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.angle == "direction":
            return _direction_angle(raw[..., :2]), raw[..., 2].exp()
        return self.unit * raw[..., 0], self.unit * raw[..., 1].exp()

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        return WrappedNormal(*self._loc_scale(raw))

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        return wrap_angle(self._loc_scale(raw)[0])


FAMILIES: dict[str, type[SiteFamily]] = {
    family.name: family
    for family in (
        NormalFamily,
        LowRankNormalFamily,
        FullNormalFamily,
        ConstrainedNormalFamily,
        VonMisesFamily,
        ProjectedNormalFamily,
        WrappedNormalFamily,
    )
}


def make_family(
    family: str | SiteFamily,
    event_shape: tuple[int, ...],
    site: str,
    prior: torch.distributions.Distribution | None = None,
) -> SiteFamily:
    if isinstance(family, SiteFamily):
        if family.event_shape != tuple(event_shape):
            raise ValueError(
                f"family for site '{site}' has event shape {family.event_shape}, "
                f"the site needs {tuple(event_shape)}"
            )
        return family
    try:
        cls = FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"unknown family '{family}' for site '{site}'; expected one of {sorted(FAMILIES)}"
        ) from None
    try:
        return cls.for_prior(tuple(event_shape), prior)
    except ValueError as error:
        raise ValueError(f"site '{site}': {error}") from None


def _site_prior(model: SpatialVAE, site: str) -> torch.distributions.Distribution | None:
    module = getattr(model, f"{site}_prior", None)
    if module is None:
        return None
    return module.forward() if isinstance(module, PyroModule) else module()


def default_family(model: SpatialVAE, site: str) -> SiteFamily:
    """The family a guide uses for ``site`` when none is named: ``"normal"``, or ``"constrained_normal"``
    where the model's prior has a bounded support (e.g. a log-normal ``scale``)."""
    prior = _site_prior(model, site)
    bounded = prior is not None and not _is_real(prior.support)
    return make_family("constrained_normal" if bounded else "normal", model.latent_sites[site], site, prior)


class EncoderGuide(PyroModule):
    """What every guide of this package shares: an encoder reads each image once and gives ``q(site |
    image)`` for the latent sites of one :class:`SpatialVAE` (``model.latent_sites``), sampled inside the
    model's images plate at the model's site names; the guide holds none of the model's parameters.

    A subclass builds its networks and gives :meth:`sample_sites` (its ``pyro.sample`` statements) and
    :attr:`has_rsample`, and the summaries ``raw_params(images)`` (the networks' outputs, in the images'
    dtype), ``distributions(images, **model_inputs)`` (``q`` per site, batch shape ``(B,)``) and
    ``posterior_means(images, **model_inputs)`` (a point estimate per site and image), where
    ``model_inputs`` are what the model needs besides the images (``ctf``), for a guide that asks the model.
    Calling the guide (:meth:`forward`, :meth:`guide`) and :meth:`default_loss` are written here once.
    """

    #: whether a discrete site is summed out by enumeration, in the guide or in the model
    enumerates: bool = False

    def __init__(self, model: SpatialVAE, *, name: str | None = None) -> None:
        super().__init__(name=name or unique_name("guide"))
        self.image_shape = model.image_shape
        self.site_shapes = dict(model.latent_sites)

    @property
    def has_rsample(self) -> bool:
        """Whether every site the guide samples is reparameterized (else score-function gradients)."""
        raise NotImplementedError

    def default_loss(self, **kwargs) -> pyro.infer.ELBO:
        """The matching ELBO: ``TraceEnum_ELBO`` where a discrete site is enumerated, else ``Trace_ELBO``
        when every site is reparameterized, else ``TraceGraph_ELBO`` (score-function gradients,
        Rao-Blackwellized over the images plate)."""
        if self.enumerates:
            return TraceEnum_ELBO(max_plate_nesting=1, **kwargs)
        return Trace_ELBO(**kwargs) if self.has_rsample else TraceGraph_ELBO(**kwargs)

    def sample_sites(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample the guide's sites for ``images`` (run inside the images plate)."""
        raise NotImplementedError

    def forward(
        self,
        images: torch.Tensor,
        *,
        data_size: int | None = None,
        num_images: int | None = None,
        **model_only,
    ) -> dict[str, torch.Tensor]:
        """Sample the latent sites for ``images`` ``(B, C, H, W)`` in the model's images plate (the model's
        signature; keywords only the model uses, such as ``ctf``, are accepted and ignored)."""
        if images is None:
            raise ValueError("the guide needs the images it encodes")
        with images_plate(images.shape[0], data_size, images.device):
            return self.sample_sites(images)

    def guide(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The Pyro guide callable (the same as calling the module)."""
        return self(*args, **kwargs)


class AmortizedGuide(EncoderGuide):
    """Amortized variational posterior ``q(z, theta, dx | image)`` for a :class:`SpatialVAE`.

    ``encoder`` maps images ``(B, C, H, W)`` to features ``(B, F)`` (default: the paper's MLP; see
    :class:`~pyro_svae.encoders.CNNEncoder`); a linear head per latent site of ``model`` turns features
    into that site's distribution parameters. ``families`` maps site names to family names
    (:data:`FAMILIES`) or :class:`SiteFamily` instances. Unnamed sites use ``"normal"``, or
    ``"constrained_normal"`` where the model's prior has a bounded support (a family on the real line
    is refused there). A circular prior on ``theta`` with a real-line family gives a
    :class:`CircularSupportWarning` (see the module docstring). The guide reads the model's
    configuration but holds none of its parameters.
    """

    def __init__(
        self,
        model: SpatialVAE,
        encoder: nn.Module | None = None,
        *,
        families: Mapping[str, str | SiteFamily] | None = None,
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
        augment_rotation: bool = False,
        canonicalize: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(model, name=name)
        if getattr(model, "theta_bins", None) is not None:
            raise ValueError(
                "this model has a discrete rotation site 'theta_bin' (rotation_bins); use "
                "pyro_svae.pose_search.PoseSearchGuide for it"
            )
        families = dict(families or {})
        unknown = set(families) - set(model.latent_sites)
        if unknown:
            raise ValueError(
                f"families given for sites {sorted(unknown)} that the model does not have "
                f"(its latent sites: {list(model.latent_sites)})"
            )
        resolved: dict[str, SiteFamily] = {}
        for site, shape in self.site_shapes.items():
            prior = _site_prior(model, site)
            bounded = prior is not None and not _is_real(prior.support)
            if site in families:
                family = make_family(families[site], shape, site, prior)
            else:
                family = default_family(model, site)
            if bounded and _is_real(family.support):
                raise ValueError(
                    f"the prior of site '{site}' has support {prior.support}, but the "
                    f"'{family.name}' guide family puts mass on the whole real line (its samples would "
                    f"fall outside the prior's support); use 'constrained_normal' (the default there)"
                )
            if prior is not None and is_circular(prior) and not family.circular:
                warnings.warn(
                    f"the prior of '{site}' is circular ({type(prior).__name__}) but the guide family "
                    f"'{family.name}' lives on the real line: the ELBO is the circular one only while "
                    f"q({site}) is narrow (std << pi) and is not a bound otherwise; use a circular "
                    f"family ('projected_normal', 'wrapped_normal' or 'von_mises') for the exact ELBO",
                    CircularSupportWarning,
                    stacklevel=2,
                )
            resolved[site] = family
        if canonicalize not in CANONICALIZATIONS:
            raise ValueError(f"canonicalize must be one of {CANONICALIZATIONS}, got {canonicalize!r}")
        if augment_rotation and canonicalize:
            raise ValueError("canonicalize turns every image upright, so augment_rotation cannot apply")
        for option, chosen in (("augment_rotation", augment_rotation), ("canonicalize", canonicalize)):
            if not chosen:
                continue
            if "theta" not in self.site_shapes:
                raise ValueError(f"{option} needs a model with a rotation site 'theta'")
            if "dx" in resolved and not _is_real(resolved["dx"].support):
                raise ValueError(
                    f"{option} turns dx back by -alpha, which leaves a bounded dx support; "
                    "use a dx prior on the whole plane"
                )
        self.augment_rotation = bool(augment_rotation)
        self.canonicalize = canonicalize
        self.config = {
            "families": {site: family.name for site, family in resolved.items()},
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "activation": activation,
            "encoder": "mlp" if encoder is None else type(encoder).__name__,
            "augment_rotation": self.augment_rotation,
            "canonicalize": canonicalize,
        }
        if encoder is None:
            encoder = MLPEncoder(
                self.image_shape,
                hidden_dim=hidden_dim,
                num_layers=num_layers,
                activation=activation,
            )
        self.encoder = encoder
        features = getattr(encoder, "out_features", hidden_dim)
        self.families = nn.ModuleDict(resolved)
        self.heads = nn.ModuleDict(
            {site: nn.Linear(features, fam.num_params) for site, fam in self.families.items()}
        )
        if canonicalize:
            self._start_at_the_measured_pose()
        to_pyro_module_(self)

    def _start_at_the_measured_pose(self, relative_std: float = 0.1) -> None:
        """A canonicalizing guide starts ``q(theta')`` and ``q(dx')`` at zero (the measured pose) with a
        tenth of the prior's std, instead of as wide as the prior: the measurement is the better start,
        and a decoder that first sees every image in one frame learns the content's shape sooner."""
        for site in ("theta", "dx"):
            family = self.families[site] if site in self.families else None
            if not isinstance(family, NormalFamily):
                continue
            head = self.heads[site]
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
                head.bias[family.event_numel :] = math.log(relative_std)

    @property
    def has_rsample(self) -> bool:
        """Whether every site's family is reparameterizable (else use ``TraceGraph_ELBO``)."""
        return all(family.has_rsample for family in self.families.values())

    def raw_params(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained head outputs per site, ``(B, num_params)`` each, in the images' dtype (the encoder
        may run under autocast)."""
        features = self.encoder(images)
        return {site: head(features).to(images.dtype) for site, head in self.heads.items()}

    def _augmentation_angle(self, images: torch.Tensor) -> torch.Tensor | None:
        if not (self.augment_rotation and self.training):
            return None
        return (2.0 * torch.rand(images.shape[0], device=images.device) - 1.0) * math.pi

    def _reading_pose(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The pose ``(alpha (B,), shift (B, 2) or None)`` the encoder reads each image in
        (``transform_images(images, alpha, shift)``), or None to read it as it is."""
        if self.canonicalize == "moments":
            angle, centre = principal_pose(images)
            shift = RotateVector(-angle)(centre) if "dx" in self.site_shapes else None
            return -angle, None if shift is None else -shift
        alpha = self._augmentation_angle(images)
        return None if alpha is None else (alpha, None)

    def distributions(self, images: torch.Tensor, **model_inputs) -> dict[str, dist.Distribution]:
        """``q(site | image)`` for every site, batch shape ``(B,)`` (``model_inputs`` are not needed)."""
        pose = self._reading_pose(images)
        raw = self.raw_params(images if pose is None else transform_images(images, *pose))
        q = {site: self.families[site](raw[site]) for site in self.site_shapes}
        if pose is not None:  # the posterior of the posed copy, mapped back to the image's frame
            alpha, shift = pose
            q["theta"] = dist.TransformedDistribution(q["theta"], [AffineTransform(-alpha, 1.0)])
            if "dx" in q:
                back = [RotateVector(-alpha)]
                if shift is not None:
                    back.insert(0, AffineTransform(-shift, 1.0, event_dim=1))
                q["dx"] = dist.TransformedDistribution(q["dx"], back)
        return q

    def posterior_means(self, images: torch.Tensor, **model_inputs) -> dict[str, torch.Tensor]:
        """Point estimates per site: ``z`` ``(B, z_dim)``, ``theta`` ``(B,)``, ``dx`` ``(B, 2)`` (for a
        canonicalizing guide, mapped back from the canonical frame; rotation augmentation is off here)."""
        pose = self._reading_pose(images) if self.canonicalize else None
        raw = self.raw_params(images if pose is None else transform_images(images, *pose))
        means = {site: self.families[site].mean(raw[site]) for site in self.site_shapes}
        if pose is not None:
            alpha, shift = pose
            means["theta"] = wrap_angle(means["theta"] - alpha)
            if "dx" in means:
                means["dx"] = RotateVector(-alpha)(means["dx"] - shift)
        return means

    def sample_sites(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample every latent site of the model from ``q(site | image)``."""
        return {site: pyro.sample(site, q_site) for site, q_site in self.distributions(images).items()}


@contextlib.contextmanager
def wrapped_theta(guide: AmortizedGuide) -> Iterator[AmortizedGuide]:
    """Within the block, a ``"normal"`` ``theta`` head is read as the same Normal *wrapped* onto the
    circle (same samples modulo 2 pi, circular density): ``evaluate`` then gives a valid ELBO and
    importance-weighted bound against a circular prior. No parameter changes; other families are left
    as they are.

        with wrapped_theta(guide):
            report = evaluate(model, guide, test, num_particles=8)
    """
    family = guide.families["theta"] if "theta" in guide.families else None
    if not isinstance(family, NormalFamily):
        yield guide
        return
    guide.families["theta"] = WrappedNormalFamily((), angle="real", unit=family.unit)
    try:
        yield guide
    finally:
        guide.families["theta"] = family
