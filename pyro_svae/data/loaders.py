"""Loaders for users' own image files: ``.npy`` arrays, MNIST IDX files and folders of images."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

from .datasets import DataError, ImageDataset

__all__ = ["read_npy", "read_idx", "load_idx", "load_npy", "load_images", "load_image_folder"]

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


def read_npy(path: str | os.PathLike, *, mmap: bool = False) -> np.ndarray:
    """An ``.npy`` array, memory-mapped read-only with ``mmap``; its header checked against the file first.

    Raises :class:`DataError` for an empty file, a header numpy cannot read, an object array (never
    unpickled), or a header whose shape and dtype need more bytes than the file holds (truncated or
    corrupt: without the check a header claiming a terabyte asks for that much memory).
    """
    path = _check_file(path)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a .npy array")
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy array ({error})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects (dtype {dtype}), not numbers; refusing to unpickle it")
    expected = math.prod(shape) * dtype.itemsize
    if expected != size - offset:
        raise DataError(
            f"{path}: the .npy header announces shape {tuple(shape)} of {dtype} ({expected:,} bytes of data) "
            f"but the file holds {size - offset:,}: truncated or corrupt"
        )
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable .npy array ({error})") from None


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
    array = read_npy(path)
    label_array = None if labels is None else read_npy(labels)
    return ImageDataset(array, labels=label_array, name=name or Path(path).name)


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


_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
_FOLDER_SUFFIXES = _RASTER_SUFFIXES + (".npy",) + _FITS_SUFFIXES


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".fits.gz" if name.endswith(".fits.gz") else path.suffix.lower()


def _read_raster(path: Path) -> np.ndarray:
    """One PNG/JPEG as ``(C, H, W)`` float32: greyscale C=1, colour C=3 (alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":  # palette: expand to its colours
                image = image.convert("RGBA")
                mode = "RGBA"
            if mode.startswith("I;16"):
                array = np.asarray(image).astype(np.float32) / 65535.0
            elif mode in ("I", "F"):
                array = np.asarray(image).astype(np.float32)
            elif mode in ("1", "L", "LA"):
                array = np.asarray(image.convert("L")).astype(np.float32) / 255.0
            else:
                array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot be read as an image ({error})") from None
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def _read_folder_npy(path: Path) -> np.ndarray:
    """An ``.npy`` file as images ``(N, C, H, W)``: one image or a stack (see :func:`load_image_folder`)."""
    array = read_npy(path)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise DataError(f"{path}: expected a numeric array, found dtype {array.dtype}")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    array = array.astype(np.float32) / scale
    if array.ndim == 2:
        return array[None, None]
    if array.ndim == 3:
        if array.shape[-1] in (1, 3, 4):
            return np.moveaxis(array, -1, 0)[None]
        return array[:, None]
    if array.ndim == 4:
        if array.shape[1] not in (1, 3, 4) and array.shape[-1] in (1, 3, 4):
            array = np.moveaxis(array, -1, 1)
        return array
    raise DataError(
        f"{path}: expected an image (H, W), (H, W, C) or a stack of images, found shape {array.shape}"
    )


def _read_fits(path: Path) -> np.ndarray:
    """The first image HDU of a FITS file as ``(N, 1, H, W)``, rows flipped so that the image reads as a
    FITS viewer shows it (FITS row 0 is the bottom)."""
    try:
        from astropy.io import fits
    except ImportError:
        raise ImportError(
            f"{path}: reading FITS files needs astropy (pip install astropy, or the 'galaxies' extra)"
        ) from None
    try:
        with fits.open(path, memmap=False) as hdus:
            data = next((hdu.data for hdu in hdus if getattr(hdu, "data", None) is not None), None)
            if data is not None:
                data = np.asarray(data, dtype=np.float32)
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: cannot be read as FITS ({error})") from None
    if data is None or data.ndim not in (2, 3):
        found = "no image data" if data is None else f"data of shape {data.shape}"
        raise DataError(f"{path}: expected a 2-D image or a 3-D stack of images in FITS, found {found}")
    data = data[None] if data.ndim == 2 else data
    return data[:, None, ::-1, :].copy()


def load_image_folder(
    folder: str | os.PathLike, *, size: int | None = None, name: str | None = None
) -> ImageDataset:
    """All images in ``folder`` (not its subfolders), files in name order, as one data set ``(N, C, H, W)``.

    Formats: PNG and JPEG (8-bit values scaled to ``[0, 1]``, 16-bit PNG by 65535; greyscale gives
    ``C = 1``, colour ``C = 3``; an alpha channel is dropped, so transparent pixels keep their colour),
    ``.npy`` (one image ``(H, W)`` or ``(H, W, C)`` with ``C`` in {1, 3, 4}, or a stack ``(N, H, W)``,
    ``(N, C, H, W)``, ``(N, H, W, C)``; ``uint8`` scaled to ``[0, 1]``, other values kept) and FITS
    (``.fits``, ``.fit``, ``.fts``, ``.fits.gz``, through astropy: the first HDU with data, a 2-D image or a
    3-D stack of greyscale planes, values kept, rows flipped because FITS row 0 is the bottom). Other files
    are ignored. All images must share their channel count, and their size unless ``size`` is given: then
    each image is resized to ``size x size`` (anti-aliased; non-square images are stretched).

    ``info["files"]`` lists the files read; ``source_index`` gives, for each image, its file's position in
    that list. Raises :class:`DataError` for a folder without images, an unreadable file (named), or mixed
    sizes or channel counts (with an example of each).
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and _suffix(p) in _FOLDER_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files found (expected {', '.join(_FOLDER_SUFFIXES)})")
    stacks = []
    for path in files:
        suffix = _suffix(path)
        if suffix in _RASTER_SUFFIXES:
            stack = _read_raster(path)[None]
        elif suffix == ".npy":
            stack = _read_folder_npy(path)
        else:
            stack = _read_fits(path)
        if stack.shape[0] == 0:
            raise DataError(f"{path}: holds no images (shape {stack.shape})")
        if not np.isfinite(stack).all():
            raise DataError(f"{path}: contains NaN or Inf pixels")
        if size is not None:
            stack = _resize(stack, size)
        stacks.append(stack)
    for what, axes in (("channel counts", slice(1, 2)), ("image sizes", slice(2, 4))):
        seen: dict[tuple[int, ...], str] = {}
        for path, stack in zip(files, stacks, strict=True):
            seen.setdefault(stack.shape[axes], path.name)
        if len(seen) > 1:
            examples = ", ".join(
                f"{file} is {'x'.join(map(str, shape))}"
                if what == "image sizes"
                else f"{file} has {shape[0]}"
                for shape, file in seen.items()
            )
            hint = " (pass size= to resize them)" if what == "image sizes" else ""
            raise DataError(f"{folder}: mixed {what}: {examples}{hint}")
    source_index = np.concatenate([np.full(len(stack), i) for i, stack in enumerate(stacks)])
    return ImageDataset(
        np.concatenate(stacks),
        source_index=source_index,
        name=name or folder.name,
        info={"folder": str(folder), "files": [path.name for path in files]},
    )


def _resize(stack: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    if size < 2:
        raise DataError(f"size must be at least 2 pixels, got {size}")
    if stack.shape[2:] == (size, size):
        return stack
    return resize(stack, (*stack.shape[:2], size, size), order=1, anti_aliasing=True).astype(np.float32)
