"""Particle images read on demand: stacks stay on disk, each batch is read and preprocessed when asked for.

A lab's particle set (10^5-10^6 images of 64-256 pixels) does not fit in memory, or fits only once. A
:class:`ParticleImages` stands where an :class:`~pyro_svae.data.ImageDataset` holds its image tensor: it has
the tensor's ``shape`` ``(N, 1, box, box)``, and indexing it (an index, a slice, an array of indices) reads
those particles from their stacks with ``os.pread`` (so the file pages never count as this process's
memory, as a memory map's would), then inverts, Fourier-crops and normalizes them (:mod:`.particles`'
per-image operations: a batch needs no statistics of the rest) and returns a float32 tensor.
:meth:`ParticleImages.take` selects particles without reading anything, :meth:`~ParticleImages.cached`
reads everything once into memory when it fits.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import torch

from .datasets import DataError, LazyImages

__all__ = ["StackFile", "ParticleImages", "stack_file"]


@dataclass(frozen=True)
class StackFile:
    """Where the images of one stack file lie: ``count`` images of ``height x width`` pixels of ``dtype``,
    C order, from byte ``offset`` on."""

    path: str
    offset: int
    dtype: np.dtype
    count: int
    height: int
    width: int

    @property
    def frame_bytes(self) -> int:
        return self.height * self.width * self.dtype.itemsize


def stack_file(path: str | os.PathLike) -> StackFile:
    """The layout of an ``.mrcs``/``.mrc`` (mrcfile's header) or ``.npy`` stack, checked without reading
    its images: real-valued, square, not empty, and as long as the header says."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".mrcs", ".mrc"):
            header = _mrc_header(path)
            mode = int(header.mode)
            dtype = mrcfile.utils.data_dtype_from_header(header)
            shape = mrcfile.utils.data_shape_from_header(header)
            offset = header.nbytes + int(header.nsymbt)
            if mode in (3, 4):
                raise DataError(f"{path}: complex MRC data (mode {mode}); expected real-valued images")
        elif suffix == ".npy":
            from .loaders import read_npy

            array = read_npy(path, mmap=True)  # checks the header against the file size
            dtype, shape, offset = array.dtype, array.shape, int(array.offset)
            if array.ndim == 3 and not array.flags.c_contiguous:
                raise DataError(f"{path}: a Fortran-order .npy stack cannot be streamed; save it in C order")
            del array
        else:
            raise DataError(f"{path}: unknown stack format {suffix!r} (expected .mrcs, .mrc or .npy)")
    except (ValueError, OSError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable particle stack ({error})") from None
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise DataError(f"{path}: expected real-valued images, found dtype {dtype}")
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) == 4 and shape[1] == 1:
        shape = (shape[0], shape[2], shape[3])
    if len(shape) != 3 or shape[0] == 0:
        raise DataError(f"{path}: expected a stack (N, H, W) of at least one image, found shape {shape}")
    count, height, width = shape
    if height != width:
        raise DataError(f"{path}: expected square images, found {height}x{width} pixels")
    layout = StackFile(str(path), offset, dtype, count, height, width)
    if path.stat().st_size < offset + count * layout.frame_bytes:
        raise DataError(f"{path}: truncated: its header announces {count} images of {height}x{width}")
    return layout


def _mrc_header(path: Path) -> np.recarray:
    """An MRC file's header: read strictly, else in mrcfile's permissive mode with a warning (as
    :func:`~pyro_svae.data.read_stack` reads the data)."""
    try:
        with mrcfile.open(path, mode="r", header_only=True) as mrc:
            header = mrc.header.copy()
        mrcfile.utils.data_dtype_from_header(header)
        return header
    except ValueError as error:
        reason = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
            mrcfile.utils.data_dtype_from_header(header)
        except (ValueError, OSError) as error:
            raise DataError(
                f"{path}: MRC data cannot be read, the file is truncated or corrupt ({error})"
            ) from None
    problems = "; ".join(dict.fromkeys([reason, *(str(w.message) for w in caught)]))
    warnings.warn(
        f"{path}: non-standard MRC header ({problems}); read in mrcfile's permissive mode",
        UserWarning,
        stacklevel=4,
    )
    return header


class _Reader:
    """Open file descriptors of the stacks, per process (a forked worker opens its own)."""

    def __init__(self) -> None:
        self.pid, self.fds = os.getpid(), {}

    def read(self, stack: StackFile, rows: np.ndarray) -> np.ndarray:
        """Images ``rows`` (0-based, ascending) of ``stack`` as float32 ``(len(rows), H, W)``."""
        if self.pid != os.getpid():
            self.pid, self.fds = os.getpid(), {}
        fd = self.fds.get(stack.path)
        if fd is None:
            fd = self.fds[stack.path] = os.open(stack.path, os.O_RDONLY)
        out = np.empty((len(rows), stack.height, stack.width), dtype=np.float32)
        frame = stack.frame_bytes
        start = 0
        while start < len(rows):  # one read per run of consecutive images
            stop = start + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            size = (stop - start) * frame
            data = os.pread(fd, size, stack.offset + int(rows[start]) * frame)
            if len(data) != size:
                raise DataError(f"{stack.path}: truncated at image {int(rows[start]) + 1}")
            values = np.frombuffer(data, dtype=stack.dtype).reshape(stop - start, stack.height, stack.width)
            out[start:stop] = values
            start = stop
        return out

    def __del__(self) -> None:
        if self.pid == os.getpid():
            for fd in self.fds.values():
                os.close(fd)


@dataclass(frozen=True)
class _Preprocessing:
    box: int | None = None
    invert: bool = False
    normalize: bool = False
    mask_radius: float | None = None


class ParticleImages(LazyImages):
    """Particles ``(N, 1, box, box)`` float32, read from their stacks when indexed (see the module notes).

    ``stacks`` are the files; particle ``i`` is image ``rows[i]`` (0-based) of ``stacks[files[i]]``.
    Supports ``len``, ``shape``, ``images[key]`` for an int, slice or index array/tensor (a tensor,
    read and preprocessed now), :meth:`take` (a selection, nothing read), :meth:`split` (batches in order),
    :meth:`preprocessed` and :meth:`cached`.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(
        self,
        stacks: Sequence[StackFile],
        files: np.ndarray,
        rows: np.ndarray,
        *,
        preprocessing: _Preprocessing | None = None,
    ) -> None:
        self.stacks = list(stacks)
        self.files = np.asarray(files, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.preprocessing = preprocessing or _Preprocessing()
        if len(self.files) == 0:
            raise DataError("no particles to read (an empty selection)")
        sizes = {(s.height, s.width) for s in self.stacks}
        if len(sizes) > 1:
            raise DataError(f"stacks of different image sizes: {sorted(sizes)}")
        self._size = self.stacks[0].height
        self._reader = _Reader()

    @classmethod
    def from_stack(cls, path: str | os.PathLike) -> ParticleImages:
        """Every image of one stack file, in order."""
        stack = stack_file(path)
        return cls([stack], np.zeros(stack.count, np.int64), np.arange(stack.count))

    @property
    def shape(self) -> torch.Size:
        box = self.preprocessing.box or self._size
        return torch.Size((len(self.files), 1, box, box))

    def __len__(self) -> int:
        return len(self.files)

    def dim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        """Bytes the preprocessed images would take in memory (float32)."""
        return int(np.prod(self.shape)) * 4

    def _index(self, key) -> np.ndarray:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        index = np.arange(len(self))[key]
        return np.atleast_1d(index).astype(np.int64)

    def take(self, key) -> ParticleImages:
        """The particles at ``key`` (int, slice, or index array), nothing read yet."""
        index = self._index(key)
        return ParticleImages(
            self.stacks, self.files[index], self.rows[index], preprocessing=self.preprocessing
        )

    def preprocessed(
        self, *, box: int | None, invert: bool, normalize: bool, mask_radius: float | None
    ) -> ParticleImages:
        """The same particles, inverted, Fourier-cropped to ``box`` and normalized when read."""
        if self.preprocessing != _Preprocessing():
            raise DataError("these particles are preprocessed already")
        options = _Preprocessing(box=box, invert=invert, normalize=normalize, mask_radius=mask_radius)
        return ParticleImages(self.stacks, self.files, self.rows, preprocessing=options)

    def __getitem__(self, key) -> torch.Tensor:
        scalar = isinstance(key, (int, np.integer))
        index = self._index(key)
        raw = np.empty((len(index), self._size, self._size), dtype=np.float32)
        files, rows = self.files[index], self.rows[index]
        for file in np.unique(files):
            where = np.flatnonzero(files == file)
            order = where[np.argsort(rows[where], kind="stable")]  # ascending reads, runs coalesced
            raw[order] = self._reader.read(self.stacks[file], rows[order])
        images = self._transform(torch.from_numpy(raw)[:, None], index)
        return images[0] if scalar else images

    def _transform(self, images: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        finite = torch.isfinite(images).flatten(1).all(1)
        if not bool(finite.all()):
            bad = int(index[int((~finite).nonzero()[0])])
            raise DataError(f"particle {bad} ({self._where(bad)}) holds NaN or Inf pixels")
        options = self.preprocessing
        if options == _Preprocessing():
            return images.contiguous()
        from .particles import preprocess_batch  # particles builds ParticleImages: imported when first used

        box = options.box or self._size
        preprocess = {
            "invert": options.invert,
            "normalize": options.normalize,
            "mask_radius": options.mask_radius,
        }
        return preprocess_batch(images, box=box, **preprocess).contiguous()

    def _where(self, i: int) -> str:
        return f"image {int(self.rows[i]) + 1} of {self.stacks[int(self.files[i])].path}"

    def split(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self[start : start + batch_size]

    def cached(self, batch_size: int = 1024) -> torch.Tensor:
        """Every image read and preprocessed now, as one tensor ``(N, 1, box, box)``."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for start, batch in zip(range(0, len(self), batch_size), self.split(batch_size), strict=True):
            out[start : start + len(batch)] = batch
        return out

    def __repr__(self) -> str:
        shape = tuple(self.shape[1:])
        return f"ParticleImages({len(self)} particles of {shape} from {len(self.stacks)} stack(s))"
