"""``SpatialVAE``: the generative program of spatial-VAE (and its vanilla-VAE baseline)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pyro
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from .coords import pixel_grid, pose_coordinates
from .ctf import CTFParams
from .decoders import SpatialDecoder, VanillaDecoder
from .lattice import RenderLattice, lattice_radius, resolve_bin_render
from .likelihoods import LearnedGaussianLikelihood, make_likelihood
from .optics import Optics
from .priors import (
    BinnedRotationPrior,
    LearnableLogNormalScale,
    as_prior,
    log_normal_scale,
    normal_dx,
    normal_theta,
    standard_normal_z,
)

__all__ = ["SpatialVAE", "unique_name", "images_to_pixels", "pixels_to_images"]

_NAME_COUNTERS: dict[str, itertools.count] = {}


def unique_name(base: str) -> str:
    """``base`` for the first module of a kind, ``base_1``, ``base_2``… after, so that two models in one
    session never share parameters in Pyro's global param store (same-named roots would)."""
    index = next(_NAME_COUNTERS.setdefault(base, itertools.count()))
    return base if index == 0 else f"{base}_{index}"


def images_to_pixels(images: torch.Tensor) -> torch.Tensor:
    """``(..., C, H, W)`` -> ``(..., H * W, C)``, pixels in the order of :func:`pixel_grid`."""
    return images.flatten(-2).transpose(-1, -2)


def pixels_to_images(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(..., H * W, C)`` -> ``(..., C, H, W)``."""
    return pixels.transpose(-1, -2).unflatten(-1, (height, width))


def _learned_scale_prior_name(prior: object) -> str | None:
    """The name that rebuilds a :class:`~pyro_svae.priors.LearnableLogNormalScale` (``None`` for others)."""
    if not isinstance(prior, LearnableLogNormalScale):
        return None
    return "learned_std" if prior.learn_std else "learned"


def _scale_prior(
    prior: torch.distributions.Distribution | nn.Module | str | None, std: float
) -> tuple[torch.distributions.Distribution | nn.Module | None, float]:
    """The scale prior given by name built, and the std the config records for it."""
    if isinstance(prior, str):
        prior = LearnableLogNormalScale(std=std, learn_std=prior == "learned_std")
    if isinstance(prior, LearnableLogNormalScale):  # the config rebuilds it with its own std
        std = prior.initial_std
    return prior, std


def images_plate(batch: int, data_size: int | None, device: torch.device) -> pyro.plate:
    """The ``"images"`` plate over a mini-batch of ``batch`` images; with ``data_size`` the batch stands for
    a data set of that many images and log-densities are scaled by ``data_size / batch``. Model and
    guides all use it, so their plates agree."""
    subsample = None if data_size is None else torch.arange(batch, device=device)
    return pyro.plate("images", data_size or batch, subsample=subsample)


class SpatialVAE(PyroModule):
    """spatial-VAE as a Pyro program.

    For a batch of images ``(B, C, H, W)`` the program samples, inside ``pyro.plate("images", ...)``:
    ``z`` (event ``(z_dim,)``), ``theta`` (event ``()``, when ``rotate``), ``dx`` (event ``(2,)``, when
    ``translate``), renders every pixel with the spatial decoder at the posed coordinates, passes the
    rendered mean through the instrument's :attr:`optics` and scores the images at ``obs`` (event
    ``(H * W, C)``). ``vanilla=True`` gives the baseline VAE whose decoder sees ``z`` alone (no pose sites).

    Priors default to the paper's, ``z ~ N(0, I)``, ``theta ~ N(0, theta_prior_std)``,
    ``dx ~ N(0, dx_prior_std I)``; any distribution (or module returning one) with the site's event shape
    may be passed instead and moves with the module to its device.

    ``scale=True`` adds a magnification site ``scale`` (event ``()``, prior ``LogNormal(0,
    scale_prior_std)`` by default or any positive distribution; ``scale_prior="learned"`` is
    :class:`~pyro_svae.priors.LearnableLogNormalScale` of that std, whose location is fitted
    (``"learned_std"``: its spread too); such a prior, by name or as a module, is recorded in ``config``
    so runs and checkpoints rebuild it): coordinates become ``x R(theta) s + dx`` in the paper's
    notation (the content is magnified by ``s``).

    Image formation (:mod:`pyro_svae.optics`): the decoder renders the whole clean image, and the
    instrument's filters act on its mean before a Gaussian likelihood (``"gaussian"``,
    ``"gaussian_learned"`` or ``"gaussian_pixel"``) scores it (:meth:`filter_mean`).
    ``psf_fwhm`` (pixels) makes it a telescope's: a round Gaussian point-spread function of that FWHM blurs
    the galaxy rendered above the atmosphere and the optics (the vanilla decoder's images can be blurred
    too). A PSF is fixed in pixels, so a small galaxy looks blurrier than a large one of the same shape,
    which a decoder of the clean image at a ``scale`` cannot draw without it. ``ctf=True`` makes it a
    cryo-EM microscope's: each image's contrast transfer function (``forward(..., ctf=CTFParams)``,
    computed on the fly in RELION's convention, :mod:`pyro_svae.ctf`) filters it, after the PSF if any.

    ``pixel_subsample = k`` (spatial decoder only, without optics) renders and scores ``k`` random pixels
    per image in training mode, inside ``pyro.plate("pixels", H * W, subsample_size=k)``: an unbiased
    estimate of the same ELBO at about ``k / (H W)`` of the decoder's cost. In ``eval()`` mode every pixel is
    scored, so :func:`~pyro_svae.infer.evaluate` reports the exact ELBO.

    ``coord_frequency`` scales the spatial decoder's initial coordinate weights
    (:class:`~pyro_svae.decoders.SpatialDecoder`; about ``1 / size`` for objects of ``size`` grid units).

    ``compile=True`` runs the decoder through ``torch.compile`` (see ``benchmarks/throughput.py --speed``
    for when it pays).

    ``rotation_bins = K`` splits the theta prior into K bins (:attr:`theta_bins`, a
    :class:`~pyro_svae.priors.BinnedRotationPrior`): a discrete site ``theta_bin`` before ``theta``, which
    guides enumerate (``TraceEnum_ELBO``) or sample (``TraceGraph_ELBO``); see :mod:`pyro_svae.pose_search`.
    ``enumerate_bins=True`` (with ``rotation_bins``) moves the search into the model: ``theta = centre_k +
    theta_offset`` with ``theta_offset`` the continuous site, ``theta_bin`` marked for parallel enumeration
    and ``theta`` deterministic; the guide gives ``z``, ``theta_offset`` and ``dx`` only, and the bin's
    posterior given them comes from ``TraceEnum_ELBO.compute_marginals``
    (:meth:`~pyro_svae.pose_search.PoseSearchGuide.bin_posterior`). ``bin_render``
    (:data:`~pyro_svae.lattice.BIN_RENDERS`) says how the K bins are rendered there: ``"exact"`` runs the
    decoder at each bin's posed grid (K decoder passes per image); ``"lattice"`` (the default) renders each
    image once, turned by its ``theta_offset``, on a :class:`~pyro_svae.lattice.RenderLattice` and reads
    every bin's image from it by bilinear interpolation (:meth:`render_binned`): about one pass's cost at
    any K. Its lattice covers a round field of view of radius 1.1 (the image spans [-1, 1]), so the corners
    of a turned image continue its rim outwards; ``"lattice_full"`` covers every turn of the square, at
    about 2.4 passes.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int = 2,
        *,
        rotate: bool | None = None,
        translate: bool | None = None,
        vanilla: bool = False,
        z_prior: torch.distributions.Distribution | nn.Module | None = None,
        theta_prior: torch.distributions.Distribution | nn.Module | None = None,
        dx_prior: torch.distributions.Distribution | nn.Module | None = None,
        theta_prior_std: float = math.pi / 4,
        dx_prior_std: float = 0.1,
        rotation_bins: int | None = None,
        enumerate_bins: bool = False,
        bin_render: str | None = None,
        scale: bool = False,
        scale_prior: torch.distributions.Distribution | nn.Module | str | None = None,
        scale_prior_std: float = 0.25,
        ctf: bool = False,
        psf_fwhm: float | None = None,
        pixel_subsample: int | None = None,
        compile: bool = False,
        coord_frequency: float = 1.0,
        likelihood: str | nn.Module = "bernoulli",
        hidden_dim: int = 500,
        num_layers: int = 2,
        activation: str = "tanh",
        name: str | None = None,
    ) -> None:
        super().__init__(name=name or unique_name("svae"))
        from .configs import as_image_shape, check_model_options  # configs imports this module

        options = {  # plain values, ModelConfig's fields
            "image_shape": as_image_shape(image_shape),
            "z_dim": z_dim,
            "rotate": (not vanilla) if rotate is None else rotate,
            "translate": (not vanilla) if translate is None else translate,
            "vanilla": vanilla,
            "theta_prior_std": theta_prior_std,
            "dx_prior_std": dx_prior_std,
            "rotation_bins": rotation_bins,
            "enumerate_bins": enumerate_bins,
            "bin_render": resolve_bin_render(bin_render, enumerate_bins),
            "scale": scale or scale_prior is not None,
            "scale_prior_std": scale_prior_std,
            "scale_prior": scale_prior,
            "ctf": ctf,
            "psf_fwhm": psf_fwhm,
            "pixel_subsample": pixel_subsample,
            "compile": compile,
            "coord_frequency": coord_frequency,
            "likelihood": likelihood,
            "hidden_dim": hidden_dim,
            "num_layers": num_layers,
            "activation": activation,
        }
        priors = {"z_prior": z_prior, "theta_prior": theta_prior, "dx_prior": dx_prior}
        check_model_options({**options, **priors}, objects=True)
        scale_prior, scale_prior_std = _scale_prior(scale_prior, scale_prior_std)
        self.image_shape = options["image_shape"]
        channels, height, width = self.image_shape
        self.z_dim = z_dim
        self.vanilla = vanilla
        self.rotate = options["rotate"]
        self.translate = options["translate"]
        self.scale = options["scale"]
        self.ctf = ctf
        self.pixel_subsample = pixel_subsample
        self.config = {
            **options,
            "image_shape": list(self.image_shape),
            "scale_prior_std": scale_prior_std,
            "scale_prior": _learned_scale_prior_name(scale_prior),
            "psf_fwhm": None if psf_fwhm is None else float(psf_fwhm),
            "likelihood": likelihood if isinstance(likelihood, str) else type(likelihood).__name__,
        }
        self.likelihood = make_likelihood(likelihood)
        self.z_prior = as_prior(
            standard_normal_z(z_dim) if z_prior is None else z_prior, site="z", event_shape=(z_dim,)
        )
        if self.rotate:
            theta_prior = normal_theta(theta_prior_std) if theta_prior is None else theta_prior
            self.theta_prior = as_prior(theta_prior, site="theta", event_shape=())
        if self.translate:
            dx_prior = normal_dx(dx_prior_std) if dx_prior is None else dx_prior
            self.dx_prior = as_prior(dx_prior, site="dx", event_shape=(2,))
        if self.scale:
            scale_prior = log_normal_scale(scale_prior_std) if scale_prior is None else scale_prior
            self.scale_prior = as_prior(scale_prior, site="scale", event_shape=())
        layers = {"hidden_dim": hidden_dim, "num_layers": num_layers, "activation": activation}
        out_dim = channels * self.likelihood.params_per_channel
        if vanilla:
            self.decoder: nn.Module = VanillaDecoder(z_dim, height * width, out_dim, **layers)
        else:
            self.decoder = SpatialDecoder(
                z_dim, out_dim, **layers, coord_frequency=coord_frequency, compile=compile
            )
        self.register_buffer("grid", pixel_grid(height, width), persistent=False)
        self.optics = Optics(height, width, psf_fwhm=psf_fwhm)
        self.theta_bins = (
            None if rotation_bins is None else BinnedRotationPrior(rotation_bins, enumerate=enumerate_bins)
        )
        radius = lattice_radius(options["bin_render"])
        self.lattice = None if radius is None else RenderLattice(height, width, radius=radius)
        # Plain nn.Modules inside become PyroModules so their parameters live in Pyro's param store.
        to_pyro_module_(self)

    # ----------------------------------------------------------------------------------------------
    @property
    def latent_sites(self) -> dict[str, tuple[int, ...]]:
        """Latent sample sites of the program and their event shapes, in sampling order."""
        sites: dict[str, tuple[int, ...]] = {"z": (self.z_dim,)}
        if self.theta_bins is not None:
            sites.update(self.theta_bins.latent_sites)
        elif self.rotate:
            sites["theta"] = ()
        if self.translate:
            sites["dx"] = (2,)
        if self.scale:
            sites["scale"] = ()
        return sites

    @property
    def rotation_bins(self) -> int | None:
        """The number of rotation bins of :attr:`theta_bins` (``None`` without bins)."""
        return None if self.theta_bins is None else self.theta_bins.bins

    @property
    def enumerate_bins(self) -> bool:
        """Whether the program sums over its rotation bins itself (:attr:`theta_bins`)."""
        return self.theta_bins is not None and self.theta_bins.enumerate

    @property
    def psf_fwhm(self) -> float | None:
        """The FWHM in pixels of the :attr:`optics`' PSF (``None`` without one)."""
        return None if self.optics.psf is None else self.optics.psf.fwhm

    def render(
        self,
        z: torch.Tensor,
        theta: torch.Tensor | None = None,
        dx: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        *,
        pixels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Likelihood parameters ``(..., P, k * C)`` for content ``z`` ``(..., z_dim)`` at a pose.

        ``theta`` ``(...)``, ``dx`` ``(..., 2)`` and ``scale`` ``(...)`` are ignored by the vanilla decoder;
        ``pixels`` (indices into the grid) renders only those pixels. The decoder may run in low precision
        (autocast); its output is returned in the module's dtype (float32) for the likelihood and the CTF.
        """
        if self.vanilla:
            return self.decoder(z).to(self.grid.dtype)
        grid = self.grid if pixels is None else self.grid[pixels]
        return self.decoder.render(grid, z, theta, dx, scale).to(self.grid.dtype)

    def render_binned(
        self,
        z: torch.Tensor,
        centre: torch.Tensor,
        offset: torch.Tensor,
        dx: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`render` at ``theta = centre + offset`` through the :attr:`lattice` (``bin_render``):
        the decoder renders each image once, turned by its ``offset`` ``(..., B)`` and magnified by ``scale``,
        on the lattice, and every bin ``centre`` (e.g. ``(K, 1)``) with the shift ``dx`` ``(..., B, 2)``
        reads that render at its canonical coordinates: ``((x - dx) R(centre)) R(offset) / s``, the same
        coordinates as :meth:`render`'s. Returns ``(..., K, B, P, k * C)`` for K bins."""
        values = self.decoder.render(self.lattice.points, z, offset, None, scale).to(self.grid.dtype)
        return self.lattice.sample(values, pose_coordinates(self.grid, centre, dx))

    @torch.no_grad()
    def init_output_bias(self, data) -> SpatialVAE:
        """Start the decoder at the data's mean image; returns the model.

        Zeroes the weights of the decoder's last layer and sets its output bias so that the likelihood of
        every pixel has the mean of ``data`` (an :class:`ImageDataset` or images ``(N, H, W)`` /
        ``(N, C, H, W)``, normally the training set) and, for ``"gaussian_pixel"``, its standard
        deviation: one value per channel for the spatial decoder (its output bias is shared by all
        pixels), one per pixel and channel for the vanilla decoder. A ``"gaussian_learned"`` likelihood's
        one sigma starts at the data's root-mean-square spread around that start, its maximum-likelihood
        value there (rather than 1, far above the spread of images in [0, 1]). Call it once on a new
        model, before training. A decoder left to find the background by itself from a zero bias (the
        original code's start) spends its first epochs there: on rotated MNIST at Adam 1e-4 the test ELBO
        plateaus for ~15 epochs (see ``benchmarks/quality.py``). With the last layer's random weights
        left in place, a smooth random ramp across the grid would add to that start. Not for ``ctf=True``
        models, whose decoder output is filtered by each image's CTF before it meets the data.
        """
        from .infer import as_dataset

        if self.ctf:
            raise ValueError(
                "init_output_bias: with ctf=True the decoder's output is filtered by each image's CTF "
                "before it meets the data, so the data's mean does not give the output bias"
            )
        images = as_dataset(data, self.image_shape).images  # rejects empty, NaN and mis-shaped data
        per_pixel = self.vanilla
        shape = self.image_shape if per_pixel else self.image_shape[:1]
        total = torch.zeros(shape, dtype=torch.float64, device=images.device)
        total_sq = torch.zeros_like(total)
        dims = (0,) if per_pixel else (0, 2, 3)
        for chunk in images.split(1024):  # float64 sums without a float64 copy of the whole stack
            chunk = chunk.to(torch.float64)
            total += chunk.sum(dims)
            total_sq += chunk.square().sum(dims)
        count = images.shape[0] * (1 if per_pixel else images.shape[2] * images.shape[3])
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
        if per_pixel:  # (C, H, W) -> (P, C), the decoder's output order
            mean, std = images_to_pixels(mean.unsqueeze(0))[0], images_to_pixels(std.unsqueeze(0))[0]
        output = self.decoder.tail[-1]
        bias = self.likelihood.params_for_moments(mean.float(), std.float())
        output.weight.zero_()  # the hidden layers still learn: their gradient flows once these move
        output.bias.copy_(bias.reshape(output.bias.shape).to(output.bias.device, output.bias.dtype))
        if isinstance(self.likelihood, LearnedGaussianLikelihood):
            sigma = self.likelihood.sigma
            spread = std.square().mean().sqrt().clamp_min(1e-3)  # floor: constant data have no spread
            self.likelihood.sigma = spread.to(sigma.device, sigma.dtype)  # sets the PyroParam in place
        return self

    def filter_mean(
        self, params: torch.Tensor, *, ctf: CTFParams | None = None, blur: bool = True
    ) -> torch.Tensor:
        """Likelihood parameters ``(..., B, P, k * C)`` as the instrument records them: the :attr:`optics`
        (the PSF with ``blur``, then each image's CTF from ``ctf``) filter the mean channels; the
        likelihood's other parameters (a learned sigma) are left as they are."""
        if not self.optics.filters(ctf=ctf, blur=blur):
            return params
        channels, height, width = self.image_shape
        mean, rest = params[..., :channels], params[..., channels:]
        recorded = self.optics(pixels_to_images(mean, height, width), ctf=ctf, blur=blur)
        return torch.cat([images_to_pixels(recorded), rest], dim=-1)

    def decode(
        self,
        z: torch.Tensor,
        theta: torch.Tensor | None = None,
        dx: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        *,
        ctf: CTFParams | None = None,
        blur: bool = False,
    ) -> torch.Tensor:
        """Expected images ``(..., C, H, W)`` for content ``z`` at a pose (``theta = dx = 0`` if omitted);
        with ``ctf`` the images as the microscope records them (CTF-filtered), with ``blur=True`` as the
        telescope records them (blurred by the model's PSF), else the clean ones."""
        _, height, width = self.image_shape
        if blur and self.psf_fwhm is None:
            raise ValueError("blur=True applies the model's PSF, and this model has none (psf_fwhm)")
        params = self.filter_mean(self.render(z, theta, dx, scale), ctf=ctf, blur=blur)
        return pixels_to_images(self.likelihood.mean(params), height, width)

    def forward(
        self,
        images: torch.Tensor | None = None,
        *,
        data_size: int | None = None,
        num_images: int | None = None,
        ctf: CTFParams | None = None,
    ) -> torch.Tensor:
        """Run the generative program; returns the observed (or sampled) pixels ``(..., P, C)``.

        ``images`` ``(B, C, H, W)`` are conditioned on at site ``obs``; with ``images=None``,
        ``num_images`` new images are generated. ``data_size`` is the size of the whole data set when
        ``images`` is a mini-batch: the plate then scales the batch's log-density by ``data_size / B``.
        ``ctf`` holds the CTF parameters of the ``B`` images (required when the model has ``ctf=True``).
        """
        batch, obs = self._observations(images, num_images, ctf)
        with images_plate(batch, data_size, self.grid.device):
            z = pyro.sample("z", self.z_prior())
            if self.lattice is not None:  # theta = bin centre + offset: one render, turned to every bin
                centre, offset = self.theta_bins.sample_parts(self.theta_prior())
            else:
                theta = self._sample_theta() if self.rotate else None
            dx = pyro.sample("dx", self.dx_prior()) if self.translate else None
            scale = pyro.sample("scale", self.scale_prior()) if self.scale else None
            if self.lattice is not None:
                params = self.render_binned(z, centre, offset, dx, scale)
            elif self.pixel_subsample is not None and self.training and obs is not None:
                return self._observe_pixel_subsample(obs, z, theta, dx, scale)
            else:
                params = self.render(z, theta, dx, scale)
            params = self.filter_mean(params, ctf=ctf if self.ctf else None)
            return pyro.sample("obs", self.likelihood(params), obs=obs)

    def _observations(
        self, images: torch.Tensor | None, num_images: int | None, ctf: CTFParams | None
    ) -> tuple[int, torch.Tensor | None]:
        """The batch size and the observed pixels ``(B, P, C)`` (``None`` when generating)."""
        if images is not None:
            batch, obs = images.shape[0], images_to_pixels(images)
        elif num_images is not None:
            batch, obs = num_images, None
        else:
            raise ValueError("pass images to condition on, or num_images to generate")
        if self.ctf and (ctf is None or len(ctf) != batch):
            found = "none" if ctf is None else f"{len(ctf)} rows"
            raise ValueError(
                f"this model applies a CTF: pass ctf= with one row per image ({batch}), got {found}"
            )
        return batch, obs

    def _sample_theta(self) -> torch.Tensor:
        if self.theta_bins is not None:
            return self.theta_bins.sample(self.theta_prior())
        return pyro.sample("theta", self.theta_prior())

    def _observe_pixel_subsample(self, obs, z, theta, dx, scale) -> torch.Tensor:
        """Score a random subset of pixels of each image; the plate scales their log-density by
        ``H W / k``. The pixels plate is the dim left of the images plate, so ``obs`` is laid out
        ``(k, B, 1, C)`` with event ``(1, C)``."""
        num_pixels = self.grid.shape[0]
        with pyro.plate("pixels", num_pixels, subsample_size=self.pixel_subsample, dim=-2) as pixels:
            params = self.render(z, theta, dx, scale, pixels=pixels)  # (B, k, k' C)
            params = params.transpose(-3, -2).unsqueeze(-2)  # (k, B, 1, k' C)
            value = obs[..., pixels, :].transpose(-3, -2).unsqueeze(-2)
            return pyro.sample("obs", self.likelihood(params), obs=value)

    def model(self, *args, **kwargs) -> torch.Tensor:
        """The Pyro model callable (the same as calling the module)."""
        return self(*args, **kwargs)

    @classmethod
    def from_config(cls, config, *, name: str | None = None) -> SpatialVAE:
        """A new model from a :class:`~pyro_svae.configs.ModelConfig` (or its ``to_dict()`` form)."""
        from .configs import ModelConfig

        if not isinstance(config, ModelConfig):
            config = ModelConfig.from_dict(config)
        return cls(**config.model_kwargs(), name=name)
