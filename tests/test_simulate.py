"""The particle simulator: pose convention, conformations, CTF, noise level, file sources, validation."""

from __future__ import annotations

import math
import time

import mrcfile
import numpy as np
import pytest
import torch

from pyro_svae.coords import transform_images
from pyro_svae.ctf import apply_ctf, ctf_2d
from pyro_svae.data import DataError, ImageDataset
from pyro_svae.data.simulate import (
    HINGE_MAX_ANGLES,
    hinge_model,
    hinge_weights,
    read_atomic_model,
    read_density_map,
    simulate_particles,
)

CLEAN = dict(snr=None, ctf=False)


def _raw(dataset: ImageDataset) -> torch.Tensor:
    """The rendering before the stack's unit-variance scaling (comparable across data sets)."""
    return dataset.info["clean"] / dataset.info["signal_scale"]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def test_returns_dataset_with_ground_truth():
    data = simulate_particles(12, box=24, seed=1)
    assert isinstance(data, ImageDataset) and data.images.shape == (12, 1, 24, 24)
    assert data.images.dtype == torch.float32
    assert data.theta.shape == (12,) and data.dx.shape == (12, 2)
    assert len(data.ctf) == 12 and set(data.factors) == {"conformation"}
    t = data.factors["conformation"]
    assert bool(((t >= 0) & (t <= 1)).all())
    assert data.info["box_size"] == 24 and data.info["pixel_size"] == 2.2 and data.info["snr"] == 1.0
    assert data.info["source"] == "hinge" and data.info["clean"].shape == (12, 1, 24, 24)
    assert bool(((data.theta >= -math.pi) & (data.theta < math.pi)).all())


def test_posed_particle_equals_transformed_unposed_particle():
    """A particle at (theta, dx) is transform_images of the same structure at pose zero."""
    frame = [hinge_model(0.3)]
    box = 48
    posed = simulate_particles(10, box=box, conformation=frame, shift_std_pixels=2.0, seed=3, **CLEAN)
    upright = simulate_particles(
        1, box=box, conformation=frame, rotation="none", shift_std_pixels=0.0, **CLEAN
    )
    assert float(upright.theta.abs().max()) == 0.0 and float(upright.dx.abs().max()) == 0.0
    reference = _raw(upright).expand(10, -1, -1, -1)
    error = _relative_error(transform_images(reference, posed.theta, posed.dx), _raw(posed))
    assert float(error.max()) < 0.06, error  # bilinear resampling of 1-pixel Gaussians
    wrong = _relative_error(transform_images(reference, -posed.theta, posed.dx), _raw(posed))
    assert float(wrong.median()) > 0.3


def test_rows_are_plus_y_as_in_relion():
    """An atom at (+X, +Y) Å lies right of and below the centre of the array (rows as +y, as MRC/RELION)."""
    atom = np.array([[6.6, 4.4, 0.0]])
    data = simulate_particles(1, box=33, conformation=atom, rotation="none", shift_std_pixels=0.0, **CLEAN)
    image = data.images[0, 0]
    row, col = np.unravel_index(int(image.argmax()), image.shape)
    assert (row, col) == (16 + 2, 16 + 3)
    # the flux of an atom is its weight (pixel-integrated Gaussian), whatever the pixel size
    assert float(_raw(data).sum()) == pytest.approx(1.0, abs=1e-4)


def test_conformation_changes_the_image():
    frames = [hinge_model(0.0), hinge_model(1.0)]
    images = [
        _raw(simulate_particles(1, conformation=[f], rotation="none", shift_std_pixels=0.0, **CLEAN))[0]
        for f in frames
    ]
    assert float(_relative_error(images[0][None], images[1][None])) > 0.3
    data = simulate_particles(200, rotation="none", shift_std_pixels=0.0, seed=2, **CLEAN)
    t = data.factors["conformation"].numpy()
    flat = _raw(data).flatten(1).numpy()
    near, far = np.argsort(np.abs(t - t[0]))[1], np.argmax(np.abs(t - t[0]))
    assert np.linalg.norm(flat[near] - flat[0]) < np.linalg.norm(flat[far] - flat[0])


def test_hinge_model_geometry():
    closed, opened = hinge_model(0.0), hinge_model(1.0)
    assert closed.shape == opened.shape == (len(hinge_weights()), 3)
    moved = np.linalg.norm(closed - opened, axis=1) > 1e-6
    assert 0.2 < moved.mean() < 0.8  # the base stays, the arms move
    assert HINGE_MAX_ANGLES == (-90.0, 45.0)
    # opening opens: the projected radius of gyration grows monotonically along the path
    radii = [np.sqrt((hinge_model(t)[:, :2] ** 2).sum(1).mean()) for t in np.linspace(0, 1, 11)]
    assert np.all(np.diff(radii) > 0) and radii[-1] > 1.4 * radii[0]
    # not symmetric under in-plane turns or a mirror: the projection changes
    image = _raw(simulate_particles(1, conformation=[closed], rotation="none", shift_std_pixels=0.0, **CLEAN))
    for turned in (torch.rot90(image, 1, (-2, -1)), torch.rot90(image, 2, (-2, -1)), image.flip(-1)):
        assert float(_relative_error(turned, image)) > 0.3
    with pytest.raises(ValueError, match="opening"):
        hinge_model(1.5)


def test_snr_is_as_requested():
    data = simulate_particles(300, snr=0.5, seed=4)
    clean = data.info["clean"]
    noise = data.images - clean
    assert float(clean.var()) == pytest.approx(1.0, rel=1e-3)
    assert float(noise.var()) == pytest.approx(2.0, rel=0.02)
    assert data.info["noise_std"] == pytest.approx(math.sqrt(2.0))
    quiet = simulate_particles(5, snr=None, seed=4)
    torch.testing.assert_close(quiet.images, quiet.info["clean"])


def test_ctf_on_and_off():
    plain = simulate_particles(16, ctf=False, snr=None, seed=5)
    filtered = simulate_particles(16, ctf=True, snr=None, seed=5, astigmatism=400.0)
    assert plain.ctf is None
    # the same particles: pose and conformation draws do not depend on the CTF
    torch.testing.assert_close(plain.theta, filtered.theta)
    torch.testing.assert_close(plain.factors["conformation"], filtered.factors["conformation"])
    params = filtered.ctf
    assert bool(((params.defocus_u >= 10000) & (params.defocus_u <= 25000)).all())
    astig = params.defocus_u - params.defocus_v
    assert bool(((astig >= 0) & (astig <= 400)).all())
    assert float(params.voltage[0]) == 300.0 and float(params.pixel_size[0]) == pytest.approx(2.2)
    expected = apply_ctf(_raw(plain), ctf_2d(params, 32))
    torch.testing.assert_close(_raw(filtered), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


def test_reproducible_in_seed():
    a = simulate_particles(20, seed=7)
    b = simulate_particles(20, seed=7, chunk_size=6)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.theta, b.theta)
    c = simulate_particles(20, seed=8)
    assert not torch.allclose(a.images, c.images)


def test_rotation_and_shift_options():
    none = simulate_particles(50, rotation="none", shift_std_pixels=0.0, **CLEAN)
    assert float(none.theta.abs().max()) == 0.0 and float(none.dx.abs().max()) == 0.0
    narrow = simulate_particles(2000, rotation=0.2, shift_std_pixels=1.0, box=33, **CLEAN)
    assert float(narrow.theta.std()) == pytest.approx(0.2, rel=0.08)
    assert float(narrow.dx.std()) == pytest.approx(2.0 / 32, rel=0.08)  # one pixel in grid units


_PDB_ATOMS = [
    ("N", "N", -1.0, 0.0, 0.0),
    ("CA", "C", 0.5, 0.0, 0.0),
    ("C", "C", 1.5, 1.0, 0.0),
    ("O", "O", 1.5, 2.2, 0.5),
    ("SG", "S", 3.0, -1.0, 0.0),
]


def _pdb_text(shift: float = 0.0, models: int = 1) -> str:
    lines = []
    for model in range(models):
        if models > 1:
            lines.append(f"MODEL     {model + 1:4d}")
        for serial, (name, element, x, y, z) in enumerate(_PDB_ATOMS, start=1):
            lines.append(
                f"ATOM  {serial:5d} {name:<4s} CYS A   1    "
                f"{x + shift * model:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {element:>2s}"
            )
        if models > 1:
            lines.append("ENDMDL")
    lines.append("END")
    return "\n".join(lines) + "\n"


def test_read_atomic_model(tmp_path):
    path = tmp_path / "tiny.pdb"
    path.write_text(_pdb_text())
    coords, weights = read_atomic_model(path)
    assert coords.shape == (5, 3)
    np.testing.assert_array_equal(weights, [7, 6, 6, 8, 16])
    masses = np.array([14.007, 12.011, 12.011, 15.999, 32.06])
    np.testing.assert_allclose((coords * masses[:, None]).sum(0) / masses.sum(), 0.0, atol=1e-3)
    raw = np.array([a[2:] for a in _PDB_ATOMS])
    np.testing.assert_allclose(coords - coords[0], raw - raw[0], atol=1e-3)
    _, uniform = read_atomic_model(path, weights="uniform")
    np.testing.assert_array_equal(uniform, 1.0)
    with pytest.raises(DataError, match="no such file"):
        read_atomic_model(tmp_path / "missing.pdb")


def test_atomic_model_sources(tmp_path):
    single = tmp_path / "one.pdb"
    single.write_text(_pdb_text())
    data = simulate_particles(4, conformation=single, pixel_size=1.0, box=20, **CLEAN)
    assert data.factors == {} and "one.pdb" in data.info["source"]
    trajectory = tmp_path / "path.pdb"
    trajectory.write_text(_pdb_text(shift=3.0, models=2))
    frames, _ = read_atomic_model(trajectory, model=None)
    assert frames.shape == (2, 5, 3)
    np.testing.assert_allclose(frames[1] - frames[0], [[3.0, 0.0, 0.0]] * 5, atol=1e-3)
    moving = simulate_particles(6, conformation=trajectory, pixel_size=1.0, box=20, **CLEAN)
    assert set(moving.factors) == {"conformation"}
    listed = simulate_particles(6, conformation=[single, trajectory], pixel_size=1.0, box=20, **CLEAN)
    assert set(listed.factors) == {"conformation"}


def test_callable_and_frames_sources():
    def path(t: float) -> np.ndarray:
        return hinge_model(t)

    by_callable = simulate_particles(5, conformation=path, seed=9, **CLEAN)
    by_hinge = simulate_particles(5, seed=9, **CLEAN)
    torch.testing.assert_close(by_callable.images, by_hinge.images, atol=1e-5, rtol=0)
    frames = np.stack([hinge_model(0.0), hinge_model(1.0)])
    linear = simulate_particles(5, conformation=frames, seed=9, **CLEAN)
    assert set(linear.factors) == {"conformation"}
    assert linear.info["source"] == "2 coordinate frame(s)"


def _write_map(path, volume: np.ndarray, voxel: float) -> None:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(volume.astype(np.float32))
        mrc.voxel_size = voxel


def test_density_map_sources(tmp_path):
    n = 16
    volume = np.zeros((n, n, n))
    volume[n // 2, n // 2 + 3, n // 2 + 2] = 1.0  # x = +2, y = +3 voxels from RELION's centre
    _write_map(tmp_path / "a.mrc", volume, 2.0)
    xy, weights, voxel = read_density_map(tmp_path / "a.mrc")
    np.testing.assert_allclose(xy, [[4.0, 6.0]])
    assert voxel == 2.0 and weights.tolist() == [1.0]
    data = simulate_particles(1, box=33, pixel_size=2.0, conformation=tmp_path / "a.mrc", rotation="none",
                              shift_std_pixels=0.0, **CLEAN)  # fmt: skip
    image = data.images[0, 0]
    assert np.unravel_index(int(image.argmax()), image.shape) == (16 + 3, 16 + 2)
    assert data.factors == {} and data.info["atom_sigma_angstrom"] == pytest.approx(3.0)
    _write_map(tmp_path / "b.mrc", np.roll(volume, 2, axis=2), 2.0)
    both = simulate_particles(30, conformation=[tmp_path / "a.mrc", tmp_path / "b.mrc"], **CLEAN)
    assert set(np.unique(both.factors["conformation"].numpy())) <= {0.0, 1.0}
    _write_map(tmp_path / "zero.mrc", np.zeros((4, 4, 4)), 1.0)
    with pytest.raises(DataError, match="empty"):
        read_density_map(tmp_path / "zero.mrc")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be"),
        (dict(n=2.5), "n must be"),
        (dict(box=2), "box"),
        (dict(pixel_size=0.0), "pixel_size"),
        (dict(snr=-1.0), "snr"),
        (dict(rotation="spin"), "rotation"),
        (dict(rotation=-0.1), "rotation"),
        (dict(shift_std_pixels=-1.0), "shift_std_pixels"),
        (dict(defocus_range=(0.0, 100.0)), "defocus_range"),
        (dict(defocus_range=(2000.0, 1000.0)), "defocus_range"),
        (dict(astigmatism=20000.0), "astigmatism"),
        (dict(amplitude_contrast=1.5), "amplitude_contrast"),
        (dict(atom_sigma_angstrom=0.0), "atom_sigma"),
        (dict(conformation=42), "conformation"),
        (dict(conformation=np.zeros((3, 2))), "conformation"),
        (dict(conformation="missing.pdb"), "no such file"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"n": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        simulate_particles(**kwargs)


@pytest.mark.slow
def test_speed_6000_particles_at_32():
    start = time.perf_counter()
    data = simulate_particles(6000, box=32)
    assert time.perf_counter() - start < 20.0
    assert len(data) == 6000
