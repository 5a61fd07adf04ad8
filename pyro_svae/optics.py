"""Image formation as operators: what the instrument does to a rendered image before it is recorded (no Pyro).

Each operator is a linear, shift-invariant filter of image arrays, given by its transfer function on the
``rfft2`` grid of the image (an :class:`ImageFilter`) and applied in Fourier space by
:func:`~pyro_svae.ctf.apply_ctf`:

* :class:`GaussianPSF` -- a telescope's round Gaussian point-spread function of ``fwhm`` pixels: one fixed
  transfer function (:func:`gaussian_psf_2d`) for every image, a buffer that follows ``.to(device)``.
* :class:`CTF` -- a microscope's contrast transfer function, one per image, computed at call time from the
  images' :class:`~pyro_svae.ctf.CTFParams` rows (RELION's convention, :mod:`pyro_svae.ctf`).

:class:`Optics` is a model's instrument: its filters in the order the light meets them, the PSF (when the
model has one) and then each image's CTF (when given). A model applies them to the mean of its rendered
image before the likelihood scores it (:meth:`~pyro_svae.model.SpatialVAE.filter_mean`).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .ctf import CTFParams, apply_ctf, ctf_2d, frequency_grid

__all__ = ["ImageFilter", "GaussianPSF", "CTF", "Optics", "gaussian_psf_2d"]


@runtime_checkable
class ImageFilter(Protocol):
    """A linear, shift-invariant filter of images ``(..., N, C, H, W)``."""

    def transfer(self, images: torch.Tensor) -> torch.Tensor:
        """Its transfer function on the ``rfft2`` grid of ``images``: ``(H, W // 2 + 1)`` for all images or
        ``(N, H, W // 2 + 1)`` for each, on the images' device."""
        ...


def gaussian_psf_2d(
    fwhm: float, height: int, width: int | None = None, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Transfer function of a round Gaussian point-spread function of ``fwhm`` pixels on the ``rfft2``
    grid of an ``H x W`` image, ``(H, W // 2 + 1)``: ``exp(-2 pi^2 sigma^2 |f|^2)`` with ``sigma = fwhm /
    (2 sqrt(2 ln 2))``; filter with :func:`apply_ctf` (circular convolution; the flux is kept)."""
    if not fwhm > 0:
        raise ValueError(f"the PSF's fwhm must be positive (pixels), got {fwhm!r}")
    fx, fy = frequency_grid(height, width, device=device)
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    return torch.exp(-2 * math.pi**2 * sigma**2 * (fx * fx + fy * fy))


class GaussianPSF(nn.Module):
    """The blur of a round Gaussian point-spread function of ``fwhm`` pixels on ``H x W`` images."""

    def __init__(self, fwhm: float, height: int, width: int | None = None) -> None:
        super().__init__()
        self.fwhm = float(fwhm)
        transfer = gaussian_psf_2d(self.fwhm, height, width)  # (H, W // 2 + 1)
        self.register_buffer("transfer_function", transfer, persistent=False)

    def transfer(self, images: torch.Tensor) -> torch.Tensor:
        return self.transfer_function

    def extra_repr(self) -> str:
        return f"fwhm={self.fwhm:g}"


class CTF:
    """Each image's contrast transfer function, from one :class:`~pyro_svae.ctf.CTFParams` row per image."""

    def __init__(self, params: CTFParams) -> None:
        self.params = params

    def transfer(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        return ctf_2d(self.params.to(images.device), height, width)  # (N, H, W // 2 + 1)


class Optics(nn.Module):
    """An instrument: the optional PSF of ``psf_fwhm`` pixels (:class:`GaussianPSF`, fixed for the
    ``H x W`` images of a model), then the CTF of each image (:class:`CTF`, parameters given per call)."""

    def __init__(self, height: int, width: int, *, psf_fwhm: float | None = None) -> None:
        super().__init__()
        self.psf = None if psf_fwhm is None else GaussianPSF(psf_fwhm, height, width)

    def filters(self, *, ctf: CTFParams | None = None, blur: bool = True) -> list[ImageFilter]:
        """The filters in the order the light meets them: the PSF (with ``blur``), then ``ctf``'s."""
        chain: list[ImageFilter] = []
        if blur and self.psf is not None:
            chain.append(self.psf)
        if ctf is not None:
            chain.append(CTF(ctf))
        return chain

    def forward(
        self, images: torch.Tensor, *, ctf: CTFParams | None = None, blur: bool = True
    ) -> torch.Tensor:
        """``images`` ``(..., N, C, H, W)`` as the instrument records them (float32, see
        :func:`~pyro_svae.ctf.apply_ctf`)."""
        for image_filter in self.filters(ctf=ctf, blur=blur):
            images = apply_ctf(images, image_filter.transfer(images))
        return images
