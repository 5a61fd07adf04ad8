"""Simulated cryo-EM particles with ground truth: conformation, in-plane pose and CTF.

Geometry. The viewing direction is fixed: every particle is the projection of a structure along its z axis.
An atom at ``(X, Y, Z)`` Å is drawn at array column ``~ centre + X / pixel_size`` and row
``~ centre + Y / pixel_size`` (rows as +y, as in MRC files and RELION), i.e. at pyro_svae grid point
``p = (X, -Y) / (pixel_size (box - 1) / 2)``, with the structure's origin on the grid centre. A particle's
pose ``(theta, dx)`` (pyro_svae's convention, :mod:`pyro_svae.coords`) moves each atom to
``R(theta) p + dx``: the content turns counter-clockwise by ``theta`` and moves by ``dx`` grid units
(:func:`pyro_svae.data.particles.pose_to_relion` gives RELION's ``rlnAnglePsi`` and origins).

Rendering. Each atom is a 2-D Gaussian of standard deviation ``atom_sigma_angstrom`` at its posed position,
integrated over each pixel (a product of error-function differences, so the flux of an atom is its weight
whatever its sub-pixel position); no image is resampled. The CTF is :func:`pyro_svae.ctf.ctf_2d` (RELION's
convention) applied with :func:`pyro_svae.ctf.apply_ctf`.

Noise. The clean (CTF-filtered, noise-free) stack is scaled to unit signal variance, the variance of all its
pixels about their mean over the whole stack and the full box; white Gaussian noise of variance
``1 / snr`` is added, so ``snr = var(signal) / var(noise)`` over the box.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ctf import CTFParams, apply_ctf, ctf_2d
from .datasets import DataError, ImageDataset

__all__ = [
    "HINGE_MAX_ANGLES",
    "hinge_model",
    "hinge_weights",
    "read_atomic_model",
    "read_density_map",
    "simulate_particles",
]

# Swing of the two hinged domains (degrees, counter-clockwise about z) between opening 0 and 1.
HINGE_MAX_ANGLES = (-90.0, 45.0)
_SPACING = 3.8  # Å between pseudo-atoms (a C-alpha spacing)
_MAP_SUFFIXES = {".mrc", ".map", ".mrcs", ".rec"}


def _lattice(
    lo: Sequence[float], hi: Sequence[float], keep: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    axes = [np.arange(a, b + 1e-9, _SPACING) for a, b in zip(lo, hi, strict=True)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return points[keep(points)]


def _hinge_parts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-state domains: base, long arm (hinge at its first atom), short arm; Å, (n_i, 3) each."""
    # base: a flattened ellipsoid with a knob on its lower left, lying along x below y = 0
    base = _lattice(
        (-22.0, -16.0, -5.7),
        (10.0, 0.0, 5.7),
        lambda p: ((p[:, 0] + 6) / 16) ** 2 + ((p[:, 1] + 8) / 8) ** 2 + (p[:, 2] / 6) ** 2 <= 1.0,
    )
    knob = _lattice(
        (-20.0, -24.0, -1.9),
        (-10.0, -16.0, 1.9),
        lambda p: ((p[:, 0] + 15) / 5.5) ** 2 + ((p[:, 1] + 19) / 5) ** 2 <= 1.0,
    )
    # long arm: a rod along +x from the origin with a globular head, swung about the hinge at (8, 0, 0)
    rod = _lattice((0.0, -1.9, -1.9), (22.0, 1.9, 1.9), lambda p: np.ones(len(p), bool))
    head = _lattice(
        (22.0, -7.6, -5.7),
        (34.0, 7.6, 5.7),
        lambda p: ((p[:, 0] - 28) ** 2 + p[:, 1] ** 2 + p[:, 2] ** 2) <= 49,
    )
    arm = np.concatenate([rod, head])
    # short arm: a small lobe from the origin along +x, hinged on the base's left end
    lobe = _lattice(
        (0.0, -3.8, -3.8), (12.0, 3.8, 3.8), lambda p: ((p[:, 0] - 6) / 7) ** 2 + (p[:, 1] / 4.5) ** 2 <= 1.0
    )
    return np.concatenate([base, knob]), arm, lobe


_BASE, _ARM, _LOBE = _hinge_parts()
# hinge points and closed-state directions (degrees from +x) of the two arms
_ARM_HINGE, _ARM_CLOSED = np.array([8.0, 0.0, 0.0]), 170.0
_LOBE_HINGE, _LOBE_CLOSED = np.array([-22.0, -6.0, 0.0]), 135.0


def _rotate_z(points: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Points ``(n, 3)`` turned about z by ``degrees`` ``(B,)`` -> ``(B, n, 3)``."""
    angle = np.deg2rad(degrees)[:, None]
    cos, sin = np.cos(angle), np.sin(angle)
    x, y = points[None, :, 0], points[None, :, 1]
    z = np.broadcast_to(points[None, :, 2], (len(angle), len(points)))
    return np.stack([cos * x - sin * y, sin * x + cos * y, z], axis=-1)


def _hinge_batch(opening: np.ndarray) -> np.ndarray:
    """The hinge at each opening ``(B,)`` -> ``(B, n_atoms, 3)`` Å (not yet centred)."""
    b = len(opening)
    arm = _rotate_z(_ARM, _ARM_CLOSED + HINGE_MAX_ANGLES[0] * opening) + _ARM_HINGE
    lobe = _rotate_z(_LOBE, _LOBE_CLOSED + HINGE_MAX_ANGLES[1] * opening) + _LOBE_HINGE
    base = np.broadcast_to(_BASE, (b, *_BASE.shape))
    return np.concatenate([base, arm, lobe], axis=1)


_HINGE_ORIGIN = _hinge_batch(np.array([0.5]))[0].mean(axis=0)


def hinge_model(opening: float) -> np.ndarray:
    """The built-in multi-domain pseudo-atomic model at ``opening`` in ``[0, 1]`` -> ``(n_atoms, 3)`` Å.

    A flattened base with a knob (not symmetric under any in-plane rotation or mirror), a long arm with a
    globular head and a short lobe, one pseudo-atom every 3.8 Å. ``opening`` swings the arm by
    ``HINGE_MAX_ANGLES[0] = -90`` degrees, from folded back over the base to pointing away from it, and the
    lobe by ``45`` degrees outwards, about hinge axes parallel to z (the viewing direction, so the motion is
    fully visible in projection). Like a lid opening, it makes the particle monotonically larger (radius of
    gyration in projection 13.6 Å closed, 16.9 Å half open, 21.6 Å open), so the conformation also
    shows in rotation-invariant statistics of the image, not only once the pose is known. The origin is
    the centroid of the model at opening 0.5, the same for every opening, so the base does not move along
    the path. Atom order is fixed; weights are :func:`hinge_weights`.
    """
    if not 0.0 <= float(opening) <= 1.0:
        raise ValueError(f"opening must lie in [0, 1], got {opening}")
    return _hinge_batch(np.array([float(opening)]))[0] - _HINGE_ORIGIN


def hinge_weights() -> np.ndarray:
    """Per-atom weights of :func:`hinge_model` ``(n_atoms,)``: 1 for every pseudo-atom."""
    return np.ones(len(_BASE) + len(_ARM) + len(_LOBE))


def read_atomic_model(
    path: str | Path, *, model: int | None = 0, weights: str = "atomic_number"
) -> tuple[np.ndarray, np.ndarray]:
    """Atoms of a PDB or mmCIF file (read with gemmi; waters and hydrogens dropped).

    Returns coordinates in Å, ``(n, 3)`` for one ``model`` (0-based) or ``(n_models, n, 3)`` for
    ``model=None`` (all models, e.g. a trajectory; they must list the same atoms), and weights ``(n,)``:
    the atomic number, or 1 with ``weights="uniform"``. Coordinates are centred on the centre of mass
    (element masses; with several models, the mean of the models' centres, one shift for all).
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise DataError(f"atomic model {path}: no such file")
    if weights not in ("atomic_number", "uniform"):
        raise DataError(f"weights must be 'atomic_number' or 'uniform', got {weights!r}")
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as error:  # gemmi raises RuntimeError/ValueError with its own message
        raise DataError(f"atomic model {path}: cannot be read ({error})") from error
    structure.remove_waters()
    structure.remove_hydrogens()
    if len(structure) == 0:
        raise DataError(f"atomic model {path}: no models in the file")
    indices = range(len(structure)) if model is None else [model]
    if model is not None and not 0 <= model < len(structure):
        raise DataError(f"atomic model {path}: model {model} requested, the file has {len(structure)}")
    frames, numbers, masses = [], None, None
    for index in indices:
        atoms = [atom for chain in structure[index] for residue in chain for atom in residue]
        if not atoms:
            raise DataError(f"atomic model {path}: model {index} has no atoms")
        frames.append(np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms], dtype=np.float64))
        if numbers is None:
            numbers = np.array([a.element.atomic_number for a in atoms], dtype=np.float64)
            masses = np.array([a.element.weight for a in atoms], dtype=np.float64)
        elif len(atoms) != len(numbers):
            raise DataError(
                f"atomic model {path}: model {index} has {len(atoms)} atoms, model 0 has {len(numbers)}"
            )
    coords = np.stack(frames)
    centre = (coords * masses[None, :, None]).sum(axis=1) / masses.sum()
    coords = coords - centre.mean(axis=0)
    atom_weights = numbers if weights == "atomic_number" else np.ones_like(numbers)
    return (coords if model is None else coords[0]), atom_weights


def read_density_map(path: str | Path) -> tuple[np.ndarray, np.ndarray, float]:
    """A 3-D density map (MRC) projected along z, as weighted points.

    Returns ``(xy (M, 2) Å, weights (M,), voxel_size Å)``: the projection ``sum_z map[z, y, x]`` at each
    pixel whose value exceeds ``1e-4`` of the largest magnitude, placed at ``((x - nx//2) v, (y - ny//2) v)``
    (RELION's centre, voxel ``N//2``; rows as +y). The simulator draws each as a Gaussian, which
    interpolates the projected map smoothly.
    """
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise DataError(f"density map {path}: no such file")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            volume = np.asarray(mrc.data, dtype=np.float64)
            voxel = float(mrc.voxel_size.x)
    except Exception as error:
        raise DataError(f"density map {path}: cannot be read ({error})") from error
    if volume.ndim != 3:
        raise DataError(f"density map {path}: expected a 3-D map, found shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise DataError(f"density map {path}: contains NaN or Inf")
    if voxel <= 0:
        raise DataError(f"density map {path}: the header has no voxel size (found {voxel})")
    projection = volume.sum(axis=0)
    scale = np.abs(projection).max()
    if scale == 0:
        raise DataError(f"density map {path}: the map is empty (all zeros)")
    rows, cols = np.nonzero(np.abs(projection) > 1e-4 * scale)
    ny, nx = projection.shape
    xy = np.stack([(cols - nx // 2) * voxel, (rows - ny // 2) * voxel], axis=-1)
    return xy, projection[rows, cols], voxel


@dataclass
class _Source:
    """Projected structure as a function of the path coordinate: ``sample(t)`` -> xy ``(B, A, 2)`` Å,
    weights ``(B, A)``; ``has_path`` says whether ``t`` changes the structure (a ground-truth factor)."""

    sample: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    description: str
    has_path: bool
    min_sigma: float = 0.0
    discrete_frames: int = 0


def _frames_source(frames: np.ndarray, weights: np.ndarray, description: str) -> _Source:
    """Linear interpolation between consecutive frames ``(F, n, 3)``; t in [0, 1] spans frame 0 to F - 1."""
    last = len(frames) - 1

    def sample(t: np.ndarray):
        if last == 0:
            xy = np.broadcast_to(frames[0, :, :2], (len(t), *frames.shape[1:2], 2))
        else:
            position = t * last
            k = np.clip(np.floor(position).astype(int), 0, last - 1)
            w = (position - k)[:, None, None]
            xy = (1 - w) * frames[k, :, :2] + w * frames[k + 1, :, :2]
        return xy, np.broadcast_to(weights, xy.shape[:2])

    return _Source(sample, description, has_path=last > 0)


def _as_frames(value, source: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[1] == 0:
        raise DataError(
            f"{source}: expected coordinates (n_atoms, 3) or frames (F, n_atoms, 3), found {array.shape}"
        )
    if not np.isfinite(array).all():
        raise DataError(f"{source}: coordinates contain NaN or Inf")
    return array


def _map_source(paths: Sequence[Path]) -> _Source:
    points = [read_density_map(p) for p in paths]
    size = max(len(xy) for xy, _, _ in points)
    xy_all = np.zeros((len(points), size, 2))
    w_all = np.zeros((len(points), size))  # padded points carry no weight
    for i, (xy, w, _) in enumerate(points):
        xy_all[i, : len(xy)], w_all[i, : len(w)] = xy, w
    last = len(points) - 1

    def sample(t: np.ndarray):
        k = np.rint(t * last).astype(int)
        return xy_all[k], w_all[k]

    names = ", ".join(p.name for p in paths)
    voxel = max(v for _, _, v in points)
    return _Source(
        sample, f"density map(s) {names}", has_path=last > 0, min_sigma=0.5 * voxel, discrete_frames=last + 1
    )


def _is_map(path: Path) -> bool:
    return path.suffix.lower() in _MAP_SUFFIXES


def _resolve_source(conformation) -> _Source:
    if conformation is None or (isinstance(conformation, str) and conformation == "hinge"):
        weights = hinge_weights()

        def sample(t: np.ndarray):
            xy = (_hinge_batch(t) - _HINGE_ORIGIN)[..., :2]
            return xy, np.broadcast_to(weights, xy.shape[:2])

        return _Source(sample, "hinge", has_path=True)
    if isinstance(conformation, (str, Path)):
        path = Path(conformation)
        if _is_map(path):
            return _map_source([path])
        frames, weights = read_atomic_model(path, model=None)
        return _frames_source(frames, weights, f"atomic model {path.name} ({len(frames)} model(s))")
    if callable(conformation):

        def sample(t: np.ndarray):
            coords = [_as_frames(conformation(float(value)), "conformation(t)")[0] for value in t]
            if len({c.shape for c in coords}) > 1:
                raise DataError("conformation(t) returned different numbers of atoms for different t")
            xy = np.stack(coords)[..., :2]
            return xy, np.ones(xy.shape[:2])

        return _Source(sample, "callable", has_path=True)
    if isinstance(conformation, (list, tuple)) and conformation and isinstance(conformation[0], (str, Path)):
        paths = [Path(p) for p in conformation]
        if all(_is_map(p) for p in paths):
            return _map_source(paths)
        if any(_is_map(p) for p in paths):
            raise DataError("conformation: a list of files must be all density maps or all atomic models")
        read = [read_atomic_model(p) for p in paths]
        if len({len(w) for _, w in read}) > 1:
            raise DataError("conformation: the atomic models list different numbers of atoms")
        frames = np.stack([c for c, _ in read])
        return _frames_source(frames, read[0][1], f"atomic models {', '.join(p.name for p in paths)}")
    if isinstance(conformation, (np.ndarray, torch.Tensor, list, tuple)):
        values = conformation
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        elif isinstance(values, (list, tuple)) and values and isinstance(values[0], torch.Tensor):
            values = [v.detach().cpu().numpy() for v in values]
        try:
            frames = _as_frames(values, "conformation")
        except ValueError as error:
            raise DataError(str(error)) from error
        return _frames_source(frames, np.ones(frames.shape[1]), f"{len(frames)} coordinate frame(s)")
    raise DataError(
        "conformation: expected None/'hinge', a PDB/mmCIF or MRC path, a list of paths, coordinate frames "
        f"(F, n, 3) or a callable t -> (n, 3); found {type(conformation).__name__}"
    )


def _pixel_profiles(centres: torch.Tensor, axis: torch.Tensor, half: float, sigma: float) -> torch.Tensor:
    """Fraction of a 1-D Gaussian at ``centres`` ``(B, A)`` falling in each pixel ``axis`` ``(N,)``
    (pixel half-width ``half``) -> ``(B, A, N)``."""
    scale = 1.0 / (sigma * math.sqrt(2.0))
    offset = axis[None, None, :] - centres[..., None]
    return 0.5 * (torch.erf((offset + half) * scale) - torch.erf((offset - half) * scale))


def _render(
    xy: torch.Tensor, weights: torch.Tensor, theta: torch.Tensor, dx: torch.Tensor, box: int, sigma: float
) -> torch.Tensor:
    """Posed Gaussian atoms -> images ``(B, box, box)``; ``xy`` ``(B, A, 2)`` and ``sigma`` in grid units."""
    cos, sin = torch.cos(theta)[:, None], torch.sin(theta)[:, None]
    x = cos * xy[..., 0] - sin * xy[..., 1] + dx[:, None, 0]
    y = sin * xy[..., 0] + cos * xy[..., 1] + dx[:, None, 1]
    axis = torch.linspace(-1.0, 1.0, box, dtype=xy.dtype, device=xy.device)
    half = 1.0 / (box - 1)
    columns = _pixel_profiles(x, axis, half, sigma)  # (B, A, W)
    rows = _pixel_profiles(y, axis.flip(0), half, sigma)  # (B, A, H), row 0 is y = +1
    return torch.bmm(rows.transpose(1, 2), weights[..., None] * columns)


def _check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise DataError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


def simulate_particles(
    n: int,
    *,
    box: int = 32,
    pixel_size: float = 2.2,
    conformation=None,
    rotation: str | float = "uniform",
    shift_std_pixels: float = 1.5,
    snr: float | None = 1.0,
    ctf: bool = True,
    defocus_range: tuple[float, float] = (10000.0, 25000.0),
    astigmatism: float = 500.0,
    voltage: float = 300.0,
    spherical_aberration: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor: float = 0.0,
    atom_sigma_angstrom: float | None = None,
    keep_clean: bool | None = None,
    chunk_size: int = 256,
    seed: int = 0,
    name: str = "simulated_particles",
) -> ImageDataset:
    """Simulate ``n`` particle images ``(n, 1, box, box)`` with ground-truth conformation, pose and CTF.

    For each particle: a path coordinate ``t ~ U[0, 1]`` (``factors["conformation"]``) picks the structure
    (see ``conformation``); its atoms are projected along z, posed in-plane by ``theta`` (``rotation``:
    ``"uniform"`` over ``[-pi, pi)``, ``"none"``, or a float standard deviation in radians, wrapped) and
    ``dx`` (isotropic normal, ``shift_std_pixels`` pixels, stored in grid units) and rendered exactly as
    pixel-integrated Gaussians (module docstring). With ``ctf``, defocus U is uniform in
    ``defocus_range`` (Å), V = U minus a uniform ``[0, astigmatism]``, and the astigmatism angle uniform in
    ``[0, 180)`` degrees. The clean stack is scaled to unit variance and noise of variance ``1 / snr`` is
    added (``snr=None``: no noise).

    ``conformation``: ``None``/``"hinge"`` (the built-in :func:`hinge_model`, ``t`` is the opening); an
    array ``(n_atoms, 3)`` Å (one structure) or frames ``(F, n_atoms, 3)`` (a path, linearly interpolated,
    ``t`` spans frame 0 to ``F - 1``); a callable ``t -> (n_atoms, 3)``; a PDB/mmCIF path (all its models
    as frames) or a list of them (one frame each, weights = atomic numbers); an MRC map path, or a list
    of maps (a discrete path: the nearest map to ``t``, whose ``k / (F - 1)`` is reported). A single
    structure has no ``"conformation"`` factor.

    ``atom_sigma_angstrom`` defaults to ``max(1.5, pixel_size)`` (half a voxel more for maps).
    ``info`` holds ``pixel_size``, ``snr``, ``box_size``, ``source``, ``noise_std``,
    ``atom_sigma_angstrom``, ``signal_scale`` (the factor applied to the raw rendering) and, when
    ``keep_clean`` (default: when the stack has at most 2**22 pixels), ``clean`` ``(n, 1, box, box)``.
    Deterministic in ``seed``; computed in float32 on the CPU in chunks of ``chunk_size`` particles.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be a positive integer, got {n!r}")
    if isinstance(box, bool) or not isinstance(box, (int, np.integer)) or box < 4:
        raise DataError(f"box must be an integer >= 4, got {box!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise DataError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    pixel_size = _check_positive("pixel_size", pixel_size)
    shift_std_pixels = _check_positive("shift_std_pixels", shift_std_pixels, allow_zero=True)
    if snr is not None:
        snr = _check_positive("snr", snr)
    astigmatism = _check_positive("astigmatism", astigmatism, allow_zero=True)
    if len(defocus_range) != 2 or not 0 < float(defocus_range[0]) <= float(defocus_range[1]):
        raise DataError(f"defocus_range must be (low, high) with 0 < low <= high Å, got {defocus_range!r}")
    if astigmatism >= float(defocus_range[0]):
        raise DataError(f"astigmatism ({astigmatism} Å) must be smaller than the lowest defocus")
    voltage = _check_positive("voltage", voltage)
    spherical_aberration = _check_positive("spherical_aberration", spherical_aberration, allow_zero=True)
    if not 0.0 <= float(amplitude_contrast) < 1.0:
        raise DataError(f"amplitude_contrast must lie in [0, 1), got {amplitude_contrast!r}")
    bfactor = _check_positive("bfactor", bfactor, allow_zero=True)
    if isinstance(rotation, str):
        if rotation not in ("uniform", "none"):
            raise DataError(f"rotation must be 'uniform', 'none' or a standard deviation, got {rotation!r}")
    else:
        rotation = _check_positive("rotation", rotation, allow_zero=True)

    source = _resolve_source(conformation)
    sigma_angstrom = (
        max(1.5, pixel_size) + source.min_sigma
        if atom_sigma_angstrom is None
        else _check_positive("atom_sigma_angstrom", atom_sigma_angstrom)
    )

    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 1.0, n)
    if source.discrete_frames > 1:
        last = source.discrete_frames - 1
        t = np.rint(t * last) / last
    if rotation == "uniform":
        theta = rng.uniform(-math.pi, math.pi, n)
    elif rotation == "none":
        theta = np.zeros(n)
    else:
        theta = np.remainder(rng.normal(0.0, rotation, n) + math.pi, 2 * math.pi) - math.pi
    unit = 2.0 / (box - 1)  # grid units per pixel
    dx = rng.normal(0.0, shift_std_pixels, (n, 2)) * unit

    params = None
    if ctf:
        defocus_u = rng.uniform(float(defocus_range[0]), float(defocus_range[1]), n)
        defocus_v = defocus_u - rng.uniform(0.0, astigmatism, n)
        params = CTFParams.from_values(
            n,
            defocus_u=defocus_u,
            defocus_v=defocus_v,
            defocus_angle=rng.uniform(0.0, 180.0, n),
            voltage=voltage,
            spherical_aberration=spherical_aberration,
            amplitude_contrast=amplitude_contrast,
            bfactor=bfactor,
            pixel_size=pixel_size,
        )

    angstrom_to_grid = unit / pixel_size
    theta_t = torch.as_tensor(theta, dtype=torch.float32)
    dx_t = torch.as_tensor(dx, dtype=torch.float32)
    clean = torch.empty(n, 1, box, box)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        xy, weights = source.sample(t[start:stop])
        xy = torch.as_tensor(np.asarray(xy) * angstrom_to_grid, dtype=torch.float32)
        xy = torch.stack([xy[..., 0], -xy[..., 1]], dim=-1)  # rows as +y: the model's y points down the rows
        weights = torch.tensor(np.asarray(weights), dtype=torch.float32)
        images = _render(
            xy, weights, theta_t[start:stop], dx_t[start:stop], box, sigma_angstrom * angstrom_to_grid
        )
        if params is not None:
            images = apply_ctf(images, ctf_2d(params[start:stop], box))
        clean[start:stop, 0] = images

    spread = float(clean.double().std())
    if spread == 0.0:
        raise DataError("the simulated images are constant: is the structure inside the box?")
    signal_scale = 1.0 / spread
    clean *= signal_scale
    images = clean.clone()
    noise_std = 0.0
    if snr is not None:
        noise_std = 1.0 / math.sqrt(snr)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
        images = clean + noise_std * torch.randn(clean.shape, generator=generator)

    info = {
        "pixel_size": pixel_size,
        "snr": snr,
        "box_size": box,
        "source": source.description,
        "noise_std": noise_std,
        "atom_sigma_angstrom": sigma_angstrom,
        "signal_scale": signal_scale,
        "seed": seed,
    }
    if keep_clean or (keep_clean is None and clean.numel() <= 2**22):
        info["clean"] = clean
    factors = {"conformation": torch.as_tensor(t, dtype=torch.float32)} if source.has_path else {}
    return ImageDataset(
        images=images,
        theta=theta_t,
        dx=dx_t,
        ctf=params,
        factors=factors,
        name=name,
        info=info,
    )
