"""cryoSPARC particle files (``.cs``): read particles with their CTF, write the posterior back.

A ``.cs`` file is a numpy structured array saved with :func:`numpy.save` (cryosparc-tools' ``Dataset``
reads and writes the same layout; it is not needed here). Fields read, in cryoSPARC's names and units:
``uid`` (uint64), ``blob/path`` (the stack, bytes, relative to the cryoSPARC project directory; a leading
``>`` marks an imported file and is dropped), ``blob/idx`` (0-based image in the stack), ``blob/shape``,
``blob/psize_A`` (Å), and the CTF ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``, ``ctf/df1_A``,
``ctf/df2_A``, ``ctf/df_angle_rad`` and, when present, ``ctf/phase_shift_rad`` and ``ctf/bfactor``. They
map onto :class:`~pyro_svae.ctf.CTFParams` as RELION's columns do: ``df1_A``/``df2_A`` are
``rlnDefocusU``/``V`` (Å), ``df_angle_rad`` and ``phase_shift_rad`` become degrees (``rlnDefocusAngle``,
``rlnPhaseShift``). Input poses (``alignments2D``/``alignments3D``) are not read.

The posterior goes to a new ``.cs`` file with ``uid`` (to join on, as cryoSPARC joins a result's fields
with its particles) and this project's own fields ``pyro_svae/theta`` (radians, counter-clockwise in
pyro_svae's frame, in ``[-pi, pi)``), ``pyro_svae/theta_std`` (circular, radians),
``pyro_svae/theta_resultant``, ``pyro_svae/dx`` and ``pyro_svae/dx_std`` ``(2,)`` (grid units: the image
spans [-1, 1]), ``pyro_svae/z`` and ``pyro_svae/z_std`` ``(z_dim,)``, all float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..checkpoint import atomic_write
from .datasets import DataError, ImageDataset
from .loaders import _check_file

__all__ = ["read_cs", "cs_particle_table", "write_posterior_cs", "write_class_cs"]

# cryoSPARC CTF field -> (RELION column, factor to RELION's unit); the last two are optional
_CS_CTF = {
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/accel_kv": ("rlnVoltage", 1.0),
    "ctf/cs_mm": ("rlnSphericalAberration", 1.0),
    "ctf/amp_contrast": ("rlnAmplitudeContrast", 1.0),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
}


def read_cs(path: str | os.PathLike) -> np.ndarray:
    """The structured array of a cryoSPARC ``.cs`` file (no pickles); :class:`DataError` when it is not one
    or lacks ``blob/path``/``blob/idx``."""
    path = _check_file(path)
    try:
        with open(path, "rb") as handle:
            array = np.load(handle, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path}: not a readable cryoSPARC .cs file ({error})") from None
    if not isinstance(array, np.ndarray) or array.dtype.names is None or array.ndim != 1:
        raise DataError(f"{path}: expected a cryoSPARC .cs file (a numpy structured array of particles)")
    missing = [name for name in ("blob/path", "blob/idx") if name not in array.dtype.names]
    if missing:
        raise DataError(
            f"{path}: no {' or '.join(missing)} field: this .cs file does not name particle images "
            "(pass the particles' .cs file, not a passthrough one)"
        )
    if len(array) == 0:
        raise DataError(f"{path}: the .cs file holds no particles")
    return array


def _text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def cs_particle_table(array: np.ndarray, path: Path) -> pd.DataFrame:
    """The particles of a ``.cs`` array as a RELION-style table: ``rlnImageName`` ``k@blob/path``
    (1-based, the path as cryoSPARC stores it, relative to its project directory), the CTF in RELION's
    columns, ``rlnImagePixelSize`` from ``blob/psize_A`` and ``pyroSvaeCryosparcUid``."""
    names = array.dtype.names
    stacks = [name.lstrip(">") for name in _text(array["blob/path"])]
    index = np.asarray(array["blob/idx"]).astype(np.int64)
    if (index < 0).any():
        raise DataError(f"{path}: blob/idx holds a negative index at row {int(np.flatnonzero(index < 0)[0])}")
    table = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{s}" for i, s in zip(index, stacks, strict=True)]})
    if "blob/psize_A" in names:
        table["rlnImagePixelSize"] = np.asarray(array["blob/psize_A"], dtype=np.float64)
    required = [field for field in list(_CS_CTF)[:6] if field not in names]
    if not required:
        for field, (column, factor) in _CS_CTF.items():
            if field in names:
                table[column] = np.asarray(array[field], dtype=np.float64).reshape(len(array)) * factor
    if "uid" in names:
        table["pyroSvaeCryosparcUid"] = np.asarray(array["uid"]).astype(np.uint64)
    return table


def write_posterior_cs(
    path: str | os.PathLike,
    dataset: ImageDataset,
    *,
    theta_mean=None,
    theta_std=None,
    theta_resultant=None,
    dx_mean=None,
    dx_std=None,
    z_mean=None,
    z_std=None,
) -> Path:
    """Write the posterior of particles read from a ``.cs`` file as a ``.cs`` file (module notes): one row
    per particle in the input order, ``uid`` from the input, the ``pyro_svae/...`` fields of the arrays
    given (each in the data set's order). Replaced atomically; returns ``path``."""
    from .particles import _rows

    array = dataset.info.get("cs")
    if not isinstance(array, np.ndarray) or "uid" not in (array.dtype.names or ()):
        raise DataError(f"{dataset.name}: a .cs posterior needs particles read from a .cs file with uid")
    path = Path(path)
    n = len(dataset)
    source = np.arange(n) if dataset.source_index is None else dataset.source_index.cpu().numpy()
    order = np.argsort(source, kind="stable")
    fields: dict[str, np.ndarray] = {"uid": np.asarray(array["uid"])[source[order]].astype(np.uint64)}
    given = {
        "theta": (theta_mean, None),
        "theta_std": (theta_std, None),
        "theta_resultant": (theta_resultant, None),
        "dx": (dx_mean, 2),
        "dx_std": (dx_std, 2 if dx_std is None or np.ndim(dx_std) == 2 else None),
        "z": (z_mean, 0),
        "z_std": (z_std, 0),
    }
    for name, (value, width) in given.items():
        rows = _rows(value, n, name, width)
        if rows is None:
            continue
        if name == "theta":
            rows = np.mod(rows + np.pi, 2 * np.pi) - np.pi
        fields[f"pyro_svae/{name}"] = rows[order].astype(np.float32)
    dtype = [(name, "<u8" if name == "uid" else "<f4", values.shape[1:]) for name, values in fields.items()]
    out = np.empty(n, dtype=dtype)
    for name, values in fields.items():
        out[name] = values

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to a name
            np.save(handle, out)

    atomic_write(path, save)
    return path


def write_class_cs(path: str | os.PathLike, dataset: ImageDataset, classes, *, select=None) -> Path:
    """Write the input ``.cs`` records of particles read from a ``.cs`` file (every input field, ``uid``
    kept) plus ``pyro_svae/class`` (uint32, ``classes`` ``(N,)`` in the data set's order, e.g. k-means
    cluster + 1), sorted by input row; ``select`` (a boolean mask or positions, in the data set's order)
    writes only those particles. Replaced atomically; returns ``path``."""
    array = dataset.info.get("cs")
    if not isinstance(array, np.ndarray) or "uid" not in (array.dtype.names or ()):
        raise DataError(f"{dataset.name}: a .cs subset needs particles read from a .cs file with uid")
    n = len(dataset)
    classes = np.asarray(classes.cpu().numpy() if hasattr(classes, "cpu") else classes)
    if classes.shape != (n,) or not np.issubdtype(classes.dtype, np.integer):
        raise DataError(f"classes: expected integers of shape ({n},), found {classes.dtype} {classes.shape}")
    source = np.arange(n) if dataset.source_index is None else dataset.source_index.cpu().numpy()
    order = np.argsort(source, kind="stable")
    if select is not None:
        keep = np.zeros(n, dtype=bool)
        keep[np.asarray(select)] = True
        order = order[keep[order]]
    records = np.asarray(array)[source[order]]
    names = [name for name in records.dtype.names if name != "pyro_svae/class"]
    descr = [(name, records.dtype.fields[name][0]) for name in names] + [("pyro_svae/class", "<u4")]
    out = np.empty(len(order), dtype=descr)
    for name in names:
        out[name] = records[name]
    out["pyro_svae/class"] = classes[order].astype(np.uint32)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, out)

    atomic_write(path, save)
    return Path(path)
