"""Cryo-EM contrast transfer function in RELION's conventions, applied to rendered images (no Pyro).

The filters a model applies, this CTF and a telescope's point-spread function, are the operators of
:mod:`pyro_svae.optics` (which also holds :func:`~pyro_svae.optics.gaussian_psf_2d`, still importable
from here).

Parameters live in :class:`CTFParams`, one row per particle, in RELION's units. The CTF is computed in the
frequency space of the image *array* (axis ``-1`` is x, axis ``-2`` is y, the MRC convention with rows as
+y), so an image array read from an ``.mrcs`` file and filtered here matches RELION.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["CTFParams", "relativistic_wavelength", "frequency_grid", "ctf_2d", "apply_ctf"]


def relativistic_wavelength(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Electron wavelength in Å at an accelerating voltage in kV (0.0197 Å at 300 kV)."""
    volts = voltage_kv * 1e3
    return 12.2642598 / torch.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def frequency_grid(
    height: int,
    width: int | None = None,
    *,
    half: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies ``(fx, fy)`` in cycles per pixel of an image array, each ``(H, W')``.

    ``fx`` runs along axis ``-1`` and ``fy`` along axis ``-2`` in FFT order; ``half`` gives the
    ``rfft2`` layout (``W' = W // 2 + 1``), otherwise the full ``fft2`` one.
    """
    width = height if width is None else width
    fy = torch.fft.fftfreq(height, device=device)
    fx = torch.fft.rfftfreq(width, device=device) if half else torch.fft.fftfreq(width, device=device)
    grid_y, grid_x = torch.meshgrid(fy, fx, indexing="ij")
    return grid_x, grid_y


def ctf_2d(params: CTFParams, height: int, width: int | None = None, *, half: bool = True) -> torch.Tensor:
    """The CTF of each particle on the FFT grid of an ``H x W`` image array -> ``(N, H, W')``.

    RELION's formula: ``CTF = sin(gamma + asin(Q) + phase_shift) * exp(-B s^2 / 4)`` with
    ``gamma = pi lambda df(alpha) s^2 - pi/2 Cs lambda^3 s^4`` and
    ``df(alpha) = (U + V)/2 + (U - V)/2 cos(2 (alpha - angle))``, ``alpha`` measured from axis ``-1``
    towards axis ``-2``; so ``CTF(0) = Q`` (phase contrast positive, as RELION projects). Computed in
    float32 on the parameters' device.
    """
    device = params.device
    fx, fy = frequency_grid(height, width, half=half, device=device)
    pixel = params.pixel_size[:, None, None]
    sx, sy = fx / pixel, fy / pixel  # 1/Å
    s2 = sx * sx + sy * sy
    alpha = torch.atan2(sy, sx)
    u, v = params.defocus_u[:, None, None], params.defocus_v[:, None, None]
    angle = torch.deg2rad(params.defocus_angle)[:, None, None]
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * torch.cos(2.0 * (alpha - angle))
    wavelength = relativistic_wavelength(params.voltage)[:, None, None]
    cs = params.spherical_aberration[:, None, None] * 1e7  # mm -> Å
    gamma = math.pi * wavelength * defocus * s2 - 0.5 * math.pi * cs * wavelength**3 * s2 * s2
    amplitude = torch.asin(params.amplitude_contrast.clamp(-1.0, 1.0))[:, None, None]
    phase = torch.deg2rad(params.phase_shift)[:, None, None]
    ctf = torch.sin(gamma + amplitude + phase)
    bfactor = params.bfactor[:, None, None]
    return ctf * torch.exp(-0.25 * bfactor * s2)


def apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Filter real images by per-image CTFs ``(N, H, W // 2 + 1)`` (``rfft2`` layout).

    ``images`` ``(N, H, W)``, or ``(..., N, C, H, W)`` where the CTF of image ``n`` applies to all its
    channels and leading sample dimensions broadcast. Computed in float32 whatever the autocast state;
    returns float32 images of the input's shape.
    """
    height, width = images.shape[-2:]
    if ctf.shape[-2:] != (height, width // 2 + 1):
        raise ValueError(f"CTF of shape {tuple(ctf.shape)} does not match images of {height}x{width}")
    if images.dim() >= 4:
        ctf = ctf.unsqueeze(-3)
    with torch.autocast(images.device.type, enabled=False):
        spectrum = torch.fft.rfft2(images.float())
        return torch.fft.irfft2(spectrum * ctf, s=(height, width))


def __getattr__(name: str):
    """``gaussian_psf_2d``, moved to :mod:`pyro_svae.optics`, imported lazily (optics builds on this
    module)."""
    if name == "gaussian_psf_2d":
        from .optics import gaussian_psf_2d

        return gaussian_psf_2d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each a float32 tensor ``(N,)``.

    ``defocus_u``/``defocus_v`` in Å (underfocus positive), ``defocus_angle`` (astigmatism angle) in
    degrees, ``voltage`` in kV, ``spherical_aberration`` in mm, ``amplitude_contrast`` as a fraction,
    ``phase_shift`` in degrees, ``bfactor`` in Å², ``pixel_size`` in Å per pixel.
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage: torch.Tensor
    spherical_aberration: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor
    pixel_size: torch.Tensor

    def __post_init__(self) -> None:
        lengths = set()
        for f in fields(self):
            value = getattr(self, f.name)
            tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.array(value))
            tensor = tensor.to(torch.float32).reshape(-1)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"CTF parameter {f.name} contains NaN or Inf")
            setattr(self, f.name, tensor)
            lengths.add(tensor.shape[0])
        if len(lengths) > 1:
            raise ValueError(f"CTF parameters have different lengths: {sorted(lengths)}")

    @classmethod
    def from_values(cls, n: int | None = None, **values) -> CTFParams:
        """Build from scalars or arrays (scalars broadcast to ``n`` particles); defaults for the optional
        ``phase_shift = 0``, ``bfactor = 0``."""
        values.setdefault("phase_shift", 0.0)
        values.setdefault("bfactor", 0.0)
        missing = [f.name for f in fields(cls) if f.name not in values]
        if missing:
            raise ValueError(f"missing CTF parameter(s): {', '.join(missing)}")
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}
        if n is None:
            n = max(int(a.size) for a in arrays.values())
        return cls(**{k: np.broadcast_to(a.reshape(-1) if a.ndim else a, (n,)) for k, a in arrays.items()})

    def __len__(self) -> int:
        return self.defocus_u.shape[0]

    def __getitem__(self, index) -> CTFParams:
        """Rows at ``index`` (an int, slice, index tensor or array)."""
        if isinstance(index, int):
            index = [index]
        if isinstance(index, np.ndarray):
            index = torch.as_tensor(index)
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def device(self) -> torch.device:
        return self.defocus_u.device

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)}
