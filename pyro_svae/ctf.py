"""Cryo-EM contrast transfer function in RELION's conventions, applied to rendered images (no Pyro).

Parameters live in :class:`CTFParams`, one row per particle, in RELION's units. The CTF is computed in the
frequency space of the image *array* (axis ``-1`` is x, axis ``-2`` is y, the MRC convention with rows as
+y), so an image array read from an ``.mrcs`` file and filtered here matches RELION.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["CTFParams"]


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
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
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
