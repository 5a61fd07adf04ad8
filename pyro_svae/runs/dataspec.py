"""Data specs: the data of a run described in ``config.json`` (built-in name, or files by path and
SHA-256, preprocessing, the seeded split), and the data sets they rebuild."""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data import (
    BUILTIN,
    DataError,
    ImageDataset,
    LazyImages,
    load_image_folder,
    load_images,
    load_particles,
    preprocess_particles,
    read_indices,
)
from ..data.loaders import _FOLDER_SUFFIXES, _suffix


# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_images(folder: Path) -> list[Path]:
    """The files of ``folder`` that :func:`~pyro_svae.data.load_image_folder` reads, in its order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and _suffix(p) in _FOLDER_SUFFIXES)


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in _folder_images(folder):
        digest.update(f"{path.name}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_entry(path: str | os.PathLike | None, *, folder: bool = False) -> dict[str, Any] | None:
    """``{"path", "sha256"}`` of a file; with ``folder``, a folder of images may be given instead
    (``"folder": true``, the digest over its image files' names and contents)."""
    if path is None:
        return None
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if folder and resolved.is_dir():
        try:
            return {"path": str(resolved), "folder": True, "sha256": _folder_digest(resolved)}
        except OSError as error:
            raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not resolved.is_file():
        raise DataError(f"{path}: is not a file")
    try:
        digest = _sha256(resolved)
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    return {"path": str(resolved), "sha256": digest}


def data_spec(
    data: str,
    *,
    labels: str | None = None,
    test_data: str | None = None,
    test_labels: str | None = None,
    test_size: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A JSON-able description of the data of a run, from which :func:`load_data` rebuilds it.

    ``data``: a built-in name (``pyro_svae.data.BUILTIN``), an image file (``.npy``, MNIST IDX) or a folder
    of images (PNG/JPEG/``.npy``/FITS cut-outs, :func:`~pyro_svae.data.load_image_folder`; no labels).
    Files are recorded by absolute path and SHA-256, folders by path and a digest of their image files.
    Without ``test_data``, ``test_size`` images of ``data`` (a count, or a fraction when below 1; default
    10 %, or the built-in's own split) are held out by a seeded random split.
    ``train_size`` keeps only the first images of the training split.
    """
    if test_size is not None and not test_size > 0:
        raise ValueError(f"--test-size must be positive (a count, or a fraction below 1), got {test_size}")
    if train_size is not None and train_size < 1:
        raise ValueError(f"--train-size must be a positive count, got {train_size}")
    spec: dict[str, Any] = {"train_size": train_size, "seed": seed}
    if data in BUILTIN:
        if labels or test_data or test_labels:
            raise ValueError(
                f"'{data}' is a built-in data set with its own labels and test split; "
                "--labels, --test-data and --test-labels apply to files only"
            )
        if test_size is not None and test_size != int(test_size):
            raise ValueError("--test-size of a built-in data set must be a count of images")
        spec.update(builtin=data, test_size=None if test_size is None else int(test_size))
        return spec
    if test_data is not None and test_size is not None:
        raise ValueError("give either --test-data or --test-size, not both")
    if test_labels is not None and test_data is None:
        raise ValueError("--test-labels needs --test-data")
    path = Path(data)
    if not path.exists() and not path.suffix and os.sep not in data:
        raise DataError(
            f"'{data}' is neither a built-in data set ({', '.join(sorted(BUILTIN))}) nor an existing file"
        )
    for images, image_labels in ((data, labels), (test_data, test_labels)):
        if images is not None and image_labels is not None and Path(images).is_dir():
            raise ValueError(f"{images} is a folder of images, which has no labels: drop its labels file")
    spec.update(
        file=_file_entry(data, folder=True),
        labels=_file_entry(labels),
        test_file=_file_entry(test_data, folder=True),
        test_labels=_file_entry(test_labels),
        test_size=test_size,
    )
    return spec


PARTICLE_SUFFIXES = (".star", ".cs", ".mrcs", ".mrc", ".npy")


#: particle images read into memory by ``cache="auto"`` up to this many bytes (float32, both splits)
CACHE_LIMIT = 1 << 30
CACHE_CHOICES = ("auto", "always", "never")


def particle_spec(
    particles: str | os.PathLike,
    *,
    ctf: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    use_ctf: bool = True,
    box: int | None = None,
    normalize: bool = True,
    invert: bool = False,
    mask_radius: float | None = None,
    ind: str | os.PathLike | None = None,
    cache: str = "auto",
    test_size: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The data spec of cryo-EM particles (see :func:`data_spec`): a RELION ``.star`` file, or an
    ``.mrcs``/``.mrc``/``.npy`` stack with an optional CTF ``.star`` file ``ctf`` (same rows, same order).

    ``use_ctf=False`` drops the CTF parameters even when the data carry them; a ``ctf`` file must carry
    CTF columns. ``pixel_size`` (Å) fills in for data that lack it. The particles are then preprocessed
    (:func:`~pyro_svae.data.preprocess_particles`: ``invert``, Fourier crop to ``box``, ``normalize``
    with ``mask_radius``) and split as files are. ``ind`` is a selection file of 0-based particle
    indices (``.npy``/``.txt``, :func:`~pyro_svae.data.read_indices`), applied before the split.
    The particles stay on disk, read and preprocessed batch by batch
    (:class:`~pyro_svae.data.ParticleImages`); ``cache`` reads the training and test images into memory
    once: ``"auto"`` when they take at most :data:`CACHE_LIMIT` bytes, ``"always"`` or ``"never"``.
    """
    if cache not in CACHE_CHOICES:
        raise ValueError(f"--cache-images must be one of {', '.join(CACHE_CHOICES)}, got {cache!r}")
    if test_size is not None and not test_size > 0:
        raise ValueError(f"--test-size must be positive (a count, or a fraction below 1), got {test_size}")
    if train_size is not None and train_size < 1:
        raise ValueError(f"--train-size must be a positive count, got {train_size}")
    suffix = Path(particles).suffix.lower()
    if suffix not in PARTICLE_SUFFIXES:
        raise DataError(
            f"{particles}: unknown particle file format {suffix or '(no suffix)'!r} "
            f"(expected {', '.join(PARTICLE_SUFFIXES)})"
        )
    if ctf is not None and suffix in (".star", ".cs"):
        raise ValueError("--ctf is for stacks; a STAR or .cs file carries its own CTF columns")
    if ctf is not None and not use_ctf:
        raise ValueError("--ctf and --no-ctf contradict each other")
    if pixel_size is not None and not 0 < pixel_size < math.inf:
        raise ValueError(f"--pixel-size must be a positive number of Å, got {pixel_size}")
    if box is not None and box < 2:
        raise ValueError(f"--box must be at least 2 pixels, got {box}")
    if mask_radius is not None and not mask_radius > 0:
        raise ValueError(f"--mask-radius must be a positive number of pixels, got {mask_radius}")
    ind_entry = _file_entry(ind)
    if ind_entry is not None and Path(ind).suffix.lower() not in (".npy", ".txt"):
        raise DataError(f"{ind}: unknown selection file format (expected .npy or .txt of particle indices)")
    return {
        "particles": {
            "file": _file_entry(particles),
            "ctf_file": _file_entry(ctf),
            "ind": ind_entry,
            "pixel_size": pixel_size,
            "use_ctf": bool(use_ctf),
            "cache": cache,
            "preprocess": {
                "box": box,
                "normalize": bool(normalize),
                "invert": bool(invert),
                "mask_radius": mask_radius,
            },
        },
        "test_size": test_size,
        "train_size": train_size,
        "seed": seed,
    }


def is_particle_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a data spec describes cryo-EM particles (a particle file or a particle built-in)."""
    from ..data import PARTICLE_BUILTINS

    return bool(spec.get("particles")) or spec.get("builtin") in PARTICLE_BUILTINS


def _check_unchanged(entry: Mapping[str, Any]) -> None:
    path = Path(entry["path"])
    if not entry.get("sha256"):
        return
    if entry.get("folder"):
        changed = path.is_dir() and _folder_digest(path) != entry["sha256"]
    else:
        changed = path.is_file() and _sha256(path) != entry["sha256"]
    if changed:
        warnings.warn(f"{path} changed since the run was configured (SHA-256 differs)", stacklevel=4)


def _load_file(entry: Mapping[str, Any], labels: Mapping[str, str] | None) -> ImageDataset:
    _check_unchanged(entry)
    if entry.get("folder"):
        return load_image_folder(entry["path"])
    return load_images(entry["path"], None if labels is None else labels["path"])


def select_particles(data: ImageDataset, ind: str | os.PathLike) -> ImageDataset:
    """The particles of ``data`` that a selection file (0-based indices, ``.npy``/``.txt``) names, in its
    order (``source_index`` still points at the input rows)."""
    selected = data.subset(read_indices(ind, len(data)))
    selected.name = data.name
    return selected


def _load_particles(spec: Mapping[str, Any]) -> ImageDataset:
    entry, ctf_entry, ind_entry = spec["file"], spec.get("ctf_file"), spec.get("ind")
    for item in (entry, ctf_entry, ind_entry):
        if item is not None:
            _check_unchanged(item)
    use_ctf = bool(spec.get("use_ctf", True))
    data = load_particles(
        entry["path"],
        ctf=None if ctf_entry is None else ctf_entry["path"],
        pixel_size=spec.get("pixel_size"),
        require_ctf=ctf_entry is not None and use_ctf,
        stream=True,  # headers now, images batch by batch: --train-size and --ind cost nothing
    )
    return prepare_particles(data, spec, ind=None if ind_entry is None else ind_entry["path"])


def prepare_particles(
    data: ImageDataset, spec: Mapping[str, Any], *, ind: str | os.PathLike | None = None
) -> ImageDataset:
    """Particles as a run with particle spec ``spec`` (the ``"particles"`` section) trains on them: the
    CTF dropped where the run ignores it, the selection ``ind`` applied, then its preprocessing."""
    if not spec.get("use_ctf", True) and data.ctf is not None:
        data = replace(data, ctf=None)
    if ind is not None:
        data = select_particles(data, ind)
    options = spec.get("preprocess") or {}
    return preprocess_particles(
        data,
        box=options.get("box"),
        normalize=bool(options.get("normalize", True)),
        invert=bool(options.get("invert", False)),
        mask_radius=options.get("mask_radius"),
    )


# the final evaluation summarizes the test set (correlations, the latent scatter): one image is too few
MIN_TEST_IMAGES = 2


def _split_count(n: int, test_size: float | None) -> int:
    if test_size is None:
        count = max(MIN_TEST_IMAGES, round(0.1 * n))
    elif test_size < 1:
        count = max(1, round(test_size * n))
    else:
        count = int(test_size)
    if n <= MIN_TEST_IMAGES:
        raise DataError(
            f"found {n} image{'s' * (n != 1)}: need at least {MIN_TEST_IMAGES + 1} to hold "
            f"{MIN_TEST_IMAGES} out for testing and train on the rest (or pass --test-data)"
        )
    if count < MIN_TEST_IMAGES:
        raise DataError(
            f"--test-size {test_size} holds out {count} image of {n}: the evaluation needs at least "
            f"{MIN_TEST_IMAGES} test images"
        )
    if count >= n:
        raise DataError(f"--test-size {test_size} leaves no training images out of {n}")
    return count


def load_dataset(spec: Mapping[str, Any]) -> ImageDataset:
    """All images of a file, folder or particle spec, before the train/test split (in the input order;
    particles preprocessed, in memory as the spec's ``cache`` says)."""
    if spec.get("particles"):
        (full,) = _cache_particles([_load_particles(spec["particles"])], spec["particles"])
        return full
    return _load_unsplit(spec)


def _load_unsplit(spec: Mapping[str, Any]) -> ImageDataset:
    """:func:`load_dataset`, particles left on disk."""
    if spec.get("particles"):
        return _load_particles(spec["particles"])
    if spec.get("file"):
        return _load_file(spec["file"], spec.get("labels"))
    raise DataError("the data spec names neither a file, a folder, nor particles")


def load_data(spec: Mapping[str, Any]) -> tuple[ImageDataset, ImageDataset]:
    """``(train, test)`` data sets described by :func:`data_spec` or :func:`particle_spec`."""
    seed = int(spec.get("seed", 0))
    if spec.get("builtin"):
        name = spec["builtin"]
        if name not in BUILTIN:
            raise DataError(f"unknown built-in data set '{name}'; expected one of {sorted(BUILTIN)}")
        kwargs: dict[str, Any] = {"seed": seed}
        if spec.get("test_size") is not None:
            kwargs["test_size"] = int(spec["test_size"])
        train, test = BUILTIN[name](**kwargs)
    else:
        full = _load_unsplit(spec)  # particles read only once the split and --train-size are known
        if spec.get("test_file"):
            train, test = full, _load_file(spec["test_file"], spec.get("test_labels"))
            train.name, test.name = "train", "test"
        else:
            count = _split_count(len(full), spec.get("test_size"))
            order = np.random.default_rng(seed).permutation(len(full))
            train, test = full.subset(np.sort(order[count:])), full.subset(np.sort(order[:count]))
            train.name, test.name = f"{full.name}/train", f"{full.name}/test"
    if len(test) < MIN_TEST_IMAGES:
        option = "--test-data" if spec.get("test_file") else "--test-size"
        raise DataError(
            f"{option}: the test set holds {len(test)} image(s); the evaluation needs at least "
            f"{MIN_TEST_IMAGES}"
        )
    train_size = spec.get("train_size")
    if train_size is not None and train_size < len(train):
        name = train.name
        train = train.subset(range(int(train_size)))
        train.name = name
    if spec.get("particles"):
        train, test = _cache_particles([train, test], spec["particles"])
    return train, test


def _cache_particles(datasets: list[ImageDataset], particles: Mapping[str, Any]) -> list[ImageDataset]:
    """``datasets`` with their images read into memory when the spec's ``cache`` says so (see
    :func:`particle_spec`; ``"auto"`` for specs written before it)."""
    cache = particles.get("cache", "auto")
    size = sum(data.images.nbytes for data in datasets if isinstance(data.images, LazyImages))
    if cache == "never" or (cache == "auto" and size > CACHE_LIMIT):
        return datasets
    return [
        replace(data, images=data.images.cached()) if isinstance(data.images, LazyImages) else data
        for data in datasets
    ]


def check_images(train: ImageDataset, test: ImageDataset | None, likelihood: str) -> None:
    """The checks the command line makes beyond :class:`ImageDataset`'s: square images, one image shape
    for both splits, pixel values in ``[0, 1]`` for Bernoulli likelihoods."""
    _, height, width = train.image_shape
    if height != width:
        raise DataError(f"{train.name}: images must be square, found {height}x{width} pixels")
    if test is not None and test.image_shape != train.image_shape:
        raise DataError(
            f"test images are {'x'.join(map(str, test.image_shape))} (C x H x W) but training images "
            f"are {'x'.join(map(str, train.image_shape))}"
        )
    if likelihood in ("bernoulli", "continuous_bernoulli"):
        for data in (train, test):
            if data is None:
                continue
            images = data.checkable_images()  # particles left on disk: a sample of them
            low, high = float(images.min()), float(images.max())
            if low < 0.0 or high > 1.0:
                raise DataError(
                    f"{data.name}: the {likelihood} likelihood needs pixel values in [0, 1], found "
                    f"[{low:.3g}, {high:.3g}]; rescale the images or use --likelihood gaussian"
                )
