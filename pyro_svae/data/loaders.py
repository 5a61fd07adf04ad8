"""Loaders for users' own image files: ``.npy`` arrays and MNIST IDX files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from .datasets import DataError, ImageDataset

__all__ = ["read_idx", "load_idx", "load_npy", "load_images"]

# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    return path


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzip-compressed) into an array."""
    path = _check_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data), "
            f"found {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(
    path: str | os.PathLike, labels: str | os.PathLike | None = None, *, name: str | None = None
) -> ImageDataset:
    """MNIST IDX images ``(N, H, W)`` (``uint8`` scaled to ``[0, 1]``), with labels from an IDX1 file."""
    images = read_idx(path)
    label_array = None
    if labels is not None:
        label_array = read_idx(labels)
        if label_array.ndim != 1 or label_array.shape[0] != images.shape[0]:
            raise DataError(f"{labels}: expected {images.shape[0]} labels, found shape {label_array.shape}")
    return ImageDataset(images, labels=label_array, name=name or Path(path).name)


def load_npy(
    path: str | os.PathLike, labels: str | os.PathLike | None = None, *, name: str | None = None
) -> ImageDataset:
    """An ``.npy`` image array ``(N, H, W)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (the original
    spatial-VAE data sets' format); optional labels from another ``.npy`` file."""
    path = _check_file(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: not a readable .npy array ({error})") from None
    label_array = None
    if labels is not None:
        try:
            label_array = np.load(_check_file(labels), allow_pickle=False)
        except (ValueError, OSError) as error:
            raise DataError(f"{labels}: not a readable .npy array ({error})") from None
    return ImageDataset(array, labels=label_array, name=name or path.name)


def load_images(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> ImageDataset:
    """Load a user's image file by its format: ``.npy``, or MNIST IDX (``*idx3-ubyte``, ``.idx``, ``.gz``)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".npy"):
        return load_npy(path, labels)
    if "idx" in name or name.endswith(".gz") or name.endswith("ubyte"):
        return load_idx(path, labels)
    _check_file(path)
    raise DataError(f"{path}: unknown image file format (expected .npy or an MNIST IDX file)")
