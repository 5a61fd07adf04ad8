"""Amortized guides: an encoder reads each image once; one head per site gives q(site | image).

The distribution family of each site is a constructor choice (:data:`FAMILIES`), so a guide can change
the family of one site without touching the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from .encoders import MLPEncoder
from .model import SpatialVAE, unique_name

__all__ = ["SiteFamily", "NormalFamily", "FAMILIES", "AmortizedGuide"]


class SiteFamily(nn.Module):
    """A distribution family for one site: ``forward(raw (..., num_params))`` -> distribution with
    batch shape ``(...)`` and the site's event shape."""

    num_params: int
    has_rsample: bool = True

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.event_numel = math.prod(self.event_shape)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """Posterior point estimate ``(..., *event_shape)`` (the mean, or circular mean for angles)."""
        return self(raw).mean


class NormalFamily(SiteFamily):
    """Diagonal Normal: location and log standard deviation per element (the paper's guide)."""

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__(event_shape)
        self.num_params = 2 * self.event_numel

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        loc, log_scale = raw.chunk(2, dim=-1)
        shape = raw.shape[:-1] + self.event_shape
        normal = dist.Normal(loc.reshape(shape), log_scale.exp().reshape(shape))
        return normal.to_event(len(self.event_shape))


FAMILIES: dict[str, type[SiteFamily]] = {"normal": NormalFamily}


def make_family(family: str | SiteFamily, event_shape: tuple[int, ...], site: str) -> SiteFamily:
    if isinstance(family, SiteFamily):
        if family.event_shape != tuple(event_shape):
            raise ValueError(
                f"family for site '{site}' has event shape {family.event_shape}, "
                f"the site needs {tuple(event_shape)}"
            )
        return family
    try:
        return FAMILIES[family](tuple(event_shape))
    except KeyError:
        raise ValueError(
            f"unknown family '{family}' for site '{site}'; expected one of {sorted(FAMILIES)}"
        ) from None


class AmortizedGuide(PyroModule):
    """Amortized variational posterior ``q(z, theta, dx | image)`` for a :class:`SpatialVAE`.

    ``encoder`` maps images ``(B, C, H, W)`` to features ``(B, F)`` (default: the paper's MLP); a linear
    head per latent site of ``model`` turns features into that site's distribution parameters.
    ``families`` maps site names to family names (``FAMILIES``) or :class:`SiteFamily` instances;
    unnamed sites use ``"normal"``. The guide reads the model's configuration but holds none of its
    parameters.
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
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or unique_name("guide"))
        families = dict(families or {})
        unknown = set(families) - set(model.latent_sites)
        if unknown:
            raise ValueError(
                f"families given for sites {sorted(unknown)} that the model does not have "
                f"(its latent sites: {list(model.latent_sites)})"
            )
        self.image_shape = model.image_shape
        self.site_shapes = dict(model.latent_sites)
        self.config = {
            "families": {s: f if isinstance(f, str) else type(f).__name__ for s, f in families.items()},
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "activation": activation,
            "encoder": "mlp" if encoder is None else type(encoder).__name__,
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
        self.families = nn.ModuleDict(
            {
                site: make_family(families.get(site, "normal"), shape, site)
                for site, shape in self.site_shapes.items()
            }
        )
        self.heads = nn.ModuleDict(
            {site: nn.Linear(features, fam.num_params) for site, fam in self.families.items()}
        )
        to_pyro_module_(self)

    @property
    def has_rsample(self) -> bool:
        """Whether every site's family is reparameterizable (else use ``TraceGraph_ELBO``)."""
        return all(family.has_rsample for family in self.families.values())

    def raw_params(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained head outputs per site, ``(B, num_params)`` each."""
        features = self.encoder(images)
        return {site: head(features) for site, head in self.heads.items()}

    def distributions(self, images: torch.Tensor) -> dict[str, dist.Distribution]:
        """``q(site | image)`` for every site, batch shape ``(B,)``."""
        raw = self.raw_params(images)
        return {site: self.families[site](raw[site]) for site in self.site_shapes}

    def posterior_means(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point estimates per site: ``z`` ``(B, z_dim)``, ``theta`` ``(B,)``, ``dx`` ``(B, 2)``."""
        raw = self.raw_params(images)
        return {site: self.families[site].mean(raw[site]) for site in self.site_shapes}

    def forward(
        self,
        images: torch.Tensor,
        *,
        data_size: int | None = None,
        num_images: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sample every latent site of the model for ``images`` ``(B, C, H, W)`` (the model's signature)."""
        if images is None:
            raise ValueError("the guide needs the images it encodes")
        batch = images.shape[0]
        q = self.distributions(images)
        subsample = None
        if data_size is not None:
            subsample = torch.arange(batch, device=images.device)
        values = {}
        with pyro.plate("images", data_size or batch, subsample=subsample):
            for site, q_site in q.items():
                values[site] = pyro.sample(site, q_site)
        return values

    def guide(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The Pyro guide callable (the same as calling the module)."""
        return self(*args, **kwargs)
