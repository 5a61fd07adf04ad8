"""Cryo-EM particle stacks: RELION pose conventions (this part), readers, preprocessing and STAR export.

Pose conventions. An MRC image array ``a[row, col]`` is shown by RELION with columns as +x and rows as +y
(row 0 at the bottom); pyro_svae shows the same array with row 0 at the *top* (``y`` up, see
:mod:`pyro_svae.coords`). RELION's ``rlnAnglePsi = psi`` turns the content *clockwise* in its frame about
pixel ``(N // 2, N // 2)``; a vertical flip turns clockwise into counter-clockwise, so in pyro_svae's
frame the content turns counter-clockwise by ``theta = psi`` (radians). A positive origin ``(ox, oy)``
(pixels) moves the content by ``(-ox, -oy)`` in RELION's frame, i.e. by ``(-ox, +oy)`` pixels in ours.
The rotation centre ``c`` (pixel ``N // 2``) is half a pixel off the grid centre ``(N - 1)/2`` of
pyro_svae's grid for even boxes (RELION's only supported case; on it for odd ones), so the content
shift in grid units is ``dx = s + c - R(theta) c`` with ``s`` the converted origin shift.

Files. Stacks are read with :mod:`mrcfile` (``.mrcs``/``.mrc``) or numpy (``.npy``), STAR files with
:mod:`starfile`, in RELION 3.0 (one particle block) and 3.1+ (``optics`` and ``particles`` blocks) layouts.
``rlnImageName`` ``k@stack.mrcs`` is 1-based; a relative stack path is looked up next to the STAR file first,
then in the working directory (where RELION itself resolves it, the project folder). Columns written by this
package carry the prefix ``pyroSvae`` (starfile writes any column name): ground truth of simulated data
``pyroSvaeTrue_<factor>``, ``pyroSvaeTrueLabel``, ``pyroSvaeTrueScale``; posterior summaries
``pyroSvaeZ1``...; input poses replaced by posterior ones ``pyroSvaeInput<column>``. A STAR file with 3-D
poses (``rlnAngleRot``/``rlnAngleTilt``) keeps its pose columns: a new in-plane ``rlnAnglePsi`` would be read
with them as another 3-D orientation, so the in-plane posterior goes to ``pyroSvaePsiDeg`` and
``pyroSvaeOriginX/YAngst`` instead. Every file is written to a temporary file in the target folder and moved
into place with :func:`os.replace`, so readers never see half a file.

Preprocessing. :func:`fourier_crop` keeps the centred ``box x box`` block of the image's spectrum; new
pixel ``k`` samples old pixel ``k * H / box``, so RELION's centre (pixel ``N/2``) stays in place and the
pixel size grows by ``H / box``. In grid units the crop maps old positions ``p`` to ``a p + (b, -b)`` with
``a = (H - 1) box / (H (box - 1))`` and ``b = a - 1``: the old grid centre lands ``1/2 - box/(2H)`` new
pixels off the new one, and one grid unit covers a little more of the particle. :func:`preprocess_particles`
maps ``dx`` (the grid position of the content's centre) the same way and keeps ``theta``; within the image
the map moves a point by less than one new pixel, so ``dx`` left unchanged would be close but not exact.
:func:`normalize_particles` follows RELION: each particle's mean and standard deviation are measured on its
background, the pixels outside a circle of radius ``0.75 * box / 2`` (RELION's default background radius)
centred on the grid centre.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import fields, replace
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from ..checkpoint import atomic_write
from ..coords import wrap_angle
from ..ctf import CTFParams
from .datasets import DataError, ImageDataset
from .loaders import _check_file, read_npy
from .stream import ParticleImages, stack_file

__all__ = [
    "relion_to_pose",
    "write_class_star",
    "pose_to_relion",
    "read_stack",
    "read_star",
    "read_indices",
    "load_particles",
    "write_particles",
    "circular_mask",
    "normalize_particles",
    "fourier_crop",
    "preprocess_particles",
    "write_posterior_star",
    "posterior_pose_note",
]

# RELION CTF columns -> CTFParams fields; the last two are optional (default 0).
_CTF_COLUMNS = {
    "rlnDefocusU": "defocus_u",
    "rlnDefocusV": "defocus_v",
    "rlnDefocusAngle": "defocus_angle",
    "rlnVoltage": "voltage",
    "rlnSphericalAberration": "spherical_aberration",
    "rlnAmplitudeContrast": "amplitude_contrast",
    "rlnPhaseShift": "phase_shift",
    "rlnCtfBfactor": "bfactor",
}
_CTF_OPTIONAL = {"rlnPhaseShift", "rlnCtfBfactor"}
_POSE_COLUMNS = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY")
_TRUE_PREFIX = "pyroSvaeTrue_"
_FLOAT_FORMAT = "%#.9g"  # 9 significant digits; '#' keeps a decimal point so floats stay floats
_NORMALIZE_RADIUS = 0.75  # background radius as a fraction of box / 2 (RELION's default)


def _grid_units_per_pixel(box_size: int) -> float:
    return 2.0 / (box_size - 1)


def _relion_centre(box_size: int) -> np.ndarray:
    """RELION's rotation centre (pixel ``N // 2`` on both axes, Xmipp's origin) in pyro_svae grid units
    ``(x, y)``: half a pixel off the grid centre for even boxes, on it for odd ones."""
    offset = (box_size // 2 - (box_size - 1) / 2) * _grid_units_per_pixel(box_size)
    return np.array([offset, -offset])


def _rotate_points(points: np.ndarray, theta: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(theta), np.sin(theta)
    x, y = points[..., 0], points[..., 1]
    return np.stack([cos * x - sin * y, sin * x + cos * y], axis=-1)


def relion_to_pose(
    psi_degrees, origin_x_pixels, origin_y_pixels, box_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION in-plane pose -> pyro_svae's ``theta`` ``(N,)`` radians in ``[-pi, pi)`` and ``dx`` ``(N, 2)``
    grid units."""
    if box_size < 2:
        raise ValueError(f"box_size must be >= 2, got {box_size}")
    psi = np.deg2rad(np.asarray(psi_degrees, dtype=np.float64).reshape(-1))
    origin = np.stack(
        [
            np.asarray(origin_x_pixels, np.float64).reshape(-1),
            np.asarray(origin_y_pixels, np.float64).reshape(-1),
        ],
        axis=-1,
    )
    unit = _grid_units_per_pixel(box_size)
    shift = np.stack([-origin[:, 0], origin[:, 1]], axis=-1) * unit
    centre = _relion_centre(box_size)
    dx = shift + centre - _rotate_points(np.broadcast_to(centre, shift.shape), psi)
    theta = wrap_angle(torch.from_numpy(psi))
    return theta.to(torch.float32), torch.as_tensor(dx, dtype=torch.float32)


def pose_to_relion(theta, dx, box_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`relion_to_pose`: ``(psi_degrees, origin_x_pixels, origin_y_pixels)``, each (N,),
    ``psi`` in ``[-180, 180)``."""
    theta = np.asarray(torch.as_tensor(theta).detach().cpu(), dtype=np.float64).reshape(-1)
    dx = np.asarray(torch.as_tensor(dx).detach().cpu(), dtype=np.float64).reshape(-1, 2)
    centre = _relion_centre(box_size)
    shift = dx - centre + _rotate_points(np.broadcast_to(centre, dx.shape), theta)
    unit = _grid_units_per_pixel(box_size)
    origin_x, origin_y = -shift[:, 0] / unit, shift[:, 1] / unit
    psi = wrap_angle(torch.from_numpy(np.rad2deg(theta)), period=360.0).numpy()
    return psi, origin_x, origin_y


# --------------------------------------------------------------------------------------------- files


def _as_stack(data: np.ndarray, path: Path) -> np.ndarray:
    """Validate an image array from a file and view it as float32 ``(N, H, W)``."""
    if data.dtype.kind == "c" or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise DataError(f"{path}: expected real-valued images, found dtype {data.dtype}")
    if data.ndim == 2:
        data = data[None]
    elif data.ndim == 4 and data.shape[1] == 1:
        data = data[:, 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected an image (H, W) or a stack (N, H, W), found shape {data.shape}")
    if data.shape[0] == 0:
        raise DataError(f"{path}: the stack holds no images")
    if data.shape[1] != data.shape[2]:
        raise DataError(f"{path}: expected square images, found {data.shape[1]}x{data.shape[2]} pixels")
    if data.dtype != np.dtype(np.float32):  # other types and non-native byte order
        data = data.astype(np.float32)
    return data


def _read_mrc(path: Path, mmap: bool) -> np.ndarray:
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with opener(path, mode="r") as mrc:
            data = mrc.data
    except ValueError as error:
        reason = str(error)
    else:
        return data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with opener(path, mode="r", permissive=True) as mrc:
                data = mrc.data
        except (ValueError, OSError) as error:
            raise DataError(f"{path}: not a readable MRC file ({error})") from None
    problems = "; ".join(dict.fromkeys([reason, *(str(w.message) for w in caught)]))
    if data is None:
        raise DataError(f"{path}: MRC data cannot be read, the file is truncated or corrupt ({problems})")
    warnings.warn(
        f"{path}: non-standard MRC header ({problems}); read in mrcfile's permissive mode",
        UserWarning,
        stacklevel=3,
    )
    return data


def read_stack(path: str | os.PathLike, *, mmap: bool = True) -> np.ndarray:
    """Images of an ``.mrcs``/``.mrc`` (mrcfile) or ``.npy`` file as float32 ``(N, H, W)``.

    With ``mmap`` the file is memory-mapped and a float32 file is returned as a read-only view; a single 2-D
    image becomes ``(1, H, W)``. An MRC file whose header is non-standard is reread in mrcfile's permissive
    mode with a :class:`UserWarning`; unreadable, truncated or non-square data raise :class:`DataError`.
    """
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".mrcs", ".mrc"):
        data = _read_mrc(path, mmap)
    elif suffix == ".npy":
        data = read_npy(path, mmap=mmap)
    else:
        raise DataError(f"{path}: unknown stack format {suffix!r} (expected .mrcs, .mrc or .npy)")
    return _as_stack(data, path)


def _mrc_voxel_size(path: Path) -> float | None:
    if path.suffix.lower() not in (".mrcs", ".mrc"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                size = float(mrc.voxel_size.x)
        except (ValueError, OSError):
            return None
    return size if size > 0 else None


def _read_star_blocks(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The raw particle table and the optics table (``None`` for RELION 3.0) of a STAR file."""
    path = _check_file(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as error:  # starfile raises assorted errors on malformed text
        raise DataError(f"{path}: not a readable STAR file ({error})") from None
    tables = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    optics = tables.get("optics")
    if "particles" in tables:
        particles = tables["particles"]
    else:
        others = [name for name in tables if name != "optics"]
        if len(others) != 1:
            raise DataError(
                f"{path}: expected a 'particles' table (RELION 3.1) or one particle table (RELION 3.0), "
                f"found tables {others or 'none'} among blocks {list(blocks)}"
            )
        particles = tables[others[0]]
    if len(particles) == 0:
        raise DataError(f"{path}: the particle table has no rows")
    return particles.reset_index(drop=True), optics


def _merge_optics(
    particles: pd.DataFrame, optics: pd.DataFrame | None, pixel_size: float | None, path
) -> pd.DataFrame:
    merged = particles.copy()
    if optics is not None and len(optics):
        if "rlnOpticsGroup" not in optics.columns:
            raise DataError(f"{path}: the optics table has no rlnOpticsGroup column")
        table = optics.set_index("rlnOpticsGroup")
        if "rlnOpticsGroup" in merged.columns:
            groups = merged["rlnOpticsGroup"]
            unknown = sorted(set(groups.tolist()) - set(table.index.tolist()))
            if unknown:
                raise DataError(
                    f"{path}: particles refer to optics group(s) {unknown[:5]}, "
                    f"the optics table has {table.index.tolist()}"
                )
        elif len(table) == 1:
            groups = pd.Series(table.index[0], index=merged.index)
        else:
            raise DataError(
                f"{path}: the particles have no rlnOpticsGroup column "
                f"but there are {len(table)} optics groups"
            )
        for column in table.columns:
            if column not in merged.columns:
                merged[column] = groups.map(table[column]).to_numpy()
    size = pd.Series(np.nan, index=merged.index, dtype=float)
    if "rlnImagePixelSize" in merged.columns:
        size = pd.to_numeric(merged["rlnImagePixelSize"], errors="coerce").astype(float)
    if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(merged.columns):
        detector = pd.to_numeric(merged["rlnDetectorPixelSize"], errors="coerce").astype(float)
        magnification = pd.to_numeric(merged["rlnMagnification"], errors="coerce").astype(float)
        size = size.fillna(detector * 1e4 / magnification)  # µm -> Å
    if pixel_size is not None:
        if not pixel_size > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        size = size.fillna(float(pixel_size))
    if size.isna().any():
        raise DataError(
            f"{path}: missing pixel size: pass pixel_size=... (no rlnImagePixelSize, nor "
            f"rlnDetectorPixelSize with rlnMagnification, for {int(size.isna().sum())} row(s))"
        )
    if not (size > 0).all():
        raise DataError(f"{path}: pixel sizes must be positive, found {float(size.min())}")
    merged["rlnImagePixelSize"] = size.to_numpy(dtype=float)
    return merged


def read_star(path: str | os.PathLike, *, pixel_size: float | None = None) -> pd.DataFrame:
    """A RELION particle STAR file as one table, one row per particle.

    RELION 3.1+ files (``optics`` and ``particles`` blocks) get each optics group's columns merged into its
    particles' rows on ``rlnOpticsGroup``; RELION 3.0 files have a single block. The particle columns are
    kept as read; ``rlnImagePixelSize`` (Å) is filled for every row from the optics table, else from
    ``rlnDetectorPixelSize`` (µm) ``* 1e4 / rlnMagnification``, else from ``pixel_size``, else
    :class:`DataError`.
    """
    particles, optics = _read_star_blocks(path)
    return _merge_optics(particles, optics, pixel_size, path)


def _numeric(table: pd.DataFrame, column: str, source) -> np.ndarray:
    values = np.array(pd.to_numeric(table[column], errors="coerce"), dtype=np.float64)  # a writable copy
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{source}: column {column} holds a non-numeric or missing value at row {row}")
    return values


def read_indices(path: str | os.PathLike, n: int) -> np.ndarray:
    """A selection file of 0-based particle indices (cryoDRGN's ``--ind``): ``.npy`` (an integer array; a
    pickled array is refused) or ``.txt`` (whitespace- or comma-separated integers). Returns int64 ``(k,)``
    in the file's order; :class:`DataError` unless it is non-empty, integral, unique and within ``[0, n)``.
    """
    path = _check_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        elif suffix == ".txt":
            values = np.array(path.read_text().replace(",", " ").split(), dtype=object)
        else:
            raise DataError(f"{path}: unknown selection file format {suffix!r} (expected .npy or .txt)")
    except (ValueError, OSError) as error:
        raise DataError(f"{path}: not a readable selection file ({error})") from None
    values = np.asarray(values).reshape(-1) if np.ndim(values) <= 1 else values
    if values.ndim != 1:
        raise DataError(f"{path}: expected a list of particle indices, found shape {values.shape}")
    if values.size == 0:
        raise DataError(f"{path}: the selection holds no indices")
    if values.dtype == object:  # text
        try:
            numbers = np.array([float(v) for v in values])
        except ValueError:
            bad = next(v for v in values if not _is_number(v))
            raise DataError(f"{path}: {bad!r} is not a particle index") from None
    elif np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating):
        numbers = values.astype(np.float64)
    elif values.dtype == np.bool_:
        raise DataError(f"{path}: expected integer indices, found a boolean mask (use np.flatnonzero)")
    else:
        raise DataError(f"{path}: expected integer indices, found dtype {values.dtype}")
    whole = np.isfinite(numbers) & (numbers == np.round(numbers))
    if not whole.all():
        raise DataError(f"{path}: index {values[~whole][0]!r} is not an integer")
    indices = numbers.astype(np.int64)
    outside = (indices < 0) | (indices >= n)
    if outside.any():
        raise DataError(
            f"{path}: index {int(indices[outside][0])} is outside the {n} particles (0-based, 0..{n - 1}); "
            f"{int(outside.sum())} index(es) out of range"
        )
    unique, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"{path}: index {int(unique[counts > 1][0])} is selected more than once")
    return indices


def _is_number(text) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _ctf_from_table(table: pd.DataFrame, require_ctf: bool, source) -> CTFParams | None:
    required = [column for column in _CTF_COLUMNS if column not in _CTF_OPTIONAL]
    missing = [column for column in required if column not in table.columns]
    if missing:
        if require_ctf:
            raise DataError(f"{source}: CTF column(s) missing: {', '.join(missing)}")
        if {"rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"} & set(table.columns):  # a partial CTF
            warnings.warn(
                f"{source}: incomplete CTF columns (missing {', '.join(missing)}); images loaded without CTF",
                UserWarning,
                stacklevel=3,
            )
        return None
    values = {
        field: _numeric(table, column, source) for column, field in _CTF_COLUMNS.items() if column in table
    }
    values["pixel_size"] = _numeric(table, "rlnImagePixelSize", source)
    return CTFParams.from_values(n=len(table), **values)


def _poses_from_table(
    table: pd.DataFrame, box: int, source
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    columns = set(table.columns)
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= columns:
        pixel = _numeric(table, "rlnImagePixelSize", source)
        origin_x = _numeric(table, "rlnOriginXAngst", source) / pixel
        origin_y = _numeric(table, "rlnOriginYAngst", source) / pixel
    elif {"rlnOriginX", "rlnOriginY"} <= columns:
        origin_x, origin_y = _numeric(table, "rlnOriginX", source), _numeric(table, "rlnOriginY", source)
    else:
        origin_x = origin_y = None
    has_psi = "rlnAnglePsi" in columns
    if not has_psi and origin_x is None:
        return None, None
    zeros = np.zeros(len(table))
    psi = _numeric(table, "rlnAnglePsi", source) if has_psi else zeros
    theta, dx = relion_to_pose(
        psi, zeros if origin_x is None else origin_x, zeros if origin_y is None else origin_y, box
    )
    return (theta if has_psi else None), (dx if origin_x is not None else None)


def _truth_from_table(table: pd.DataFrame, source) -> dict:
    truth: dict = {"factors": {}}
    for column in table.columns:
        if column.startswith(_TRUE_PREFIX):
            truth["factors"][column[len(_TRUE_PREFIX) :]] = _numeric(table, column, source)
    if "pyroSvaeTrueLabel" in table.columns:
        truth["labels"] = _numeric(table, "pyroSvaeTrueLabel", source).astype(np.int64)
    if "pyroSvaeTrueScale" in table.columns:
        truth["scale"] = _numeric(table, "pyroSvaeTrueScale", source)
    return truth


def _resolve_stack(name: str, star_path: Path, row: int, project_dir: Path | None = None) -> Path:
    relative = Path(name)
    if relative.is_absolute():
        candidates = [relative]
    else:
        candidates = [star_path.parent / relative, Path.cwd() / relative]
        if project_dir is not None:
            candidates.insert(0, project_dir / relative)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{star_path}: row {row}: stack {name!r} not found (looked for {', '.join(map(str, candidates))})"
    )


def _star_image_names(table: pd.DataFrame, star_path: Path) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """``rlnImageName`` parsed: the names, each row's stack file and its 1-based image index (0: a bare
    file name, one image)."""
    if "rlnImageName" not in table.columns:
        raise DataError(f"{star_path}: no rlnImageName column (expected 'index@stack.mrcs' per particle)")
    names = table["rlnImageName"].astype(str)
    parts = names.str.partition("@")
    has_index = (parts[1] == "@").to_numpy()
    files = np.where(has_index, parts[2].to_numpy(dtype=object), parts[0].to_numpy(dtype=object))
    index = pd.to_numeric(pd.Series(np.where(has_index, parts[0], "0")), errors="coerce").to_numpy()
    bad = ~np.isfinite(index.astype(float)) | (index != np.round(index))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{star_path}: row {row}: rlnImageName {names[row]!r} is not 'index@stack'")
    return names, files, index.astype(np.int64)


def _wanted_images(
    wanted: np.ndarray, rows: np.ndarray, count: int, names: pd.Series, star_path: Path, stack_path: Path
) -> np.ndarray:
    """The 1-based image indices ``wanted`` by STAR ``rows`` of a stack of ``count`` images, checked."""
    if (wanted == 0).any():  # a bare file name: a single image
        if count != 1:
            row = int(rows[wanted == 0][0])
            raise DataError(
                f"{star_path}: row {row}: rlnImageName {names[row]!r} has no 'index@' "
                f"but {stack_path} holds {count} images"
            )
        wanted = np.where(wanted == 0, 1, wanted)
    outside = (wanted < 1) | (wanted > count)
    if outside.any():
        row = int(rows[outside][0])
        raise DataError(
            f"{star_path}: row {row} asks for image {int(wanted[outside][0])} of {stack_path}, "
            f"which holds {count} images ({int(outside.sum())} row(s) out of range)"
        )
    return wanted


def _images_from_star(
    table: pd.DataFrame, star_path: Path, mmap: bool, project_dir: Path | None = None
) -> np.ndarray:
    names, files, index = _star_image_names(table, star_path)
    out = None
    rows_by_file = pd.Series(np.arange(len(table))).groupby(files, sort=False)
    for name, rows in rows_by_file:
        rows = rows.to_numpy()
        stack_path = _resolve_stack(name, star_path, int(rows[0]), project_dir)
        stack = read_stack(stack_path, mmap=mmap)
        if out is None:
            out = np.empty((len(table), *stack.shape[1:]), dtype=np.float32)
        elif stack.shape[1:] != out.shape[1:]:
            raise DataError(
                f"{stack_path}: images of {stack.shape[1]}x{stack.shape[2]} pixels, "
                f"other stacks of this STAR file hold {out.shape[1]}x{out.shape[2]}"
            )
        wanted = _wanted_images(index[rows], rows, stack.shape[0], names, star_path, stack_path)
        order = np.argsort(wanted, kind="stable")  # sequential reads from a memory map
        out[rows[order]] = stack[wanted[order] - 1]
    return out


def _streamed_from_star(table: pd.DataFrame, star_path: Path, project_dir: Path | None) -> ParticleImages:
    """The STAR rows' particles as :class:`ParticleImages` (stack headers read, images not)."""
    names, files, index = _star_image_names(table, star_path)
    stacks, stack_of, rows_in_stack = [], np.empty(len(table), np.int64), np.empty(len(table), np.int64)
    for name, rows in pd.Series(np.arange(len(table))).groupby(files, sort=False):
        rows = rows.to_numpy()
        stack_path = _resolve_stack(name, star_path, int(rows[0]), project_dir)
        stack = stack_file(stack_path)
        wanted = _wanted_images(index[rows], rows, stack.count, names, star_path, stack_path)
        stack_of[rows], rows_in_stack[rows] = len(stacks), wanted - 1
        stacks.append(stack)
    return ParticleImages(stacks, stack_of, rows_in_stack)


def load_particles(
    path: str | os.PathLike,
    *,
    ctf: str | os.PathLike | None = None,
    pixel_size: float | None = None,
    require_ctf: bool = False,
    name: str | None = None,
    mmap: bool = True,
    project_dir: str | os.PathLike | None = None,
    stream: bool = False,
) -> ImageDataset:
    """Cryo-EM particles from a RELION STAR file, a cryoSPARC ``.cs`` file (:mod:`.cryosparc`: its blob
    paths looked up in ``project_dir``, by default the ``.cs`` file's grandparent, cryoSPARC's project
    directory above the job folder, then next to it and in the working directory; ``info["cs"]`` keeps
    the array and ``info["star"]`` its RELION-style table), or a stack with an optional CTF STAR file.

    ``path`` is a ``.star`` file (images from ``rlnImageName`` ``k@stack.mrcs``) or an ``.mrcs``/``.mrc``/
    ``.npy`` stack, whose CTF rows (same count and order) come from ``ctf``. Returns images ``(N, 1, H, W)``
    with ``ctf`` (:class:`CTFParams` from the RELION CTF columns; ``require_ctf`` turns missing columns into
    a :class:`DataError`), ``theta``/``dx`` from ``rlnAnglePsi`` and the origins when present, ground truth
    from ``pyroSvaeTrue*`` columns, ``source_index`` the STAR row, and ``info`` with ``pixel_size`` (Å; the
    single value of all rows; a bare stack uses ``pixel_size`` or the MRC header's voxel size, else None),
    ``star`` (the particle table as read), ``star_path``, ``optics`` (``None`` for RELION 3.0) and
    ``box_size``. A relative stack path of ``rlnImageName`` is looked up in ``project_dir`` (RELION's
    project directory) when given, then next to the STAR file, then in the working directory.
    ``stream=True`` leaves the images on disk: ``images`` is then a :class:`~.stream.ParticleImages` that
    reads each batch when indexed (memory independent of the stack's size); the headers are checked now.
    """
    path = Path(path)
    project = None if project_dir is None else Path(project_dir)
    suffix = path.suffix.lower()
    info: dict = {}
    particles = optics = table = None
    star_path: Path | None = None
    if suffix == ".star":
        if ctf is not None:
            raise DataError(f"{path}: ctf= is for stacks; a STAR file carries its own CTF columns")
        star_path = _check_file(path)
        particles, optics = _read_star_blocks(star_path)
        table = _merge_optics(particles, optics, pixel_size, star_path)
        stack = (
            _streamed_from_star(table, star_path, project)
            if stream
            else _images_from_star(table, star_path, mmap, project)
        )
    elif suffix == ".cs":
        from .cryosparc import cs_particle_table, read_cs

        if ctf is not None:
            raise DataError(f"{path}: ctf= is for stacks; a .cs file carries its own CTF fields")
        star_path = _check_file(path)
        array = read_cs(star_path)
        particles = cs_particle_table(array, star_path)
        table = _merge_optics(particles, None, pixel_size, star_path)
        # cryoSPARC stores blob paths relative to its project directory, which holds the job folders
        project = project or star_path.parent.parent
        stack = (
            _streamed_from_star(table, star_path, project)
            if stream
            else _images_from_star(table, star_path, mmap, project)
        )
        info.update(cs=array, cs_path=str(star_path))
    elif suffix in (".mrcs", ".mrc", ".npy"):
        stack = ParticleImages.from_stack(path) if stream else read_stack(path, mmap=mmap)
        info["stack_path"] = str(path)
        fallback = pixel_size if pixel_size is not None else _mrc_voxel_size(path)
        if ctf is not None:
            star_path = _check_file(ctf)
            particles, optics = _read_star_blocks(star_path)
            table = _merge_optics(particles, optics, fallback, star_path)
            if len(table) != stack.shape[0]:
                raise DataError(f"{star_path}: {len(table)} CTF rows for {stack.shape[0]} images in {path}")
    else:
        _check_file(path)
        raise DataError(
            f"{path}: unknown particle file format {suffix!r} (expected .star/.cs/.mrcs/.mrc/.npy)"
        )
    n, box = stack.shape[0], stack.shape[-1]
    ctf_params = theta = dx = None
    truth: dict = {"factors": {}}
    if table is None:
        if require_ctf:
            raise DataError(f"{path}: require_ctf=True but there is no CTF table: pass ctf=FILE.star")
        pixel = fallback
    else:
        source = star_path
        sizes = table["rlnImagePixelSize"].to_numpy(dtype=float)
        if not np.allclose(sizes, sizes[0], rtol=1e-6, atol=0.0):
            raise DataError(
                f"{source}: particles have different pixel sizes ({sorted(set(sizes.tolist()))[:5]} Å); "
                "expected a single pixel size"
            )
        pixel = float(sizes[0])
        ctf_params = _ctf_from_table(table, require_ctf, source)
        theta, dx = _poses_from_table(table, box, source)
        truth = _truth_from_table(table, source)
    info.update(
        pixel_size=None if pixel is None else float(pixel),
        star=particles,
        star_path=None if star_path is None else str(star_path),
        optics=optics,
        box_size=int(box),
    )
    return ImageDataset(
        # torch must not share a read-only memory map: copy those
        stack if stream else (stack if stack.flags.writeable else np.array(stack))[:, None],
        theta=theta,
        dx=dx,
        labels=truth.get("labels"),
        source_index=np.arange(n),
        ctf=ctf_params,
        scale=truth.get("scale"),
        factors=truth["factors"],
        name=name or path.name,
        info=info,
    )


def _write_star(path: Path, particles: pd.DataFrame, optics: pd.DataFrame | None) -> Path:
    blocks = {"particles": particles} if optics is None else {"optics": optics, "particles": particles}
    atomic_write(path, lambda tmp: starfile.write(blocks, tmp, float_format=_FLOAT_FORMAT, overwrite=True))
    return path


def _float32_values(tensor: torch.Tensor) -> np.ndarray:
    """float32 values as the float64 numbers they were meant to be (1.3, not 1.29999995)."""
    return tensor.detach().cpu().numpy().astype(np.float32).astype(str).astype(np.float64)


def _row_pixel_sizes(dataset: ImageDataset, pixel_size: float | None) -> np.ndarray:
    n = len(dataset)
    from_ctf = None if dataset.ctf is None else _float32_values(dataset.ctf.pixel_size)
    if pixel_size is not None:
        if not pixel_size > 0:
            raise ValueError(f"pixel_size must be positive, got {pixel_size}")
        if from_ctf is not None and not np.allclose(from_ctf, pixel_size, rtol=1e-5):
            raise DataError(
                f"pixel_size={pixel_size} disagrees with the data set's CTF pixel size(s) "
                f"{sorted(set(from_ctf.tolist()))[:5]}"
            )
        return np.full(n, float(pixel_size))
    if from_ctf is not None:
        return from_ctf
    if dataset.info.get("pixel_size") is not None:
        return np.full(n, float(dataset.info["pixel_size"]))
    raise DataError(f"{dataset.name}: missing pixel size: pass pixel_size=...")


def write_particles(
    star_path: str | os.PathLike,
    dataset: ImageDataset,
    *,
    pixel_size: float | None = None,
    voltage: float = 300.0,
    spherical_aberration: float = 2.7,
    amplitude_contrast: float = 0.1,
) -> Path:
    """Write ``dataset`` as a RELION 3.1 particle STAR file and one ``.mrcs`` stack of the same stem.

    The optics table holds one group per distinct (pixel size, voltage, Cs, amplitude contrast); these come
    from ``dataset.ctf`` when present, else from the arguments (pixel size: ``pixel_size``, else the CTF's,
    else ``dataset.info["pixel_size"]``). Particle rows get ``rlnImageName``, ``rlnOpticsGroup``, the
    per-particle CTF columns, the poses (``rlnAnglePsi``, ``rlnOriginXAngst``/``YAngst``) when known, and
    ground truth as ``pyroSvaeTrue_<factor>``, ``pyroSvaeTrueLabel``, ``pyroSvaeTrueScale``. Returns the
    STAR path; both files are replaced atomically (the stack first).
    """
    star_path = Path(star_path)
    images = dataset.images
    if images.shape[1] != 1:
        raise DataError(f"{dataset.name}: expected one channel per particle, found {images.shape[1]}")
    box = images.shape[-1]
    if images.shape[-2] != box:
        raise DataError(f"{dataset.name}: expected square images, found {tuple(images.shape[-2:])}")
    n = len(dataset)
    pixel = _row_pixel_sizes(dataset, pixel_size)
    if dataset.ctf is not None:
        ctf = {f.name: _float32_values(getattr(dataset.ctf, f.name)) for f in fields(dataset.ctf)}
        optical = np.stack(
            [pixel, ctf["voltage"], ctf["spherical_aberration"], ctf["amplitude_contrast"]], axis=1
        )
    else:
        ctf = None
        optical = np.stack(
            [pixel, *(np.full(n, float(v)) for v in (voltage, spherical_aberration, amplitude_contrast))],
            axis=1,
        )
    keys, group_index = np.unique(optical, axis=0, return_inverse=True)
    group_index = group_index.reshape(-1)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(keys) + 1),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(keys) + 1)],
            "rlnImagePixelSize": keys[:, 0],
            "rlnImageSize": box,
            "rlnImageDimensionality": 2,
            "rlnVoltage": keys[:, 1],
            "rlnSphericalAberration": keys[:, 2],
            "rlnAmplitudeContrast": keys[:, 3],
        }
    )
    stack_path = star_path.with_suffix(".mrcs")
    columns: dict = {
        "rlnImageName": [f"{i + 1:06d}@{stack_path.name}" for i in range(n)],
        "rlnOpticsGroup": group_index + 1,
    }
    if ctf is not None:
        columns.update(
            rlnDefocusU=ctf["defocus_u"],
            rlnDefocusV=ctf["defocus_v"],
            rlnDefocusAngle=ctf["defocus_angle"],
            rlnPhaseShift=ctf["phase_shift"],
            rlnCtfBfactor=ctf["bfactor"],
        )
    if dataset.theta is not None or dataset.dx is not None:
        theta = dataset.theta if dataset.theta is not None else torch.zeros(n)
        dx = dataset.dx if dataset.dx is not None else torch.zeros(n, 2)
        psi, origin_x, origin_y = pose_to_relion(theta, dx, box)
        if dataset.theta is not None:
            columns["rlnAnglePsi"] = psi
        if dataset.dx is not None:
            columns["rlnOriginXAngst"] = origin_x * pixel
            columns["rlnOriginYAngst"] = origin_y * pixel
    for key, value in dataset.factors.items():
        columns[f"{_TRUE_PREFIX}{key}"] = _float32_values(value)
    if dataset.labels is not None:
        columns["pyroSvaeTrueLabel"] = dataset.labels.cpu().numpy()
    if dataset.scale is not None:
        columns["pyroSvaeTrueScale"] = _float32_values(dataset.scale)
    particles = pd.DataFrame(columns)

    data = images[:, 0].detach().cpu().numpy().astype(np.float32)

    def write_stack(tmp: str) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel[0])

    atomic_write(stack_path, write_stack)
    return _write_star(star_path, particles, optics)


# ------------------------------------------------------------------------------------- preprocessing


def circular_mask(
    box: int,
    radius: float | None = None,
    *,
    soft_edge: float = 0.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A ``(box, box)`` float32 mask centred on the grid centre (pixel ``(box - 1) / 2``).

    1 within ``radius`` pixels, a raised-cosine fall-off to 0 over the next ``soft_edge`` pixels, 0 beyond;
    ``radius`` defaults to ``box / 2 - soft_edge`` so the mask reaches 0 at the box edge.
    """
    if box < 1:
        raise ValueError(f"box must be positive, got {box}")
    if soft_edge < 0:
        raise ValueError(f"soft_edge must be >= 0, got {soft_edge}")
    radius = box / 2 - soft_edge if radius is None else float(radius)
    if radius < 0:
        raise ValueError(f"mask radius must be >= 0, got {radius}")
    offsets = torch.arange(box, device=device, dtype=torch.float32) - (box - 1) / 2
    distance = torch.sqrt(offsets[:, None] ** 2 + offsets[None, :] ** 2)
    if soft_edge == 0:
        return (distance <= radius).to(torch.float32)
    ramp = ((distance - radius) / soft_edge).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * ramp))


def _square_side(images: torch.Tensor, what: str) -> int:
    if images.dim() < 3:
        raise DataError(f"{what}: expected images (N, C, H, W), found shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height != width:
        raise DataError(f"{what}: expected square images, found {height}x{width}")
    return int(height)


def normalize_particles(images: torch.Tensor, *, mask_radius: float | None = None) -> torch.Tensor:
    """Zero mean, unit standard deviation of each image's background ``(N, C, H, W) -> (N, C, H, W)``.

    The background (RELION's convention) is the pixels farther than ``mask_radius`` pixels from the grid
    centre, by default ``0.75 * H / 2``; its population standard deviation is used. A constant background
    (standard deviation at most 1e-6 of the whole image's, e.g. noise-free simulated particles whose
    background holds only rounding residue) raises :class:`DataError`.
    """
    box = _square_side(images, "normalize_particles")
    radius = _NORMALIZE_RADIUS * box / 2 if mask_radius is None else float(mask_radius)
    background = circular_mask(box, radius, device=images.device) == 0
    count = int(background.sum())
    if count < 2:
        raise DataError(
            f"normalize_particles: a background radius of {radius} pixels leaves {count} background "
            f"pixel(s) in a {box}x{box} box; use a smaller mask_radius"
        )
    values = images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)
    pixels = values[..., background]
    mean = pixels.mean(-1)
    std = pixels.std(-1, correction=0)
    overall = values.flatten(-2).std(-1, correction=0)
    flat = ((std == 0) | (std <= 1e-6 * overall)).reshape(std.shape[0], -1).any(1)
    if flat.any():
        raise DataError(
            f"normalize_particles: particle {int(flat.nonzero()[0])} has a constant background "
            "(no noise outside the mask); it cannot be normalized against it (pass normalize=False)"
        )
    return (values - mean[..., None, None]) / std[..., None, None]


def fourier_crop(images: torch.Tensor, box: int) -> torch.Tensor:
    """Downsample ``(..., H, H)`` images to ``(..., box, box)`` by cropping their centred spectrum.

    Pixel values (and so the mean intensity) are kept: a band-limited image is resampled exactly on the
    coarser grid, whose pixels are ``H / box`` times larger. New pixel ``k`` lies on old pixel ``k H / box``,
    so pixel 0 and RELION's centre ``N / 2`` stay in place. For an even ``box`` the Nyquist row and column
    come from the negative frequencies and the real part of the inverse transform is kept. ``box > H``
    raises :class:`DataError` (no upsampling); ``box == H`` returns a copy.
    """
    size = _square_side(images, "fourier_crop")
    box = int(box)
    if box < 2 or box > size:
        raise DataError(f"fourier_crop: target box must be between 2 and {size} pixels, got {box}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    if box == size:
        return images.to(dtype).clone()
    with torch.autocast(images.device.type, enabled=False):
        spectrum = torch.fft.fftshift(torch.fft.fft2(images.to(dtype)), dim=(-2, -1))
        start = size // 2 - box // 2
        cropped = spectrum[..., start : start + box, start : start + box]
        result = torch.fft.ifft2(torch.fft.ifftshift(cropped, dim=(-2, -1))).real
    return result * (box * box / (size * size))


def preprocess_batch(
    images: torch.Tensor, *, box: int, invert: bool, normalize: bool, mask_radius: float | None
) -> torch.Tensor:
    """One batch ``(B, 1, H, H)`` inverted, Fourier-cropped to ``box`` and normalized, as float32; each
    image on its own, so a batch needs nothing of the others."""
    if invert:
        images = -images
    if box != images.shape[-1]:
        images = fourier_crop(images, box)
    if normalize:
        images = normalize_particles(images, mask_radius=mask_radius)
    return images.to(torch.float32)


def preprocess_particles(
    dataset: ImageDataset,
    *,
    box: int | None = None,
    normalize: bool = True,
    invert: bool = False,
    mask_radius: float | None = None,
    batch_size: int = 1024,
) -> ImageDataset:
    """Invert (``-1 *``), Fourier-crop to ``box`` and normalize particles, ``batch_size`` images at a time.

    Returns a new :class:`ImageDataset` with every other field kept, except what the crop changes: the CTF
    and ``info["pixel_size"]`` grow by ``H / box``, ``info["box_size"]`` becomes ``box``, and ``dx`` is
    mapped to where the content's centre lies on the new grid (``theta`` is unchanged; see the module
    notes). ``mask_radius`` (pixels of the output box) sets the normalization background.
    """
    size = _square_side(dataset.images, dataset.name)
    new_box = size if box is None else int(box)
    if new_box < 2 or new_box > size:
        raise DataError(f"{dataset.name}: target box must be between 2 and {size} pixels, got {box}")
    images = dataset.images
    if isinstance(images, ParticleImages):  # applied to each batch as it is read
        images = images.preprocessed(box=new_box, invert=invert, normalize=normalize, mask_radius=mask_radius)
        images[: min(len(images), batch_size)]  # a first batch: options that cannot work fail now
    else:
        images = torch.cat(
            [
                preprocess_batch(
                    chunk, box=new_box, invert=invert, normalize=normalize, mask_radius=mask_radius
                )
                for chunk in images.split(batch_size)
            ]
        )
    factor = size / new_box
    ctf, dx = dataset.ctf, dataset.dx
    if new_box != size:
        if ctf is not None:
            ctf = replace(ctf, pixel_size=ctf.pixel_size * factor)
        if dx is not None:
            a = (size - 1) * new_box / (size * (new_box - 1))
            dx = a * dx + torch.tensor([a - 1.0, 1.0 - a], dtype=dx.dtype, device=dx.device)
    info = dict(dataset.info)
    if info.get("pixel_size") is not None:
        info["pixel_size"] = float(info["pixel_size"]) * factor
    info["box_size"] = new_box
    info["preprocess"] = {
        "original_box": size,
        "box": new_box,
        "invert": invert,
        "normalize": normalize,
        "mask_radius": mask_radius,
    }
    return replace(dataset, images=images, dx=dx, ctf=ctf, info=info)


# ------------------------------------------------------------------------------------------ export

_POSTERIOR_PREFIXES = ("pyroSvaeZ", "pyroSvaePsi", "pyroSvaeOrigin")
_ORIENTATION_COLUMNS = ("rlnAngleRot", "rlnAngleTilt")  # 3-D poses: psi is part of the 3-D orientation
_RELION_IN_PLANE = ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
_OWN_IN_PLANE = ("pyroSvaePsiDeg", "pyroSvaeOriginXAngst", "pyroSvaeOriginYAngst")


def _orientation_columns(dataset: ImageDataset) -> list[str]:
    """The 3-D orientation columns of the data set's input STAR table (``[]`` for 2-D poses or no STAR)."""
    star = dataset.info.get("star")
    columns = star.columns if isinstance(star, pd.DataFrame) else ()
    return [column for column in _ORIENTATION_COLUMNS if column in columns]


def posterior_pose_note(dataset: ImageDataset) -> str | None:
    """One line for users when :func:`write_posterior_star` leaves RELION's pose columns of ``dataset`` as
    they are (its input STAR has 3-D poses) and writes the in-plane posterior to its own columns; else None.
    """
    found = _orientation_columns(dataset)
    if not found:
        return None
    return (
        f"the input STAR has 3D poses ({'/'.join(found)}): the in-plane posterior went to "
        "pyroSvaePsiDeg/pyroSvaeOriginX/YAngst, RELION's pose columns are unchanged"
    )


def _rows(value, n: int, name: str, width: int | None) -> np.ndarray | None:
    """``value`` as float64 ``(n,)`` (``width`` None), ``(n, width)``, or ``(n, k)`` (``width`` 0)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if width == 0 and array.ndim == 1:
        array = array[:, None]
    expected = {None: 1, 0: 2}.get(width, 2)
    ok = array.ndim == expected and array.shape[0] == n and (width in (None, 0) or array.shape[1] == width)
    if not ok:
        shape = {None: "(N,)", 0: "(N, k)"}.get(width, f"(N, {width})")
        raise DataError(f"{name}: expected shape {shape} with N = {n}, found {array.shape}")
    return array


def _rename_input(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Keep an input column that a posterior one replaces as ``pyroSvaeInput<name>`` (first input wins)."""
    if column not in table.columns:
        return table
    target = "pyroSvaeInput" + column[3:]
    if target in table.columns:
        return table.drop(columns=column)
    return table.rename(columns={column: target})


def _input_table(dataset: ImageDataset) -> tuple[pd.DataFrame, np.ndarray]:
    """``(table, order)``: the input STAR rows of the data set's particles sorted by ``source_index`` (every
    input column; a bare stack's rows get ``rlnImageName`` ``k@/absolute/stack``; without a STAR, a table
    of ``pyroSvaeIndex``) and ``order``, the data set's positions in that row order."""
    n = len(dataset)
    source = (
        np.arange(n) if dataset.source_index is None else dataset.source_index.cpu().numpy().astype(np.int64)
    )
    order = np.argsort(source, kind="stable")
    star = dataset.info.get("star")
    if isinstance(star, pd.DataFrame):
        if source.min() < 0 or source.max() >= len(star):
            raise DataError(
                f"{dataset.name}: source_index runs to {int(source.max())}, "
                f"the input STAR has {len(star)} rows"
            )
        table = star.iloc[source[order]].reset_index(drop=True)
    else:
        table = pd.DataFrame({"pyroSvaeIndex": source[order]})
    stack = dataset.info.get("stack_path")
    if stack:  # a bare stack, or a stack whose CTF rows came from a STAR file: row k is image k
        absolute = Path(stack).resolve()
        table = table.drop(columns="rlnImageName", errors="ignore")
        table.insert(0, "rlnImageName", [f"{i + 1:06d}@{absolute}" for i in source[order]])
    return table, order


def write_class_star(path: str | os.PathLike, dataset: ImageDataset, classes, *, select=None) -> Path:
    """Write the input particles with ``rlnClassNumber`` = ``classes`` ``(N,)`` (integers, in the data
    set's order; e.g. k-means cluster + 1) for RELION's Subset selection; returns ``path``.

    Rows are the input STAR rows, every column kept and ``rlnImageName`` exactly as given (as
    :func:`write_posterior_star`: read the file from the input's project directory), sorted by input row;
    an input ``rlnClassNumber`` is kept as ``pyroSvaeInputClassNumber``. ``select`` (a boolean mask or
    positions, in the data set's order) writes only those particles. The optics table is kept; the file is
    replaced atomically."""
    n = len(dataset)
    classes = np.asarray(classes.cpu().numpy() if isinstance(classes, torch.Tensor) else classes)
    if classes.shape != (n,) or not np.issubdtype(classes.dtype, np.integer):
        raise DataError(f"classes: expected integers of shape ({n},), found {classes.dtype} {classes.shape}")
    table, order = _input_table(dataset)
    table = _rename_input(table, "rlnClassNumber")
    table["rlnClassNumber"] = classes[order].astype(np.int64)
    if select is not None:
        keep = np.zeros(n, dtype=bool)
        keep[np.asarray(select)] = True
        table = table[keep[order]].reset_index(drop=True)
    optics = dataset.info.get("optics")
    return _write_star(Path(path), table, optics if isinstance(optics, pd.DataFrame) else None)


def write_posterior_star(
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
    pixel_size: float | None = None,
) -> Path:
    """Write a STAR file of the input particles plus posterior summaries; returns ``path``.

    Rows are the input STAR rows of the data set's particles (``dataset.info["star"]`` via
    ``source_index``, in the input order, every input column kept; otherwise a minimal table with
    ``pyroSvaeIndex``). ``rlnImageName`` is kept exactly as the input STAR gives it: RELION resolves it
    against its project directory (the folder it runs in), so the written file is meant to be read from
    the same project directory as the input STAR, wherever it is written. Particles from a stack (bare, or
    with a CTF STAR file) get ``rlnImageName`` ``k@/absolute/path/of/the/stack``.
    ``theta_mean`` ``(N,)`` radians and ``dx_mean`` ``(N, 2)`` grid units become
    ``rlnAnglePsi`` (degrees in ``[-180, 180)``) and ``rlnOriginXAngst``/``YAngst`` (the inputs' own pose
    columns are kept as ``pyroSvaeInput<name>``). An input STAR with 3-D poses (``rlnAngleRot`` or
    ``rlnAngleTilt``) keeps every pose column as it is; the means then become ``pyroSvaePsiDeg`` and
    ``pyroSvaeOriginXAngst``/``YAngst`` (:func:`posterior_pose_note` says so). ``theta_std`` (radians, a
    circular standard deviation) becomes ``pyroSvaePsiStdDeg``, capped at 180 (spread over the whole
    circle), ``theta_resultant`` (the mean resultant length, in ``[0, 1]``) ``pyroSvaePsiResultant``,
    ``dx_std`` ``(N, 2)`` or ``(N,)`` ``pyroSvaeOriginXStdAngst``/``YStdAngst`` or
    ``pyroSvaeOriginStdAngst``, ``z_mean``/``z_std`` ``(N, k)`` ``pyroSvaeZ1..k``/``pyroSvaeZStd1..k``.
    The optics table of a RELION 3.1 input is kept; the file is replaced atomically. Arrays are in the data
    set's order.
    """
    path = Path(path)
    n, box = len(dataset), dataset.images.shape[-1]
    theta_mean = _rows(theta_mean, n, "theta_mean", None)
    theta_std = _rows(theta_std, n, "theta_std", None)
    theta_resultant = _rows(theta_resultant, n, "theta_resultant", None)
    dx_mean = _rows(dx_mean, n, "dx_mean", 2)
    if dx_std is not None and np.ndim(dx_std) == 1:
        dx_std = _rows(dx_std, n, "dx_std", None)
    else:
        dx_std = _rows(dx_std, n, "dx_std", 2)
    z_mean = _rows(z_mean, n, "z_mean", 0)
    z_std = _rows(z_std, n, "z_std", 0)

    table, order = _input_table(dataset)
    stale = [c for c in table.columns if c.startswith(_POSTERIOR_PREFIXES)]
    table = table.drop(columns=stale)

    def angstrom_per_pixel() -> float:
        if pixel_size is not None:
            return float(pixel_size)
        if dataset.info.get("pixel_size") is not None:
            return float(dataset.info["pixel_size"])
        if dataset.ctf is not None and bool((dataset.ctf.pixel_size == dataset.ctf.pixel_size[0]).all()):
            return float(dataset.ctf.pixel_size[0])
        raise DataError(f"{dataset.name}: missing pixel size for the origins in Å: pass pixel_size=...")

    if theta_mean is not None or dx_mean is not None:
        theta = theta_mean if theta_mean is not None else np.zeros(n)
        dx = dx_mean if dx_mean is not None else np.zeros((n, 2))
        psi, origin_x, origin_y = pose_to_relion(theta[order], dx[order], box)
        keep_input_poses = bool(_orientation_columns(dataset))
        psi_column, x_column, y_column = _OWN_IN_PLANE if keep_input_poses else _RELION_IN_PLANE
        if theta_mean is not None:
            if not keep_input_poses:
                table = _rename_input(table, "rlnAnglePsi")
            table[psi_column] = psi
        if dx_mean is not None:
            pixel = angstrom_per_pixel()
            if not keep_input_poses:
                for column in _POSE_COLUMNS[1:]:
                    table = _rename_input(table, column)
            table[x_column] = origin_x * pixel
            table[y_column] = origin_y * pixel
    if theta_std is not None:
        table["pyroSvaePsiStdDeg"] = np.minimum(np.rad2deg(theta_std[order]), 180.0)
    if theta_resultant is not None:
        table["pyroSvaePsiResultant"] = np.clip(theta_resultant[order], 0.0, 1.0)
    if dx_std is not None:
        scale = angstrom_per_pixel() / _grid_units_per_pixel(box)
        if dx_std.ndim == 1:
            table["pyroSvaeOriginStdAngst"] = dx_std[order] * scale
        else:
            table["pyroSvaeOriginXStdAngst"] = dx_std[order, 0] * scale
            table["pyroSvaeOriginYStdAngst"] = dx_std[order, 1] * scale
    for values, stem in ((z_mean, "pyroSvaeZ"), (z_std, "pyroSvaeZStd")):
        if values is not None:
            for k in range(values.shape[1]):
                table[f"{stem}{k + 1}"] = values[order, k]
    optics = dataset.info.get("optics")
    return _write_star(path, table, optics if isinstance(optics, pd.DataFrame) else None)
