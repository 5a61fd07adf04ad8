"""Run folders: layout, the writer's lock, ``--overwrite``'s set-aside run, atomic JSON and CSV."""

from __future__ import annotations

import csv
import datetime as _datetime
import io
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write

try:  # advisory locks on run folders; Windows has no fcntl and its run folders go unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


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
