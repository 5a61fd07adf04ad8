"""Guides that search over rotation: a categorical posterior over rotation bins plus a continuous offset.

For a :class:`~pyro_svae.model.SpatialVAE` built with ``rotation_bins=K``:

* :class:`PoseSearchGuide` samples ``theta_bin ~ Categorical(logits(x))`` and
  ``theta | bin=k ~ N(centre_k + offset_k(x), scale_k(x))``. With ``mode="enumerate"`` the bin is
  marked for parallel enumeration and ``TraceEnum_ELBO`` sums over all K bins exactly (the decoder runs
  on K rotated grids at once); with ``mode="sample"`` it is sampled and ``TraceGraph_ELBO`` gives
  score-function gradients for it. With ``mode="marginal"`` (the default for a model built with
  ``enumerate_bins=True``) the guide has no bin at all: it gives ``theta_offset ~ N(offset(x), scale(x))``
  and the model sums over the bins itself, so the pose is found by the decoder's likelihood at every bin
  rather than predicted by the encoder (with the model's ``bin_render="lattice"``, the default there, one
  decoder pass serves every bin: :mod:`pyro_svae.lattice`); the encoder learns to read the bins the search
  finds (``DistilledSearchELBO``). ``guide.default_loss()`` returns the matching ELBO.
* :func:`grid_search_theta` poses each image where the model's own posterior is highest on a fine grid
  of angles, with its other latents held at given values (a guide's posterior means): the decoder's
  answer to "which turn of my template is this?", for any guide.
* :class:`RotationEquivariantEncoder` applies one CNN to K rotated copies of each image, so turning the
  image by one bin shifts its bin logits by one bin; content features are pooled over the copies (rotation
  invariant) and the position comes from a soft-argmax over the image (translation equivariant).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.nn.module import to_pyro_module_
from pyro.ops.indexing import Vindex
from torch import nn

from .coords import bin_centres, pixel_grid, transform_images, wrap_angle
from .encoders import MLPEncoder
from .guides import EncoderGuide, NormalFamily, default_family
from .infer import as_dataset, model_inputs, posterior_means, precision_context, resolve_precision
from .model import SpatialVAE, images_to_pixels
from .objectives import BIN_LOGITS_SITE, DEFAULT_DISTILL_BINS, DistilledSearchELBO

__all__ = [
    "RotationEquivariantEncoder",
    "PoseSearchGuide",
    "MODE_PREFIXES",
    "grid_search_theta",
    "search_theta",
    "local_offset",
]

#: short names of the guide modes, as the benchmarks spell them (``"enum-equivariant"``); ``"lattice"`` is
#: the marginal mode on a model that renders its bins through a lattice (``bin_render="lattice"``)
MODE_PREFIXES = {"enum": "enumerate", "sample": "sample", "marginal": "marginal", "lattice": "marginal"}


_AUXILIARY = {"is_auxiliary": True, "_deterministic": True}


def _no_latents(*args, **kwargs) -> None:
    """A guide with nothing to sample: the model is conditioned on every continuous latent."""


class RotationEquivariantEncoder(nn.Module):
    """A shared CNN over K rotated copies of each image.

    ``forward(images (B, C, H, W))`` returns a dict: ``bin_logits`` ``(B, K)`` (equivariant: rotating the
    input by ``2 pi / K`` rolls them by one bin), ``bin_features`` ``(B, K, F)`` (per-bin features for the
    angle offset), ``features`` ``(B, 2 F)`` (rotation-invariant content features: attention- and
    max-pooled over copies) and ``position`` ``(B, 2)`` (soft-argmax of a heat map over the image, in grid
    units).

    ``copy_size``: the K copies are made at most this many pixels on a side (the image resampled with
    antialiasing first): the CNN over K copies costs K times one CNN, most of a search's step at 32 x 32
    and beyond, and the decoder's search refines the pose anyway. ``None``: the image's own size.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        bins: int,
        *,
        channels: int = 32,
        num_conv: int = 3,
        copy_size: int | None = None,
    ) -> None:
        super().__init__()
        if bins < 2 or channels < 1 or num_conv < 1:
            raise ValueError(
                f"bins >= 2, channels >= 1, num_conv >= 1 needed, got {bins}, {channels}, {num_conv}"
            )
        if copy_size is not None and (
            isinstance(copy_size, bool) or not isinstance(copy_size, int) or copy_size < 4
        ):
            raise ValueError(f"copy_size must be an integer >= 4 (pixels) or None, got {copy_size!r}")
        in_channels, height, width = image_shape
        self.copy_shape = None
        if copy_size is not None and max(height, width) > copy_size:
            shrink = copy_size / max(height, width)
            height, width = max(round(height * shrink), 1), max(round(width * shrink), 1)
            self.copy_shape = (height, width)
        layers: list[nn.Module] = []
        for i in range(num_conv):
            kernel = 5 if i == 0 else 3
            # the second convolution halves the resolution: the K copies make this encoder K times the cost
            # of one CNN, and orientation is readable from the coarser maps
            stride = 2 if i == 1 else 1
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, kernel, stride, padding=kernel // 2)
            ]
            layers += [nn.ReLU()]
        self.cnn = nn.Sequential(*layers)
        # a coarse spatial layout (not a global mean) keeps the per-copy features orientation-selective
        self.per_copy = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * channels, channels), nn.ReLU()
        )
        self.score = nn.Linear(channels, 1)
        self.heat = nn.Conv2d(channels, 1, 1, bias=False)  # a bias would cancel in the softmax
        self.bins = bins
        self.out_features = 2 * channels
        self.bin_feature_dim = channels
        self.register_buffer("centres", bin_centres(bins), persistent=False)
        map_height, map_width = self.cnn(torch.zeros(1, in_channels, height, width)).shape[-2:]
        self.register_buffer("grid", pixel_grid(map_height, map_width), persistent=False)

    def rotated_copies(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, K, C, H, W)``: copy ``k`` is the image turned by ``-centre_k`` (copy 0 is the image), at
        most ``copy_size`` pixels on a side."""
        if self.copy_shape is not None:
            images = F.interpolate(images, size=self.copy_shape, mode="bilinear", antialias=True)
        batch = images.shape[0]
        repeated = images.repeat_interleave(self.bins, dim=0)
        angles = (-self.centres).repeat(batch).to(images.dtype)
        return transform_images(repeated, angles).unflatten(0, (batch, self.bins))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        maps = self.cnn(self.rotated_copies(images).flatten(0, 1))  # (B K, F, H, W)
        pooled = self.per_copy(maps).unflatten(0, (batch, self.bins))  # (B, K, F)
        logits = self.score(pooled).squeeze(-1)
        attention = torch.softmax(logits, -1).unsqueeze(-1)
        features = torch.cat([(attention * pooled).sum(1), pooled.amax(1)], dim=-1)
        heat = self.heat(maps.unflatten(0, (batch, self.bins))[:, 0]).flatten(1)  # copy 0: the image
        position = torch.softmax(heat, -1) @ self.grid.to(heat.dtype)
        return {"bin_logits": logits, "bin_features": pooled, "features": features, "position": position}


def local_offset(
    bin_logits: torch.Tensor, per_bin: torch.Tensor, reach: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """One offset from K copies' own estimates (marginal mode's shared ``theta_offset``).

    ``bin_logits`` ``(B, K)``; ``per_bin`` ``(B, K, 2)``: each copy's offset from its bin's centre and its
    log scale. Returns ``(offset, log_scale)``, each ``(B,)``: the circular mean of the angles that the
    most probable bin and its ``reach`` neighbours on either side give (``centre_j + offset_j``), weighted
    by their probabilities, relative to the most probable bin's centre. A turn of the image by a fraction
    of a bin moves it by that fraction, also where the probability is split between neighbouring bins
    (an average of their offsets would fall half a bin off there), and a bin across the circle (a digit
    turned by pi) does not pull it. The probabilities are held fixed: they are fitted to the model's
    search (``DistilledSearchELBO``), and the ELBO's pull through them would flatten them.
    """
    bins = bin_logits.shape[-1]
    probs = torch.softmax(bin_logits.detach().float(), -1)
    steps = torch.arange(-reach, reach + 1, device=bin_logits.device)
    near = (probs.argmax(-1, keepdim=True) + steps) % bins  # (B, 2 reach + 1)
    weights = probs.gather(-1, near).to(per_bin.dtype)
    # each nearby copy's angle measured from the best bin's centre
    angles = per_bin[..., 0].gather(-1, near) + steps.to(per_bin.dtype) * (2 * math.pi / bins)
    offset = torch.atan2((weights * angles.sin()).sum(-1), (weights * angles.cos()).sum(-1))
    log_scale = (weights * per_bin[..., 1].gather(-1, near)).sum(-1) / weights.sum(-1)
    return offset, log_scale


class PoseSearchGuide(EncoderGuide):
    """Amortized guide with a categorical posterior over rotation bins (see the module docstring).

    ``encoder``: ``"mlp"`` (the paper's network; bin logits from a linear head) or ``"equivariant"``
    (:class:`RotationEquivariantEncoder` of ``channels``, its copies at most ``copy_size`` pixels), or a
    module with either interface.

    In marginal mode the encoder still gives bin logits, its own guess at the search's bins: its default
    loss (:class:`~pyro_svae.objectives.DistilledSearchELBO`, weight ``distill_bins``; 0 for the plain
    ``TraceEnum_ELBO``) fits them to the model's bin posterior in every step. ``bins_from`` (an attribute,
    ``"search"`` or ``"encoder"``) says whose bins :meth:`posterior_means` and :meth:`distributions` use:
    the decoder's likelihood at every bin, or the encoder's logits alone (no decoder pass: amortized).
    """

    def __init__(
        self,
        model: SpatialVAE,
        encoder: str | nn.Module = "equivariant",
        *,
        mode: str | None = None,
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
        channels: int = 32,
        copy_size: int | None = None,
        distill_bins: float = DEFAULT_DISTILL_BINS,
        bins_from: str = "search",
        name: str | None = None,
    ) -> None:
        super().__init__(model, name=name)
        if model.theta_bins is None:
            raise ValueError("PoseSearchGuide needs a model built with rotation_bins=K")
        if mode is None:
            mode = "marginal" if model.enumerate_bins else "enumerate"
        if mode not in ("enumerate", "sample", "marginal"):
            raise ValueError(f"mode must be 'enumerate', 'sample' or 'marginal', got {mode!r}")
        if (mode == "marginal") != model.enumerate_bins:
            raise ValueError(
                "mode='marginal' goes with a model that sums over its bins (enumerate_bins=True) and "
                f"the other modes with one that does not; got mode={mode!r}, "
                f"enumerate_bins={model.enumerate_bins}"
            )
        if not distill_bins >= 0:
            raise ValueError(f"distill_bins must be >= 0 (a weight), got {distill_bins!r}")
        self.mode = mode
        self.distill_bins = float(distill_bins)
        self.bins_from = bins_from  # checked where it is read: it may be set later
        if mode == "marginal":  # the bin posterior is the model's; kept out of the module tree
            object.__setattr__(self, "search_model", model)
        self.bins = bins = model.rotation_bins
        self.bin_scale_init = model.theta_bins.bin_scale
        if encoder == "mlp":
            encoder = MLPEncoder(
                self.image_shape, hidden_dim=hidden_dim, num_layers=num_layers, activation=activation
            )
        elif encoder == "equivariant":
            encoder = RotationEquivariantEncoder(
                self.image_shape, bins, channels=channels, copy_size=copy_size
            )
        self.encoder = encoder
        self.config = {
            "encoder": type(encoder).__name__,
            "mode": mode,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "activation": activation,
            "channels": channels,
            "copy_size": copy_size,
            "distill_bins": self.distill_bins,
        }
        features = encoder.out_features
        self.structured = hasattr(encoder, "bin_feature_dim")
        self.z_family = NormalFamily((model.z_dim,))
        self.z_head = nn.Linear(features, self.z_family.num_params)
        if mode == "marginal" and not self.structured:
            self.offset_head = nn.Linear(features, 2)  # the offset shared by all bins: loc, log scale
            self.bin_head = nn.Linear(features, bins)  # the encoder's own bins, fitted to the search's
        elif self.structured:
            self.offset_head = nn.Linear(encoder.bin_feature_dim, 2)  # per bin: offset, log scale
        else:
            self.bin_head = nn.Linear(features, bins)
            self.offset_head = nn.Linear(features, 2 * bins)
        self.translate = "dx" in self.site_shapes
        if self.translate:
            self.dx_family = NormalFamily.for_prior((2,), model.dx_prior())
            self.dx_head = nn.Linear(features, self.dx_family.num_params)
        # further pose sites (e.g. ``scale``) are rotation invariant: read from the pooled features
        pose = ("z", "theta_bin", "theta", "theta_offset", "dx")
        other = [site for site in self.site_shapes if site not in pose]
        self.other_families = nn.ModuleDict({site: default_family(model, site) for site in other})
        self.other_heads = nn.ModuleDict(
            {site: nn.Linear(features, fam.num_params) for site, fam in self.other_families.items()}
        )
        self.register_buffer("centres", bin_centres(bins), persistent=False)
        to_pyro_module_(self)

    #: the bin is sampled (``mode="sample"``): score-function gradients, ``TraceGraph_ELBO``
    has_rsample = False

    @property
    def enumerates(self) -> bool:
        """Whether the bin is summed out (``TraceEnum_ELBO``): by the guide (``"enumerate"``) or the model
        (``"marginal"``)."""
        return self.mode in ("enumerate", "marginal")

    def raw_params(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``bin_logits`` ``(B, K)`` (in marginal mode the encoder's own guess at the search's bins),
        ``offset`` / ``log_scale`` ``(B, K)`` (``(B,)`` in marginal mode), ``z`` and ``dx`` head outputs."""
        encoded = self.encoder(images)
        dtype = images.dtype  # under autocast the networks' outputs may be low precision
        if isinstance(encoded, dict):
            encoded = {key: value.to(dtype) for key, value in encoded.items()}
        else:
            encoded = encoded.to(dtype)
        features = encoded["features"] if self.structured else encoded
        raw: dict[str, torch.Tensor] = {}
        if self.mode == "marginal" and self.structured:
            per_bin = self.offset_head(encoded["bin_features"]).to(dtype)  # (B, K, 2)
            offset, log_scale = local_offset(encoded["bin_logits"], per_bin)
            raw["bin_logits"] = encoded["bin_logits"]
        elif self.mode == "marginal":
            offset, log_scale = self.offset_head(features).to(dtype).unbind(-1)
            raw["bin_logits"] = self.bin_head(features).to(dtype)
        elif self.structured:
            offset, log_scale = self.offset_head(encoded["bin_features"]).to(dtype).unbind(-1)
            raw["bin_logits"] = encoded["bin_logits"]
        else:
            raw["bin_logits"] = self.bin_head(features).to(dtype)
            offset, log_scale = self.offset_head(features).to(dtype).chunk(2, -1)
        raw["offset"] = offset
        raw["log_scale"] = log_scale + math.log(self.bin_scale_init)
        raw["z"] = self.z_head(features).to(dtype)
        if self.translate:
            dx_raw = self.dx_head(features).to(dtype)
            if self.structured:  # the soft-argmax position is the equivariant part of the mean
                dx_raw = torch.cat([dx_raw[..., :2] + encoded["position"], dx_raw[..., 2:]], -1)
            raw["dx"] = dx_raw
        for site, head in self.other_heads.items():
            raw[site] = head(features).to(dtype)
        return raw

    def distributions(self, images: torch.Tensor, **model_inputs) -> dict[str, dist.Distribution]:
        """``q`` per site, batch ``(B,)``; ``theta`` is the marginal mixture over bins. In marginal mode the
        bins are the model's: ``theta_offset`` is the guide's, and ``theta_bin`` / ``theta`` use the bin
        posterior of :meth:`bin_posterior` (which needs the model's inputs, ``ctf``)."""
        raw = self.raw_params(images)
        q = {"z": self.z_family(raw["z"])}
        scale = raw["log_scale"].exp()
        if self.mode == "marginal":
            q["theta_offset"] = dist.Normal(raw["offset"], scale)
            bins = dist.Categorical(probs=self._bin_probs(images, raw, model_inputs))
            loc = self.centres + raw["offset"].unsqueeze(-1)
            scale = scale.unsqueeze(-1).expand(loc.shape)
        else:
            bins, loc = dist.Categorical(logits=raw["bin_logits"]), self.centres + raw["offset"]
        q["theta_bin"] = bins
        q["theta"] = dist.MixtureSameFamily(bins, dist.Normal(loc, scale))
        if self.translate:
            q["dx"] = self.dx_family(raw["dx"])
        for site, family in self.other_families.items():
            q[site] = family(raw[site])
        return q

    def posterior_means(self, images: torch.Tensor, **model_inputs) -> dict[str, torch.Tensor]:
        """Point summaries per image: ``z`` and ``dx`` means; ``theta``: the angle of the most probable bin
        (the posterior over bins is often multi-modal, e.g. turned by pi for elongated digits, where a
        circular mean falls between the modes); ``theta_circular_mean`` of the whole mixture; the
        ``theta_bin`` mode. In marginal mode the bins' probabilities are the model's given the other
        latents at their means (:meth:`bin_posterior`, which needs the model's inputs, ``ctf``)."""
        raw = self.raw_params(images)
        if self.mode == "marginal":
            probs = self._bin_probs(images, raw, model_inputs)
            angle = self.centres + raw["offset"].unsqueeze(-1)
        else:
            probs = torch.softmax(raw["bin_logits"], -1)
            angle = self.centres + raw["offset"]
        best = probs.argmax(-1, keepdim=True)
        cos = (probs * torch.cos(angle)).sum(-1)
        sin = (probs * torch.sin(angle)).sum(-1)
        return {
            **self.continuous_means(raw),
            "theta": wrap_angle(angle.gather(-1, best).squeeze(-1)),
            "theta_circular_mean": torch.atan2(sin, cos),
            "theta_bin": best.squeeze(-1),
        }

    def continuous_means(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Means of the sites the guide samples besides the bin: ``z``, ``dx``, others (marginal mode:
        ``theta_offset`` too)."""
        means = {"z": self.z_family.mean(raw["z"])}
        if self.mode == "marginal":
            means["theta_offset"] = raw["offset"]
        if self.translate:
            means["dx"] = self.dx_family.mean(raw["dx"])
        for site, family in self.other_families.items():
            means[site] = family.mean(raw[site])
        return means

    def _bin_probs(self, images: torch.Tensor, raw: dict, model_inputs: dict) -> torch.Tensor:
        """Marginal mode: the bins' probabilities ``(B, K)`` from where :attr:`bins_from` says."""
        if self.bins_from == "encoder":
            return torch.softmax(raw["bin_logits"], -1)
        if self.bins_from != "search":
            raise ValueError(f"bins_from must be 'search' or 'encoder', got {self.bins_from!r}")
        return self.bin_posterior(images, raw, **model_inputs)

    def default_loss(self, **kwargs) -> pyro.infer.ELBO:
        """``TraceEnum_ELBO``; in marginal mode with ``distill_bins > 0`` the ELBO plus the encoder's bins
        fitted to the search's (:class:`~pyro_svae.objectives.DistilledSearchELBO`)."""
        if self.mode == "marginal" and self.distill_bins > 0:
            return DistilledSearchELBO(weight=self.distill_bins, **kwargs)
        return super().default_loss(**kwargs)

    @torch.no_grad()
    def bin_posterior(
        self, images: torch.Tensor, raw: dict[str, torch.Tensor] | None = None, **model_inputs
    ) -> torch.Tensor:
        """Marginal mode: ``p(bin | image, other latents at the guide's means)`` ``(B, K)``, from the model's
        likelihood at every bin (``TraceEnum_ELBO.compute_marginals``). ``model_inputs``: what the model
        needs besides the images (``ctf`` rows)."""
        if self.mode != "marginal":
            raise ValueError("bin_posterior is the model's posterior over bins: it needs mode='marginal'")
        raw = self.raw_params(images) if raw is None else raw
        means = self.continuous_means(raw)
        model = self.search_model
        # the decoder renders every image at all K angles: bound the activations held at once
        _, height, width = self.image_shape
        chunk = max(1, 2**25 // (self.bins * height * width * model.config["hidden_dim"]))
        marginals = TraceEnum_ELBO(max_plate_nesting=1)
        probs = []
        for index in torch.arange(images.shape[0], device=images.device).split(chunk):
            conditioned = poutine.condition(model, data={site: value[index] for site, value in means.items()})
            inputs = {key: value[index] for key, value in model_inputs.items()}
            found = marginals.compute_marginals(conditioned, _no_latents, images[index], **inputs)
            probs.append(found["theta_bin"].probs.reshape(len(index), self.bins))
        return torch.cat(probs).to(images.dtype)

    def sample_sites(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample ``z``, ``theta_bin`` and ``theta`` (marginal mode: ``theta_offset``), ``dx``, others."""
        raw = self.raw_params(images)
        infer = {"enumerate": "parallel"} if self.mode == "enumerate" else {}
        values = {"z": pyro.sample("z", self.z_family(raw["z"]))}
        if self.mode == "marginal":
            offset = dist.Normal(raw["offset"], raw["log_scale"].exp())
            values["theta_offset"] = pyro.sample("theta_offset", offset)
            # not a latent (log-density 0): what DistilledSearchELBO fits to the model's bin posterior
            logits = raw["bin_logits"]
            pyro.sample(BIN_LOGITS_SITE, dist.Delta(logits, event_dim=1), obs=logits, infer=_AUXILIARY)
        else:
            values.update(self._sample_bin_and_theta(raw, infer))
        if self.translate:
            values["dx"] = pyro.sample("dx", self.dx_family(raw["dx"]))
        for site, family in self.other_families.items():
            values[site] = pyro.sample(site, family(raw[site]))
        return values

    def _sample_bin_and_theta(self, raw: dict, infer: dict) -> dict[str, torch.Tensor]:
        index = pyro.sample("theta_bin", dist.Categorical(logits=raw["bin_logits"]), infer=infer)
        loc = self.centres[index] + Vindex(raw["offset"])[..., index]
        scale = Vindex(raw["log_scale"])[..., index].exp()
        return {"theta_bin": index, "theta": pyro.sample("theta", dist.Normal(loc, scale))}


@torch.no_grad()
def grid_search_theta(
    model: SpatialVAE,
    images: torch.Tensor,
    latents: dict[str, torch.Tensor],
    *,
    angles: int = 72,
    ctf=None,
) -> torch.Tensor:
    """The rotation at which ``model`` finds each image most probable, searched over ``angles`` evenly
    spaced angles of the circle: ``argmax_theta log p(image | z, theta, dx, scale) + log p(theta)``
    ``(B,)``, with the other latents fixed at ``latents`` (``z`` ``(B, z_dim)`` and, where the model has
    them, ``dx`` ``(B, 2)`` and ``scale`` ``(B,)``; e.g. ``posterior_means(guide, data)``). ``images``
    ``(B, C, H, W)``; ``ctf``: the images' CTF rows for a model with ``ctf=True``.

    An encoder estimates the angle in one pass; this asks the decoder, one rendering per angle, so it
    costs ``angles`` decoder passes per image, and its resolution is the grid step (5 degrees at 72).
    """
    if model.vanilla or not model.rotate:
        raise ValueError("grid_search_theta needs a spatial model that infers rotation")
    if angles < 2:
        raise ValueError(f"angles must be >= 2, got {angles}")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(model.image_shape):
        raise ValueError(
            f"expected images of shape (B, {', '.join(map(str, model.image_shape))}), "
            f"got {tuple(images.shape)}"
        )
    if model.ctf and ctf is None:
        raise ValueError("this model applies a CTF: pass the images' ctf rows")
    needed = ["z"] + ["dx"] * model.translate + ["scale"] * model.scale
    missing = [site for site in needed if site not in latents]
    if missing:
        raise ValueError(f"latents must hold {needed} for this model; {missing} missing")
    if any(len(latents[site]) != len(images) for site in needed):
        raise ValueError(f"latents must hold one row per image ({len(images)})")
    device = model.grid.device
    images = images.to(device)
    obs = images_to_pixels(images)
    z = latents["z"].to(device)
    dx = latents["dx"].to(device) if model.translate else None
    scale = latents["scale"].to(device) if model.scale else None
    grid = bin_centres(angles, device=device, dtype=model.grid.dtype)
    log_prior = model.theta_prior().log_prob(grid)
    scores = []
    for angle, prior in zip(grid, log_prior.expand(grid.shape), strict=True):
        theta = angle.expand(images.shape[0])
        params = model.filter_mean(model.render(z, theta, dx, scale), ctf=ctf if model.ctf else None)
        scores.append(model.likelihood(params).log_prob(obs) + prior)
    return grid[torch.stack(scores, -1).argmax(-1)]


@torch.no_grad()
def search_theta(
    model: SpatialVAE,
    guide,
    data,
    *,
    angles: int = 72,
    batch_size: int = 500,
    precision: str = "fp32",
) -> torch.Tensor:
    """:func:`grid_search_theta` over a whole data set, the other latents at ``guide``'s posterior means:
    the model's most probable angle for each image ``(N,)``, on the CPU. ``data``: an
    :class:`~pyro_svae.data.ImageDataset` (with its CTF rows for a model with ``ctf=True``) or images
    ``(N, C, H, W)``; ``batch_size`` images are rendered at every angle at a time; ``precision`` as in
    :func:`pyro_svae.fit` (the decoder under autocast)."""
    data = as_dataset(data, model.image_shape)
    device = model.grid.device
    precision = resolve_precision(precision, device)
    latents = posterior_means(guide, data, batch_size=batch_size)
    found = []
    with precision_context(precision, device):
        for index in torch.arange(len(data)).split(batch_size):
            rows = {site: value[index] for site, value in latents.items()}
            ctf = model_inputs(model, data, index, device).get("ctf")
            found.append(grid_search_theta(model, data.images[index], rows, angles=angles, ctf=ctf).cpu())
    return torch.cat(found)
