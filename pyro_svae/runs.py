"""Run folders: what a training run leaves behind, and how a saved run is rebuilt.

Layout of a run folder (see the README)::

    RUN/
      config.json      everything needed to rebuild the model, the guide and the data
      metrics.csv      one row per epoch and split: ELBO, reconstruction, KL (nats per image), pose metrics
      checkpoint.pt    model, guide, optimizer, RNG and history (atomic, loaded with weights_only=True)
      summary.json     final test ELBO, importance-weighted bound, pose/content metrics, time, versions
      posterior.nc     ArviZ InferenceData: posterior draws of z, theta, dx per test image
      particles.star   (particle data) every input particle with posterior means and standard deviations
      figures/         training_curves.png, manifold.png, reconstructions.png, theta.png, traversal.gif
      .lock            held (``fcntl.flock``) by the process that trains in the folder; holds its PID

The data of a run are described in ``config.json`` by a *data spec* (:func:`data_spec`,
:func:`particle_spec`): a built-in name, or files and folders by absolute path and SHA-256, with the
preprocessing options and the seeded train/test split, so that a resumed run and ``pyro-svae evaluate``
rebuild exactly the same images.

Every file is written atomically (temporary file, then rename). ``--overwrite`` moves the run it
replaces into ``.replaced-run/`` and deletes it only once the new run has written its first checkpoint.
This module holds no command-line code: it raises :class:`RunError` (a ``ValueError``) with a message
for the user and returns data.
"""

from __future__ import annotations

import csv
import datetime as _datetime
import hashlib
import io
import json
import math
import os
import platform
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics as M
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, load_module_state
from .coords import wrap_angle
from .data import (
    BUILTIN,
    DataError,
    ImageDataset,
    load_image_folder,
    load_images,
    load_particles,
    preprocess_particles,
    write_posterior_star,
)
from .data.loaders import _FOLDER_SUFFIXES, _suffix
from .guides import AmortizedGuide, ProjectedNormalAngle, WrappedNormal
from .infer import evaluate, guide_inputs, posterior_means, recovery_metrics
from .model import SpatialVAE
from .pose_search import PoseSearchGuide

try:  # advisory locks on run folders; Windows has no fcntl and its run folders go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "RunError",
    "RunFolder",
    "new_run_dir",
    "prepare_run_folder",
    "open_run_folder",
    "run_lock",
    "restore_replaced",
    "discard_replaced",
    "remove_orphans",
    "write_json",
    "read_json",
    "make_config",
    "model_config",
    "build_model",
    "load_trained",
    "check_checkpoint_config",
    "data_spec",
    "particle_spec",
    "load_dataset",
    "load_data",
    "is_particle_spec",
    "check_images",
    "write_metrics",
    "read_metrics",
    "sample_posterior",
    "posterior_inference_data",
    "write_posterior",
    "load_posterior",
    "final_report",
    "write_figures",
    "posterior_summaries",
    "circular_std",
    "write_particles_star",
    "write_traversal",
    "environment",
]

CONFIG_VERSION = 1
METRIC_COLUMNS = ("epoch", "split", "elbo", "reconstruction", "kl")
NOT_IN_METRICS = ("seconds",)  # timings vary between runs; metrics.csv rows are reproducible
FIGURES = ("training_curves.png", "manifold.png", "reconstructions.png", "theta.png", "traversal.gif")
EVALUATION_FILES = ("summary.json", "posterior.nc")  # and figures/: RUN/evaluation-<data>/ of `evaluate`
SAMPLE_FILES = ("samples.npz", "samples.png")  # RUN/samples/ of `pyro-svae sample`
TEMPORARY_SUFFIXES = (".tmp", ".tmp.gif")  # of atomic_write's temporary files


class RunError(ValueError):
    """A run folder that cannot be created, read or rebuilt."""


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFolder:
    """Paths of the files of one run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def posterior(self) -> Path:
        return self.root / "posterior.nc"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def particles_star(self) -> Path:
        return self.root / "particles.star"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def replaced(self) -> Path:
        """Where ``--overwrite`` keeps the run it replaces until the new run's first checkpoint."""
        return self.root / ".replaced-run"

    @property
    def moving(self) -> Path:
        """The replaced run while its files move (aside or back): the folder holds no new run's files."""
        return self.root / ".replaced-run.partial"

    def run_files(self) -> list[Path]:
        """Where ``pyro-svae train`` writes its files (existing or not), figures included."""
        files = [self.config, self.metrics, self.summary, self.checkpoint, self.posterior]
        return [*files, self.particles_star, *(self.figures / name for name in FIGURES)]

    def outputs(self) -> list[Path]:
        """The files this project wrote into the folder that exist now: the run's files and figures,
        ``evaluation-*/`` of ``pyro-svae evaluate`` and ``samples/`` of ``pyro-svae sample``; no others."""
        files = self.run_files()
        for evaluation in sorted(self.root.glob("evaluation-*")):
            files += [evaluation / name for name in EVALUATION_FILES]
            files += [evaluation / "figures" / name for name in FIGURES]
        files += [self.root / "samples" / name for name in SAMPLE_FILES]
        return [path for path in files if path.is_file()]


def new_run_dir(base: str | os.PathLike = "runs", label: str = "run") -> Path:
    """A folder name under ``base`` that does not exist yet: ``base/YYYYmmdd-HHMMSS-label[-n]``."""
    stamp = _datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "run"
    candidate = Path(base) / f"{stamp}-{safe}"
    index = 1
    while candidate.exists():
        index += 1
        candidate = Path(base) / f"{stamp}-{safe}-{index}"
    return candidate


@contextmanager
def run_lock(root: str | os.PathLike, *, create: bool = False) -> Iterator[RunFolder]:
    """Hold the run folder ``root`` for the ``with`` block: an advisory ``fcntl.flock`` on ``root/.lock``
    (which then holds this process's PID). The lock ends with the process, so a crash never leaves the
    folder locked. ``create`` makes a missing folder. Raises :class:`RunError` naming the holder's PID
    when another process (or another ``run_lock`` in this one) holds it. Without ``fcntl`` (Windows): no lock.
    """
    folder = RunFolder(Path(root))
    if folder.root.exists() and not folder.root.is_dir():
        raise RunError(f"{folder.root} exists and is not a folder")
    if create:
        folder.root.mkdir(parents=True, exist_ok=True)
    elif not folder.root.is_dir():
        raise RunError(f"no run folder at {folder.root}")
    if fcntl is None:  # pragma: no cover - Windows
        yield folder
        return
    fd = os.open(folder.lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise RunError(
                f"{folder.root} is in use by process {holder} (it holds {folder.lock.name}): wait for it "
                "to end or stop it, then try again"
            ) from None
        except OSError as error:  # a file system without locks (some network mounts): go on unlocked
            warnings.warn(f"{folder.lock}: cannot lock ({error.strerror}); going on unlocked", stacklevel=3)
            locked = False
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield folder
        finally:
            if locked:
                os.ftruncate(fd, 0)  # a later reader finds no stale PID
    finally:
        os.close(fd)


def prepare_run_folder(root: str | os.PathLike, *, overwrite: bool = False) -> RunFolder:
    """Create a folder for a new run; refuses one that holds a run unless ``overwrite``.

    With ``overwrite`` the project's files (:meth:`RunFolder.outputs`) move into ``.replaced-run/``:
    :func:`discard_replaced` deletes them once the new run has its first checkpoint,
    :func:`restore_replaced` puts them back. Other files stay untouched. Call it holding :func:`run_lock`.
    """
    folder = RunFolder(Path(root))
    if folder.root.exists() and not folder.root.is_dir():
        raise RunError(f"{folder.root} exists and is not a folder")
    for aside in (folder.replaced, folder.moving):
        if aside.exists():
            raise RunError(f"{aside} holds a run set aside by an unfinished --overwrite")
    existing = folder.outputs()
    if existing and not overwrite:
        names = ", ".join(dict.fromkeys(path.relative_to(folder.root).parts[0] for path in existing))
        raise RunError(
            f"{folder.root} already holds a run ({names}); pass --overwrite to replace it, "
            f"or continue it with: pyro-svae train --resume {folder.root}"
        )
    for path in existing:
        _move(path, folder.root, folder.moving)
    if existing:
        folder.moving.rename(folder.replaced)  # all of it aside: a crash before this restores it all
    folder.root.mkdir(parents=True, exist_ok=True)
    return folder


def restore_replaced(folder: RunFolder) -> bool:
    """Put back the run :func:`prepare_run_folder` set aside, deleting the new run's files; returns
    whether there was one. Also completes a move a crash interrupted."""
    if folder.replaced.is_dir():
        for path in folder.outputs():
            _move(path, folder.root, None)
        folder.replaced.rename(folder.moving)
    if not folder.moving.is_dir():
        return False
    for path in sorted(path for path in folder.moving.rglob("*") if path.is_file()):
        _move(path, folder.moving, folder.root)
    shutil.rmtree(folder.moving)
    return True


def discard_replaced(folder: RunFolder) -> bool:
    """Delete the run :func:`prepare_run_folder` set aside; returns whether there was one."""
    if not folder.replaced.is_dir():
        return False
    shutil.rmtree(folder.replaced)
    return True


def remove_orphans(folder: RunFolder) -> int:
    """Delete the temporary files a killed writer left beside the run's files (``.NAME.XXXXXXXX.tmp``,
    in the folder and ``figures/``); returns how many. Call it holding :func:`run_lock`."""
    orphans = [
        candidate
        for path in folder.run_files()
        if path.parent.is_dir()
        for candidate in path.parent.glob(f".{path.name}.*")
        if candidate.name.endswith(TEMPORARY_SUFFIXES) and candidate.is_file()
    ]
    for orphan in orphans:
        orphan.unlink()
    return len(orphans)


def _move(path: Path, source: Path, target: Path | None) -> None:
    """Move file ``path`` from under folder ``source`` to the same place under ``target`` (``None``:
    delete it), then remove the folders this leaves empty up to ``source``."""
    if target is None:
        path.unlink()
    else:
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    parent = path.parent
    while parent != source and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def open_run_folder(root: str | os.PathLike) -> RunFolder:
    """An existing run folder (one holding ``config.json``)."""
    folder = RunFolder(Path(root))
    if not folder.root.is_dir():
        raise RunError(f"no run folder at {folder.root}")
    if not folder.config.is_file():
        raise RunError(f"{folder.root} is not a run folder: it has no config.json")
    return folder


def prepare_output_folder(root: str | os.PathLike, names: Iterable[str], *, overwrite: bool) -> Path:
    """A folder for the outputs ``names`` of ``evaluate``/``sample``: refuses to replace existing ones
    unless ``overwrite``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunError(f"{root} exists and is not a folder")
    existing = [name for name in names if (root / name).exists()]
    if existing and not overwrite:
        raise RunError(f"{root} already holds {', '.join(existing)}; pass --overwrite to replace them")
    root.mkdir(parents=True, exist_ok=True)
    return root


# --------------------------------------------------------------------------------------------------
# JSON and CSV
# --------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, atomically; non-finite floats become ``null``."""
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RunError(f"{path}: expected a JSON object")
    return payload


def _format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_metrics(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write per-epoch records (``History.records``) as CSV, atomically.

    Columns: ``epoch, split, elbo, reconstruction, kl`` then any pose metrics in order of appearance;
    per-epoch timings are left out so that a resumed run reproduces the rows of an uninterrupted one.
    """
    columns = list(METRIC_COLUMNS)
    for record in records:
        for key in record:
            if key not in columns and key not in NOT_IN_METRICS:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_format_value(record.get(column)) for column in columns])
    text = buffer.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv``: ``epoch`` as int, ``split`` as str, other values float or None."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if key == "epoch":
                    parsed[key] = int(value)
                elif key == "split":
                    parsed[key] = value
                else:
                    parsed[key] = float(value) if value != "" else None
            rows.append(parsed)
    return rows


# --------------------------------------------------------------------------------------------------
# Data
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


PARTICLE_SUFFIXES = (".star", ".mrcs", ".mrc", ".npy")


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
    test_size: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The data spec of cryo-EM particles (see :func:`data_spec`): a RELION ``.star`` file, or an
    ``.mrcs``/``.mrc``/``.npy`` stack with an optional CTF ``.star`` file ``ctf`` (same rows, same order).

    ``use_ctf=False`` drops the CTF parameters even when the data carry them; a ``ctf`` file must carry
    CTF columns. ``pixel_size`` (Å) fills in for data that lack it. The particles are then preprocessed
    (:func:`~pyro_svae.data.preprocess_particles`: ``invert``, Fourier crop to ``box``, ``normalize``
    with ``mask_radius``) and split as files are.
    """
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
    if ctf is not None and suffix == ".star":
        raise ValueError("--ctf gives the CTF rows of a stack; a STAR file carries its own CTF columns")
    if ctf is not None and not use_ctf:
        raise ValueError("--ctf and --no-ctf contradict each other")
    if pixel_size is not None and not 0 < pixel_size < math.inf:
        raise ValueError(f"--pixel-size must be a positive number of Å, got {pixel_size}")
    if box is not None and box < 2:
        raise ValueError(f"--box must be at least 2 pixels, got {box}")
    if mask_radius is not None and not mask_radius > 0:
        raise ValueError(f"--mask-radius must be a positive number of pixels, got {mask_radius}")
    return {
        "particles": {
            "file": _file_entry(particles),
            "ctf_file": _file_entry(ctf),
            "pixel_size": pixel_size,
            "use_ctf": bool(use_ctf),
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
    from .data import PARTICLE_BUILTINS

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


def _load_particles(spec: Mapping[str, Any]) -> ImageDataset:
    entry, ctf_entry = spec["file"], spec.get("ctf_file")
    for item in (entry, ctf_entry):
        if item is not None:
            _check_unchanged(item)
    use_ctf = bool(spec.get("use_ctf", True))
    data = load_particles(
        entry["path"],
        ctf=None if ctf_entry is None else ctf_entry["path"],
        pixel_size=spec.get("pixel_size"),
        require_ctf=ctf_entry is not None and use_ctf,
    )
    if not use_ctf and data.ctf is not None:
        data = replace(data, ctf=None)
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
    particles preprocessed)."""
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
        full = load_dataset(spec)
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
    return train, test


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
            low, high = float(data.images.min()), float(data.images.max())
            if low < 0.0 or high > 1.0:
                raise DataError(
                    f"{data.name}: the {likelihood} likelihood needs pixel values in [0, 1], found "
                    f"[{low:.3g}, {high:.3g}]; rescale the images or use --likelihood gaussian"
                )


# --------------------------------------------------------------------------------------------------
# Config and model
# --------------------------------------------------------------------------------------------------
GUIDE_KINDS = {"amortized": AmortizedGuide, "pose_search": PoseSearchGuide}
_POSE_SEARCH_ENCODERS = {"RotationEquivariantEncoder": "equivariant", "MLPEncoder": "mlp"}


def model_config(model: SpatialVAE, guide: AmortizedGuide | PoseSearchGuide) -> dict[str, Any]:
    """The part of a config that fixes the networks (and so must match a checkpoint). The guide's
    ``kind`` (``"amortized"`` or ``"pose_search"``) says which class :func:`build_model` rebuilds."""
    kind = "pose_search" if isinstance(guide, PoseSearchGuide) else "amortized"
    return json.loads(json.dumps({"model": model.config, "guide": {"kind": kind, **guide.config}}))


def make_config(
    model: SpatialVAE,
    guide: AmortizedGuide,
    *,
    data: Mapping[str, Any],
    training: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``config.json`` of a run: model, guide, data and training settings."""
    from . import __version__

    return {
        "config_version": CONFIG_VERSION,
        "pyro_svae_version": __version__,
        **model_config(model, guide),
        "data": dict(data),
        "training": dict(training),
    }


def build_model(config: Mapping[str, Any]) -> tuple[SpatialVAE, AmortizedGuide | PoseSearchGuide]:
    """A fresh (untrained) model and guide from a run's config: an :class:`AmortizedGuide` (guide kind
    ``"amortized"``, the default of configs without one) or a :class:`PoseSearchGuide`
    (``"pose_search"``)."""
    try:
        model_kwargs = dict(config["model"])
        guide_kwargs = dict(config["guide"])
    except (KeyError, TypeError):
        raise RunError("config.json has no 'model' and 'guide' sections") from None
    kind = guide_kwargs.pop("kind", "amortized")
    if kind not in GUIDE_KINDS:
        raise RunError(f"config.json names a guide kind {kind!r}; expected one of {sorted(GUIDE_KINDS)}")
    encoder = guide_kwargs.pop("encoder", "mlp")
    if kind == "amortized" and encoder != "mlp":
        raise RunError(f"config.json names an encoder ({encoder}) that cannot be rebuilt from a config")
    if kind == "pose_search":
        if encoder not in _POSE_SEARCH_ENCODERS:
            raise RunError(f"config.json names an encoder ({encoder}) that cannot be rebuilt from a config")
        guide_kwargs["encoder"] = _POSE_SEARCH_ENCODERS[encoder]
    try:
        model = SpatialVAE(**model_kwargs)
        guide = GUIDE_KINDS[kind](model, **guide_kwargs)
    except TypeError as error:
        raise RunError(f"config.json does not describe a model this version can build ({error})") from None
    return model, guide


def check_checkpoint_config(state: Mapping[str, Any], config: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`CheckpointError` when a checkpoint was written for other networks than ``config``."""
    saved = state.get("run_config")
    if saved is None:
        return
    wanted = json.loads(json.dumps({"model": config.get("model"), "guide": config.get("guide")}))
    if saved == wanted:
        return
    differences = []
    for part in ("model", "guide"):
        a, b = saved.get(part) or {}, wanted.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differences.append(f"{part}.{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    raise CheckpointError(f"{where} does not match the run's config.json ({'; '.join(differences[:3])})")


def read_config(folder: RunFolder) -> dict[str, Any]:
    """A run's ``config.json``, refused with :class:`RunError` when its ``config_version`` is missing
    or newer than this version of pyro_svae reads."""
    config = read_json(folder.config)
    version = config.get("config_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunError(f"{folder.config}: not a pyro_svae run config (config_version is {version!r})")
    if version > CONFIG_VERSION:
        raise RunError(
            f"{folder.config} was written by a newer pyro_svae (config version {version}; this one "
            f"reads up to {CONFIG_VERSION}): upgrade pyro_svae to read it"
        )
    return config


def load_trained(
    root: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[RunFolder, dict[str, Any], SpatialVAE, AmortizedGuide, dict[str, Any]]:
    """Rebuild a saved run: ``(folder, config, model, guide, checkpoint_state)``, modules on ``device``
    in eval mode. Raises :class:`RunError`/:class:`CheckpointError` with the reason when they cannot."""
    folder = open_run_folder(root)
    config = read_config(folder)
    if not folder.checkpoint.is_file():
        raise RunError(f"{folder.root} has no checkpoint.pt (did training finish an epoch?)")
    state = load_checkpoint(folder.checkpoint, map_location=device)
    check_checkpoint_config(state, config, folder.checkpoint)
    model, guide = build_model(config)
    load_module_state(model, state["model"], "model of config.json")
    load_module_state(guide, state["guide"], "guide of config.json")
    model.to(device).eval()
    guide.to(device).eval()
    return folder, config, model, guide, state


# --------------------------------------------------------------------------------------------------
# Posterior samples
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_posterior(
    guide: AmortizedGuide, data: ImageDataset, *, draws: int = 100, batch_size: int = 500
) -> dict[str, np.ndarray]:
    """Draws from ``q(site | image)`` for every image: ``{site: (draws, N, *event_shape)}`` on the CPU.

    Uses the global torch RNG (seed it first for reproducible draws).
    """
    if draws < 1:
        raise ValueError(f"the number of posterior draws must be positive, got {draws}")
    device = next(guide.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    for index in torch.arange(len(data)).split(batch_size):
        inputs = guide_inputs(guide, data, index, device)
        for site, q in guide.distributions(data.images[index].to(device), **inputs).items():
            out.setdefault(site, []).append(q.sample((draws,)).float().cpu())
    return {site: torch.cat(values, dim=1).numpy() for site, values in out.items()}


def posterior_inference_data(
    samples: Mapping[str, np.ndarray], data: ImageDataset, *, attrs: Mapping[str, Any] | None = None
):
    """An ArviZ ``InferenceData``: group ``posterior`` with ``z`` ``(chain, draw, image, z_dim)``,
    ``theta`` ``(chain, draw, image)`` (radians, wrapped to ``[-pi, pi)``) and ``dx``
    ``(chain, draw, image, xy)``; group ``constant_data`` with the known truth (``theta_true``,
    ``dx_true``, ``label``) of the images."""
    az = _arviz()
    posterior = {site: np.asarray(values)[None] for site, values in samples.items()}
    if "theta" in posterior:
        posterior["theta"] = wrap_angle(torch.from_numpy(posterior["theta"])).numpy()
    dims: dict[str, list[str]] = {
        "z": ["image", "z_dim"],
        "theta": ["image"],
        "theta_bin": ["image"],
        "theta_offset": ["image"],
        "dx": ["image", "xy"],
        "scale": ["image"],
    }
    coords: dict[str, Any] = {"image": np.arange(len(data)), "xy": ["x", "y"]}
    if "z" in samples:
        coords["z_dim"] = np.arange(samples["z"].shape[-1])
    constant: dict[str, np.ndarray] = {}
    if data.theta is not None:
        constant["theta_true"] = data.theta.numpy()
        dims["theta_true"] = ["image"]
    if data.dx is not None:
        constant["dx_true"] = data.dx.numpy()
        dims["dx_true"] = ["image", "xy"]
    if data.scale is not None:
        constant["scale_true"] = data.scale.numpy()
        dims["scale_true"] = ["image"]
    if data.labels is not None:
        constant["label"] = data.labels.numpy()
        dims["label"] = ["image"]
    info = {
        "data": data.name,
        "theta_units": "radians, counter-clockwise, in [-pi, pi)",
        "dx_units": "grid units (the image spans [-1, 1])",
        **(attrs or {}),
    }
    return az.from_dict(
        posterior=posterior,
        constant_data=constant or None,
        coords=coords,
        dims={k: v for k, v in dims.items() if k in posterior or k in constant},
        posterior_attrs=_jsonable(info),
        constant_data_attrs=_jsonable(info) if constant else None,
    )


def write_posterior(path: str | os.PathLike, inference_data) -> None:
    """Write an ``InferenceData`` as NetCDF (h5netcdf engine), atomically."""
    atomic_write(path, lambda tmp: inference_data.to_netcdf(tmp, engine="h5netcdf"))


def load_posterior(path: str | os.PathLike):
    """Read a ``posterior.nc`` written by :func:`write_posterior` as an ArviZ ``InferenceData``."""
    return _arviz().from_netcdf(str(path))


def _arviz():
    with warnings.catch_warnings():  # arviz announces its refactor with a FutureWarning on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# --------------------------------------------------------------------------------------------------
# Final report and figures
# --------------------------------------------------------------------------------------------------
def final_report(
    model: SpatialVAE,
    guide: AmortizedGuide,
    test: ImageDataset,
    *,
    train: ImageDataset | None = None,
    num_particles: int = 16,
    batch_size: int = 100,
    seed: int | None = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Test ELBO and importance-weighted bound (``num_particles`` samples per image), pose recovery and
    content metrics (k-NN accuracy from training ``z``, KMeans clustering accuracy) where the truth is
    known. Returns ``(report, posterior means of the test images)``."""
    result = evaluate(model, guide, test, num_particles=num_particles, batch_size=batch_size, seed=seed)
    report: dict[str, Any] = {
        key: result[key] for key in ("elbo", "iw_elbo", "reconstruction", "kl", "num_particles")
    }
    report["num_images"] = len(test)
    means = posterior_means(guide, test)
    train_means = posterior_means(guide, train) if train is not None and train.labels is not None else None
    report.update(recovery_metrics(means, test, train_means=train_means, train=train))
    if test.labels is not None and len(torch.unique(test.labels)) > 1:
        report["clustering_accuracy"] = M.clustering_accuracy(means["z"], test.labels)
    for name, factor in test.factors.items():  # e.g. the conformation of simulated particles
        if len(test) > 2 and float(factor.std()) > 0:
            report[f"z_spearman_{name}"] = M.best_spearman(means["z"], factor)[0]
    return report, means


def _save(figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    return path


@torch.no_grad()
def write_figures(
    folder: str | os.PathLike,
    *,
    model: SpatialVAE,
    test: ImageDataset,
    means: Mapping[str, torch.Tensor],
    records: Sequence[Mapping[str, Any]] | None = None,
    report: Mapping[str, Any] | None = None,
    manifold_steps: int = 10,
    num_reconstructions: int = 10,
) -> list[Path]:
    """Save the run's PNG figures in ``folder``; returns their paths.

    ``training_curves.png`` (when ``records``), ``manifold.png``, ``reconstructions.png`` (inputs
    spread over ``test``, reconstructions at the inferred pose, content at pose zero) and ``theta.png``
    (when the model rotates and the test data know their rotations).
    """
    from . import plots

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if records:
        written.append(_save(plots.training_curves_figure(records), folder / "training_curves.png"))
    steps = manifold_steps
    typical_scale = means["scale"].median() if "scale" in means else None  # the decoder picks its own unit
    images, values = plots.decode_manifold(model, steps, scale=typical_scale)
    if model.z_dim == 1:
        images = images[:1]
    written.append(_save(plots.manifold_figure(images, values), folder / "manifold.png"))

    device = model.grid.device
    count = min(num_reconstructions, len(test))
    pick = torch.linspace(0, len(test) - 1, count).round().long()  # spread over the data set
    inputs = test.images[pick]
    z = means["z"][pick].to(device)
    theta = means["theta"][pick].to(device) if "theta" in means else None
    dx = means["dx"][pick].to(device) if "dx" in means else None
    scale = means["scale"][pick].to(device) if "scale" in means else None
    blur = model.psf_fwhm is not None  # as the telescope records them
    was_training = model.training
    model.eval()
    try:
        reconstructions = model.decode(z, theta, dx, scale, blur=blur).cpu()
        aligned = None
        if theta is not None or dx is not None:
            zero_theta = None if theta is None else torch.zeros_like(theta)
            zero_dx = None if dx is None else torch.zeros_like(dx)
            aligned = model.decode(z, zero_theta, zero_dx, scale, blur=blur).cpu()
    finally:
        model.train(was_training)
    figure = plots.reconstructions_figure(inputs, reconstructions, aligned)
    written.append(_save(figure, folder / "reconstructions.png"))

    if "theta" in means and test.theta is not None:
        correlation = None if report is None else report.get("theta_circ_corr")
        figure = plots.theta_scatter_figure(means["theta"], test.theta, circular_correlation=correlation)
        written.append(_save(figure, folder / "theta.png"))
    return written


def write_traversal(
    folder: str | os.PathLike,
    model: SpatialVAE,
    *,
    means: Mapping[str, torch.Tensor] | None = None,
    steps: int = 24,
) -> Path:
    """``folder/traversal.gif``: ``z`` decoded at pose zero along the prior's central 95 % (``z_dim`` 1) or
    along the first principal axis of the posterior means ``means["z"]`` (``z_dim > 1``; without
    means, along ``z_1``); see :func:`pyro_svae.plots.traversal_animation`."""
    from . import plots

    z = None if means is None else means.get("z")
    return plots.traversal_animation(model, Path(folder) / "traversal.gif", steps=steps, means=z)


def _analytic_std(q: torch.distributions.Distribution) -> torch.Tensor | None:
    base = q
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    normal = (
        torch.distributions.Normal,
        torch.distributions.MultivariateNormal,
        torch.distributions.LowRankMultivariateNormal,
    )
    return q.stddev if isinstance(base, normal) else None


def _circular_moment(q: torch.distributions.Distribution) -> torch.Tensor | None:
    """``E[exp(i theta)]`` (complex, batch shape) of an angle's distribution where it has a closed form:
    (wrapped) Normal ``exp(i loc - scale^2 / 2)``, von Mises ``exp(i loc) I1(k) / I0(k)``, the angle of a
    projected normal, mixtures of these and these turned by fixed angles; None otherwise."""
    dists = torch.distributions
    while isinstance(q, dists.Independent):
        q = q.base_dist
    if isinstance(q, dists.TransformedDistribution):
        moment = _circular_moment(q.base_dist)
        for transform in q.transforms:
            turn = isinstance(transform, dists.AffineTransform) and transform.event_dim == 0
            if moment is None or not (turn and bool(torch.all(torch.as_tensor(transform.scale) == 1))):
                return None
            loc = torch.as_tensor(transform.loc, dtype=moment.real.dtype, device=moment.device)
            moment = moment * torch.polar(torch.ones_like(loc), loc)
        return moment
    if isinstance(q, dists.Normal | WrappedNormal):
        return torch.polar(torch.exp(-0.5 * q.scale**2), q.loc)
    if isinstance(q, dists.VonMises):
        k = q.concentration
        return torch.polar(torch.special.i1e(k) / torch.special.i0e(k), q.loc)
    if isinstance(q, ProjectedNormalAngle):  # unit-covariance normal vector of mean c, |c| = rho
        c = q.concentration
        rho = c.norm(dim=-1)
        half = rho**2 / 4
        length = math.sqrt(math.pi / 8) * rho * (torch.special.i0e(half) + torch.special.i1e(half))
        return torch.polar(length, torch.atan2(c[..., 1], c[..., 0]))
    if isinstance(q, dists.MixtureSameFamily):
        moment = _circular_moment(q.component_distribution)
        return None if moment is None else (q.mixture_distribution.probs * moment).sum(-1)
    return None


def circular_std(resultant: torch.Tensor) -> torch.Tensor:
    """Circular standard deviation ``sqrt(-2 ln R)`` (radians, same shape) of mean resultant lengths ``R``,
    capped at ``pi``: ``pi`` means spread over the whole circle (``R < exp(-pi^2 / 2) ~ 0.007`` cannot be
    told from a uniform angle)."""
    return torch.sqrt(-2.0 * torch.log(resultant)).clamp(max=math.pi)


@torch.no_grad()
def posterior_summaries(
    guide, data: ImageDataset, *, draws: int = 100, batch_size: int = 500
) -> dict[str, torch.Tensor]:
    """Per-image posterior means and standard deviations, on the CPU: ``<site>_mean`` and ``<site>_std``
    for each of the guide's sites ``z`` ``(N, z_dim)``, ``theta`` ``(N,)`` (radians), ``dx`` ``(N, 2)``
    (grid units) and ``scale`` ``(N,)``; with ``theta``, also ``theta_resultant`` ``(N,)``.

    The guide runs in ``eval()`` mode (no training-time augmentation). Means are its point estimates
    (:meth:`posterior_means`; for a pose-search guide ``theta`` is the angle of the most probable bin),
    ``theta_mean`` wrapped to ``[-pi, pi)``. ``theta`` is summarized as an angle: ``theta_resultant`` is
    the mean resultant length ``R = |E exp(i theta)|`` in ``[0, 1]`` and ``theta_std`` the circular
    standard deviation :func:`circular_std` (at most ``pi``); ``R`` is analytic for (wrapped) Normal, von
    Mises, projected normal families and mixtures of them, else estimated from ``draws`` samples per
    image. Other sites' standard deviations are analytic for normal families, else the sample standard
    deviation of ``draws`` samples. Uses the global torch RNG (seed it first for reproducible estimates).
    """
    if draws < 2:
        raise ValueError(f"estimating standard deviations needs at least 2 draws, got {draws}")
    device = next(guide.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        out.setdefault(key, []).append(value.float().cpu())

    was_training = guide.training
    guide.eval()
    try:
        for index in torch.arange(len(data)).split(batch_size):
            images = data.images[index].to(device)
            inputs = guide_inputs(guide, data, index, device)
            means = guide.posterior_means(images, **inputs)
            q = guide.distributions(images, **inputs)
            for site in ("z", "theta", "dx", "scale"):
                if site not in q:
                    continue
                if site == "theta":
                    moment = _circular_moment(q[site])
                    if moment is None:
                        samples = q[site].sample((draws,)).float()
                        moment = torch.polar(torch.ones_like(samples), samples).mean(0)
                    resultant = moment.abs().clamp(max=1.0)
                    keep("theta_mean", wrap_angle(means[site]))
                    keep("theta_std", circular_std(resultant))
                    keep("theta_resultant", resultant)
                    continue
                std = _analytic_std(q[site])
                if std is None:
                    std = q[site].sample((draws,)).float().std(0)
                keep(f"{site}_mean", means[site])
                keep(f"{site}_std", std)
    finally:
        guide.train(was_training)
    return {key: torch.cat(values) for key, values in out.items()}


def _rebased_image_names(data: ImageDataset, folder: Path) -> ImageDataset:
    """``data`` with the ``rlnImageName`` stacks of its input STAR table re-expressed relative to
    ``folder`` (where the new STAR file goes), resolved as the reader resolved them (next to the input
    STAR file, else in the working directory), so that the written file still finds its images."""
    import pandas as pd

    table, star_path = data.info.get("star"), data.info.get("star_path")
    if not isinstance(table, pd.DataFrame) or not star_path:
        return data
    target = folder.resolve()

    def relative(path: Path) -> str:
        try:
            return os.path.relpath(path.resolve(), target)
        except ValueError:  # another drive (Windows)
            return str(path.resolve())

    stack = data.info.get("stack_path")
    if stack:  # a stack with CTF rows from a STAR file: row k is image k of the stack
        names = [f"{k + 1:06d}@{relative(Path(stack))}" for k in range(len(table))]
        rebased = table.drop(columns="rlnImageName", errors="ignore")
        rebased.insert(0, "rlnImageName", names)
        return replace(data, info={**data.info, "star": rebased})
    if "rlnImageName" not in table.columns:
        return data
    base = Path(star_path).parent
    cache: dict[str, str] = {}

    def rebase(name: str) -> str:
        index, at, stack = name.rpartition("@")
        if stack not in cache:
            found = Path(stack)
            if not found.is_absolute():
                found = next((c for c in (base / stack, Path.cwd() / stack) if c.is_file()), base / stack)
            cache[stack] = relative(found)
        return f"{index}{at}{cache[stack]}"

    rebased = table.copy()
    rebased["rlnImageName"] = [rebase(str(name)) for name in table["rlnImageName"]]
    return replace(data, info={**data.info, "star": rebased})


def write_particles_star(
    path: str | os.PathLike,
    guide,
    data: ImageDataset,
    *,
    draws: int = 100,
    batch_size: int = 500,
) -> Path:
    """Write every particle of ``data`` (loaded by :func:`load_particles`, in the input order) with its
    posterior summaries (:func:`posterior_summaries`) as a RELION STAR file (see
    :func:`pyro_svae.data.write_posterior_star`: ``rlnAnglePsi``/``rlnOriginX/YAngst`` from the posterior
    means, or ``pyroSvaePsiDeg``/``pyroSvaeOriginX/YAngst`` for an input with 3-D poses, whose pose columns
    stay as they are (:func:`pyro_svae.data.posterior_pose_note`), ``pyroSvaePsiStdDeg`` (circular),
    ``pyroSvaePsiResultant``, ``pyroSvaeOriginX/YStdAngst``, ``pyroSvaeZ<k>``, ``pyroSvaeZStd<k>``).
    ``rlnImageName`` paths are rewritten relative to the new file's folder, so it finds the input stacks.
    """
    summary = posterior_summaries(guide, data, draws=draws, batch_size=batch_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = _rebased_image_names(data, Path(path).parent)
    return write_posterior_star(
        path,
        data,
        theta_mean=summary.get("theta_mean"),
        theta_std=summary.get("theta_std"),
        theta_resultant=summary.get("theta_resultant"),
        dx_mean=summary.get("dx_mean"),
        dx_std=summary.get("dx_std"),
        z_mean=summary.get("z_mean"),
        z_std=summary.get("z_std"),
    )


def environment(device: torch.device | str) -> dict[str, Any]:
    """Versions and hardware of this process, for ``summary.json``."""
    import pyro

    from . import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "pyro_svae": __version__,
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "numpy": np.__version__,
        },
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info
