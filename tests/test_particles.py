"""Particle files (MRC stacks, RELION STAR), preprocessing and posterior STAR export."""

from __future__ import annotations

import math
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from pyro_svae.ctf import CTFParams
from pyro_svae.data import (
    DataError,
    ImageDataset,
    circular_mask,
    fourier_crop,
    load_particles,
    normalize_particles,
    pose_to_relion,
    posterior_pose_note,
    preprocess_particles,
    read_indices,
    read_stack,
    read_star,
    relion_to_pose,
    write_particles,
    write_posterior_star,
)

BOX = 12


def _write_mrcs(path, data, voxel_size=1.0):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


def _ctf_columns(n, rng):
    return {
        "rlnDefocusU": rng.uniform(10000, 20000, n),
        "rlnDefocusV": rng.uniform(10000, 20000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n),
    }


def _relion31(tmp_path, n=6, pixel=1.5):
    """A RELION 3.1 STAR with two optics groups (same pixel size) and one stack in a sub-folder."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, BOX, BOX)).astype(np.float32)
    (tmp_path / "Extract").mkdir()
    _write_mrcs(tmp_path / "Extract" / "stack.mrcs", images, pixel)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1, 2],
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnImagePixelSize": [pixel, pixel],
            "rlnImageSize": [BOX, BOX],
            "rlnImageDimensionality": [2, 2],
            "rlnVoltage": [300.0, 200.0],
            "rlnSphericalAberration": [2.7, 2.0],
            "rlnAmplitudeContrast": [0.1, 0.07],
        }
    )
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)],
            "rlnOpticsGroup": [1 + i % 2 for i in range(n)],
            **_ctf_columns(n, rng),
            "rlnAnglePsi": rng.uniform(0, 360, n),
            "rlnOriginXAngst": rng.uniform(-3, 3, n),
            "rlnOriginYAngst": rng.uniform(-3, 3, n),
            "rlnClassNumber": np.arange(n) % 3 + 1,
        }
    )
    star = tmp_path / "particles.star"
    starfile.write({"optics": optics, "particles": particles}, star)
    return star, images, particles, optics


def _relion30(tmp_path, n=4, pixel_columns=True):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(n, BOX, BOX)).astype(np.float32)
    _write_mrcs(tmp_path / "stack.mrcs", images)
    columns = {
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)],
        **_ctf_columns(n, rng),
        "rlnVoltage": np.full(n, 300.0),
        "rlnSphericalAberration": np.full(n, 2.7),
        "rlnAmplitudeContrast": np.full(n, 0.1),
        "rlnOriginX": rng.uniform(-2, 2, n),
        "rlnOriginY": rng.uniform(-2, 2, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
    }
    if pixel_columns:
        columns["rlnDetectorPixelSize"] = np.full(n, 5.0)  # µm
        columns["rlnMagnification"] = np.full(n, 25000.0)  # -> 2.0 Å
    star = tmp_path / "old.star"
    starfile.write(pd.DataFrame(columns), star)
    return star, images, pd.DataFrame(columns)


def _ctf_dataset(n=5, box=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ctf = CTFParams.from_values(
        n,
        defocus_u=torch.linspace(12000, 20000, n),
        defocus_v=torch.linspace(11000, 19000, n),
        defocus_angle=33.0,
        voltage=300.0,
        spherical_aberration=2.7,
        amplitude_contrast=0.07,
        phase_shift=torch.linspace(0, 20, n),
        bfactor=50.0,
        pixel_size=1.3,
    )
    return ImageDataset(
        torch.randn(n, 1, box, box, generator=gen),
        theta=(torch.rand(n, generator=gen) * 2 - 1) * math.pi,
        dx=torch.randn(n, 2, generator=gen) * 0.1,
        ctf=ctf,
        labels=torch.arange(n) % 2,
        factors={"conformation": torch.rand(n, generator=gen)},
        name="sim",
    )


# ------------------------------------------------------------------------------------------ reading


def test_relion31_star_reads_images_ctf_pixel_size_and_poses(tmp_path):
    star, images, particles, optics = _relion31(tmp_path)
    data = load_particles(star)
    assert data.images.shape == (6, 1, BOX, BOX) and data.images.dtype == torch.float32
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    assert data.info["pixel_size"] == pytest.approx(1.5)
    assert data.info["box_size"] == BOX and data.info["star_path"] == str(star)
    pd.testing.assert_frame_equal(data.info["star"], particles, check_dtype=False)
    assert list(data.info["optics"]["rlnOpticsGroup"]) == [1, 2]
    # the optics group columns reach each particle's CTF
    np.testing.assert_allclose(data.ctf.voltage.numpy(), [300, 200, 300, 200, 300, 200])
    np.testing.assert_allclose(data.ctf.amplitude_contrast.numpy(), [0.1, 0.07] * 3, rtol=1e-6)
    np.testing.assert_allclose(data.ctf.defocus_u.numpy(), particles["rlnDefocusU"], rtol=1e-6)
    np.testing.assert_allclose(data.ctf.pixel_size.numpy(), 1.5)
    assert torch.all(data.ctf.phase_shift == 0) and torch.all(data.ctf.bfactor == 0)
    theta, dx = relion_to_pose(
        particles["rlnAnglePsi"], particles["rlnOriginXAngst"] / 1.5, particles["rlnOriginYAngst"] / 1.5, BOX
    )
    torch.testing.assert_close(data.theta, theta)
    torch.testing.assert_close(data.dx, dx)
    assert data.source_index.tolist() == list(range(6))
    table = read_star(star)
    assert table["rlnVoltage"].tolist() == [300.0, 200.0] * 3
    assert set(particles.columns) <= set(table.columns)
    np.testing.assert_allclose(table["rlnImagePixelSize"], 1.5)


def test_relion30_pixel_size_from_detector_from_argument_or_missing(tmp_path):
    star, images, columns = _relion30(tmp_path)
    data = load_particles(star)
    assert data.info["pixel_size"] == pytest.approx(2.0)  # 5 µm * 1e4 / 25000
    assert data.info["optics"] is None
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    np.testing.assert_allclose(data.ctf.voltage.numpy(), 300.0)
    # origins in pixels (RELION 3.0) need no pixel size
    _, dx = relion_to_pose(columns["rlnAnglePsi"], columns["rlnOriginX"], columns["rlnOriginY"], BOX)
    torch.testing.assert_close(data.dx, dx)

    (tmp_path / "bare").mkdir()
    star, _, _ = _relion30(tmp_path / "bare", pixel_columns=False)
    with pytest.raises(DataError, match="missing pixel size: pass pixel_size"):
        read_star(star)
    with pytest.raises(DataError, match="missing pixel size"):
        load_particles(star)
    assert read_star(star, pixel_size=0.9)["rlnImagePixelSize"].tolist() == [0.9] * 4
    assert load_particles(star, pixel_size=0.9).ctf.pixel_size.tolist() == pytest.approx([0.9] * 4)


def test_star_paths_resolve_from_the_star_folder_from_another_cwd(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    first, second = rng.normal(size=(3, 8, 8)), rng.normal(size=(2, 8, 8))
    (tmp_path / "proj" / "stacks").mkdir(parents=True)
    _write_mrcs(tmp_path / "proj" / "stacks" / "a.mrcs", first)
    _write_mrcs(tmp_path / "proj" / "stacks" / "b.mrcs", second)
    names = ["2@stacks/b.mrcs", "3@stacks/a.mrcs", "1@stacks/a.mrcs", "1@stacks/b.mrcs"]
    star = tmp_path / "proj" / "p.star"
    starfile.write(pd.DataFrame({"rlnImageName": names, "rlnImagePixelSize": [1.0] * 4}), star)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = load_particles("../proj/p.star", mmap=False)
    expected = np.stack([second[1], first[2], first[0], second[0]]).astype(np.float32)
    np.testing.assert_array_equal(data.images[:, 0].numpy(), expected)
    assert data.ctf is None and data.theta is None and data.dx is None


def test_reference_past_the_end_of_a_stack_names_row_and_stack(tmp_path):
    _write_mrcs(tmp_path / "s.mrcs", np.zeros((3, 8, 8)))
    star = tmp_path / "p.star"
    names = ["1@s.mrcs", "3@s.mrcs", "4@s.mrcs"]
    starfile.write(pd.DataFrame({"rlnImageName": names, "rlnImagePixelSize": [1.0] * 3}), star)
    with pytest.raises(DataError, match=r"row 2 asks for image 4 of .*s\.mrcs, which holds 3 images"):
        load_particles(star)
    starfile.write(pd.DataFrame({"rlnImageName": ["1@missing.mrcs"], "rlnImagePixelSize": [1.0]}), star)
    with pytest.raises(DataError, match="row 0: stack 'missing.mrcs' not found"):
        load_particles(star)


def test_nonstandard_header_reads_with_a_warning(tmp_path):
    images = np.random.default_rng(3).normal(size=(4, 10, 10)).astype(np.float32)
    path = _write_mrcs(tmp_path / "s.mrcs", images)
    raw = bytearray(path.read_bytes())
    assert raw[208:212] == b"MAP "
    raw[208:212] = b"\x00\x00\x00\x00"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError):
        mrcfile.open(path).close()  # strict mrcfile refuses it
    for mmap in (True, False):
        with pytest.warns(UserWarning, match="non-standard MRC header"):
            stack = read_stack(path, mmap=mmap)
        np.testing.assert_array_equal(stack, images)


def test_truncated_or_corrupt_stacks_raise(tmp_path):
    path = _write_mrcs(tmp_path / "s.mrcs", np.ones((4, 10, 10)))
    truncated = tmp_path / "t.mrcs"
    truncated.write_bytes(path.read_bytes()[: 1024 + 150])
    for mmap in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(DataError, match=r"t\.mrcs.*truncated or corrupt"):
                read_stack(truncated, mmap=mmap)
    garbage = tmp_path / "g.mrcs"
    garbage.write_bytes(b"not an mrc file")
    with pytest.raises(DataError, match=r"g\.mrcs: not a readable MRC file"):
        read_stack(garbage)
    with pytest.raises(DataError, match="unknown stack format"):
        read_stack(_write_mrcs(tmp_path / "s.txt", np.ones((1, 4, 4))))


def test_single_image_non_square_and_npy_stacks(tmp_path):
    single = _write_mrcs(tmp_path / "one.mrc", np.arange(16.0).reshape(4, 4))
    assert read_stack(single).shape == (1, 4, 4)
    with pytest.raises(DataError, match="expected square images, found 4x6"):
        read_stack(_write_mrcs(tmp_path / "rect.mrcs", np.zeros((2, 4, 6))))
    with pytest.raises(DataError, match="expected square images"):
        load_particles(_write_mrcs(tmp_path / "rect2.mrcs", np.zeros((2, 4, 6))))
    array = np.random.default_rng(4).normal(size=(5, 8, 8))
    np.save(tmp_path / "s.npy", array)  # float64: converted
    stack = read_stack(tmp_path / "s.npy")
    assert stack.dtype == np.float32 and stack.shape == (5, 8, 8)
    data = load_particles(tmp_path / "s.npy", pixel_size=2.5, name="npy")
    assert data.name == "npy" and data.info["pixel_size"] == 2.5 and data.ctf is None
    np.testing.assert_allclose(data.images[:, 0].numpy(), array, rtol=1e-6)
    data.images.add_(1.0)  # the loaded images are writable, not the read-only memory map
    assert load_particles(tmp_path / "s.npy").info["pixel_size"] is None


def test_stack_with_ctf_star_counts_must_match_and_require_ctf(tmp_path):
    rng = np.random.default_rng(5)
    _write_mrcs(tmp_path / "s.mrcs", rng.normal(size=(3, 8, 8)), voxel_size=1.7)
    ctf = pd.DataFrame(
        {**_ctf_columns(3, rng), "rlnVoltage": [300.0] * 3, "rlnSphericalAberration": [2.7] * 3}
    )
    starfile.write(ctf, tmp_path / "ctf.star")
    # a column short: no CTF by default (with a warning), an error listing it with require_ctf
    with pytest.warns(UserWarning, match="missing rlnAmplitudeContrast"):
        assert load_particles(tmp_path / "s.mrcs", ctf=tmp_path / "ctf.star").ctf is None
    with pytest.raises(DataError, match="CTF column\\(s\\) missing: rlnAmplitudeContrast"):
        load_particles(tmp_path / "s.mrcs", ctf=tmp_path / "ctf.star", require_ctf=True)
    ctf["rlnAmplitudeContrast"] = 0.1
    starfile.write(ctf, tmp_path / "ctf.star")
    data = load_particles(tmp_path / "s.mrcs", ctf=tmp_path / "ctf.star", require_ctf=True)
    np.testing.assert_allclose(data.ctf.defocus_v.numpy(), ctf["rlnDefocusV"], rtol=1e-6)
    assert data.info["pixel_size"] == pytest.approx(1.7)  # the MRC header fills the STAR's gap
    assert load_particles(tmp_path / "s.mrcs", ctf=tmp_path / "ctf.star", pixel_size=3.0).info[
        "pixel_size"
    ] == pytest.approx(3.0)
    starfile.write(ctf.iloc[:2], tmp_path / "short.star")
    with pytest.raises(DataError, match="2 CTF rows for 3 images"):
        load_particles(tmp_path / "s.mrcs", ctf=tmp_path / "short.star")
    with pytest.raises(DataError, match="require_ctf=True but there is no CTF table"):
        load_particles(tmp_path / "s.mrcs", require_ctf=True)


def test_different_pixel_sizes_are_refused(tmp_path):
    star, *_ = _relion31(tmp_path)
    blocks = starfile.read(star, always_dict=True)
    blocks["optics"]["rlnImagePixelSize"] = [1.5, 2.0]
    starfile.write(blocks, star, overwrite=True)
    with pytest.raises(DataError, match="different pixel sizes"):
        load_particles(star)


# ------------------------------------------------------------------------------------------ writing


def test_write_particles_round_trip(tmp_path):
    dataset = _ctf_dataset()
    (tmp_path / "out").mkdir()
    star = write_particles(tmp_path / "out" / "sim.star", dataset)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sim.mrcs", "sim.star"]  # no temp files
    with mrcfile.open(tmp_path / "out" / "sim.mrcs") as mrc:
        assert mrc.voxel_size.x == pytest.approx(1.3) and mrc.is_image_stack()
    blocks = starfile.read(star, always_dict=True)
    optics = blocks["optics"]
    assert optics["rlnImagePixelSize"].tolist() == [1.3] and optics["rlnImageSize"].tolist() == [16]
    assert optics["rlnVoltage"].tolist() == [300.0] and optics["rlnImageDimensionality"].tolist() == [2]
    assert "pyroSvaeTrue_conformation" in blocks["particles"].columns
    back = load_particles(star, require_ctf=True)
    torch.testing.assert_close(back.images, dataset.images)
    torch.testing.assert_close(back.theta, dataset.theta, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.dx, dataset.dx, atol=1e-5, rtol=0)
    for name in ("defocus_u", "defocus_v", "defocus_angle", "phase_shift", "bfactor", "amplitude_contrast"):
        torch.testing.assert_close(getattr(back.ctf, name), getattr(dataset.ctf, name))
    torch.testing.assert_close(back.factors["conformation"], dataset.factors["conformation"])
    assert back.labels.tolist() == dataset.labels.tolist()
    # a data set without CTF takes the optics from the arguments
    plain = ImageDataset(torch.randn(2, 1, 8, 8), info={"pixel_size": 4.0})
    star = write_particles(tmp_path / "plain.star", plain, voltage=200.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # optics alone is no partial CTF worth a warning
        back = load_particles(star)
    assert back.info["pixel_size"] == 4.0 and back.theta is None and back.dx is None
    assert back.ctf is None  # no defocus columns
    assert read_star(star)["rlnVoltage"].tolist() == [200.0, 200.0]
    with pytest.raises(DataError, match="missing pixel size"):
        write_particles(tmp_path / "x.star", ImageDataset(torch.randn(2, 1, 8, 8)))
    with pytest.raises(DataError, match="disagrees"):
        write_particles(tmp_path / "x.star", dataset, pixel_size=2.0)


def test_relion_origins_in_pixels_and_angstrom_agree(tmp_path):
    """Two STAR files naming the same poses, one in pixels, one in Å, load to the same theta/dx."""
    _write_mrcs(tmp_path / "s.mrcs", np.zeros((3, 8, 8)))
    psi, ox, oy = np.array([10.0, 200.0, 359.0]), np.array([1.0, -2.0, 0.5]), np.array([0.0, 1.5, -1.0])
    common = {
        "rlnImageName": [f"{i}@s.mrcs" for i in (1, 2, 3)],
        "rlnAnglePsi": psi,
        "rlnImagePixelSize": 2.0,
    }
    starfile.write(pd.DataFrame({**common, "rlnOriginX": ox, "rlnOriginY": oy}), tmp_path / "px.star")
    starfile.write(
        pd.DataFrame({**common, "rlnOriginXAngst": 2 * ox, "rlnOriginYAngst": 2 * oy}), tmp_path / "a.star"
    )
    pixels, angstrom = load_particles(tmp_path / "px.star"), load_particles(tmp_path / "a.star")
    torch.testing.assert_close(pixels.theta, angstrom.theta)
    torch.testing.assert_close(pixels.dx, angstrom.dx)


# ------------------------------------------------------------------------------------- preprocessing


def _blob(box, centre, sigma):
    """A Gaussian blob in pixel units, centre ``(col, row)``."""
    rows, cols = np.meshgrid(np.arange(box), np.arange(box), indexing="ij")
    return np.exp(-((cols - centre[0]) ** 2 + (rows - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_relion_angles_are_wrapped_to_half_open_turns():
    psi = np.array([0.0, 90.0, 180.0, 270.0, -180.0, 540.0, 359.0])
    theta, _ = relion_to_pose(psi, np.zeros(7), np.zeros(7), BOX)
    assert float(theta.min()) >= -np.float32(math.pi) and float(theta.max()) < math.pi
    np.testing.assert_allclose(theta.numpy(), np.deg2rad([0, 90, -180, -90, -180, -180, -1]), atol=1e-6)
    theta = torch.tensor([3 * math.pi, -math.pi, 2.5 * math.pi, 7.0], dtype=torch.float64)
    back, _, _ = pose_to_relion(theta, torch.zeros(4, 2), BOX)
    assert back.min() >= -180.0 and back.max() < 180.0
    np.testing.assert_allclose(back, [-180.0, -180.0, 90.0, np.rad2deg(7.0 - 2 * math.pi)], atol=1e-9)


def test_circular_mask_values():
    hard = circular_mask(8)
    assert hard.shape == (8, 8) and hard.dtype == torch.float32
    assert hard[3, 3] == 1 and hard[0, 0] == 0 and hard[3, 0] == 1  # distance 3.5 <= 4
    assert torch.equal(hard, hard.flip(0)) and torch.equal(hard, hard.T)
    soft = circular_mask(33, 8.0, soft_edge=4.0)  # centre pixel 16
    assert soft[16, 16] == 1 and soft[16, 16 + 8] == 1
    assert soft[16, 16 + 10].item() == pytest.approx(0.5, abs=1e-6)  # halfway down the cosine
    assert soft[16, 16 + 12] == 0 and soft[0, 0] == 0
    assert bool(((soft >= 0) & (soft <= 1)).all())
    assert circular_mask(33, soft_edge=4.0)[16, 16 + 12] == 1  # default radius box/2 - soft_edge = 12.5


def test_normalize_particles_background_mean_zero_std_one():
    gen = torch.Generator().manual_seed(0)
    images = 3.0 + 2.0 * torch.randn(4, 1, 32, 32, generator=gen)
    images += 50 * torch.from_numpy(_blob(32, (15.5, 15.5), 3.0))  # a bright particle in the middle
    out = normalize_particles(images)
    background = circular_mask(32, 0.75 * 16) == 0
    values = out[..., background]
    torch.testing.assert_close(values.mean(-1), torch.zeros(4, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(values.std(-1, correction=0), torch.ones(4, 1), atol=1e-5, rtol=0)
    assert out[:, 0, 16, 16].min() > 15  # the particle is not part of the background
    custom = normalize_particles(images, mask_radius=14.0)[..., circular_mask(32, 14.0) == 0]
    torch.testing.assert_close(custom.mean(-1), torch.zeros(4, 1), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="constant background"):
        normalize_particles(torch.ones(2, 1, 16, 16))
    noise_free = torch.from_numpy(_blob(32, (15.5, 15.5), 1.5)).expand(2, 1, 32, 32)  # tails ~1e-14 outside
    with pytest.raises(DataError, match="constant background"):
        normalize_particles(noise_free)
    with pytest.raises(DataError, match="background pixel"):
        normalize_particles(images, mask_radius=100.0)


@pytest.mark.parametrize("old, new", [(64, 32), (64, 31), (63, 32)])
def test_fourier_crop_of_a_band_limited_blob(old, new):
    # RELION's centre N/2 maps onto new pixel n/2 and sizes scale by new/old
    image = _blob(old, (old / 2 + 3.0, old / 2 - 5.0), 4.0)
    factor = new / old
    expected = _blob(new, (new / 2 + 3.0 * factor, new / 2 - 5.0 * factor), 4.0 * factor)
    cropped = fourier_crop(torch.from_numpy(image)[None, None], new)
    assert cropped.shape == (1, 1, new, new)
    np.testing.assert_allclose(cropped[0, 0].numpy(), expected, atol=2e-4)
    assert float(cropped.mean()) == pytest.approx(float(image.mean()), rel=2e-3)  # intensity kept
    torch.testing.assert_close(
        fourier_crop(torch.from_numpy(image)[None, None], old)[0, 0], torch.from_numpy(image)
    )
    with pytest.raises(DataError, match="between 2 and"):
        fourier_crop(torch.zeros(1, 1, old, old), old + 1)


def test_preprocess_particles_crop_invert_normalize_and_metadata():
    dataset = _ctf_dataset(n=3, box=16)
    dataset.info.update(pixel_size=1.3, box_size=16, star=None)
    out = preprocess_particles(dataset, box=8, invert=True, normalize=False, batch_size=2)
    torch.testing.assert_close(out.images, fourier_crop(-dataset.images, 8))
    assert out.info["pixel_size"] == pytest.approx(2.6) and out.info["box_size"] == 8
    torch.testing.assert_close(out.ctf.pixel_size, torch.full((3,), 2.6))
    torch.testing.assert_close(out.ctf.defocus_u, dataset.ctf.defocus_u)
    torch.testing.assert_close(out.theta, dataset.theta)
    assert out.labels.tolist() == dataset.labels.tolist() and set(out.factors) == {"conformation"}
    assert dataset.info["pixel_size"] == 1.3 and dataset.images.shape[-1] == 16  # input untouched
    # dx follows the grid map of the crop; RELION origins in Å move by less than one new pixel
    a = 15 * 8 / (16 * 7)
    torch.testing.assert_close(out.dx, a * dataset.dx + torch.tensor([a - 1, 1 - a]))
    _, ox0, oy0 = pose_to_relion(dataset.theta, dataset.dx, 16)
    _, ox1, oy1 = pose_to_relion(out.theta, out.dx, 8)
    assert np.abs(ox1 * 2.6 - ox0 * 1.3).max() < 2.6 and np.abs(oy1 * 2.6 - oy0 * 1.3).max() < 2.6
    normalized = preprocess_particles(dataset)
    assert normalized.images.shape == dataset.images.shape and normalized.info["pixel_size"] == 1.3
    torch.testing.assert_close(normalized.images, normalize_particles(dataset.images))


def test_preprocess_dx_follows_the_content_across_the_crop():
    """A blob at content shift dx (theta = 0) is found at the converted dx after cropping."""
    old, new = 64, 32
    dx = np.array([0.2, -0.1])
    grid_to_pixel = (old - 1) / 2
    centre = ((dx[0] + 1) * grid_to_pixel, (1 - dx[1]) * grid_to_pixel)  # (col, row); y up
    dataset = ImageDataset(
        torch.from_numpy(_blob(old, centre, 4.0))[None, None],
        theta=torch.zeros(1),
        dx=torch.from_numpy(dx)[None],
    )
    out = preprocess_particles(dataset, box=new, normalize=False)
    image = out.images[0, 0].numpy()
    rows, cols = np.meshgrid(np.arange(new), np.arange(new), indexing="ij")
    col, row = (image * cols).sum() / image.sum(), (image * rows).sum() / image.sum()
    found = np.array([2 * col / (new - 1) - 1, 1 - 2 * row / (new - 1)])
    np.testing.assert_allclose(out.dx[0].numpy(), found, atol=1e-3)
    assert abs(found[0] - dx[0]) > 2e-3  # unchanged grid units would have been wrong


# ------------------------------------------------------------------------------------------- export


def test_write_posterior_star_round_trip_keeps_input_columns(tmp_path):
    star, _, particles, optics = _relion31(tmp_path)
    data = load_particles(star)
    subset = data.subset([4, 0, 2, 5, 1, 3])  # shuffled: the export goes back to the STAR order
    n = len(subset)
    gen = torch.Generator().manual_seed(1)
    theta = (torch.rand(n, generator=gen) * 2 - 1) * math.pi
    dx = torch.randn(n, 2, generator=gen) * 0.1
    z_mean, z_std = torch.randn(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    out = write_posterior_star(
        tmp_path / "posterior.star",
        subset,
        theta_mean=theta,
        theta_std=torch.full((n,), 0.1),
        dx_mean=dx,
        dx_std=torch.full((n, 2), 0.01),
        z_mean=z_mean,
        z_std=z_std,
    )
    order = np.argsort(subset.source_index.numpy())
    blocks = starfile.read(out, always_dict=True)
    pd.testing.assert_frame_equal(blocks["optics"], optics, check_dtype=False)
    table = read_star(out)
    assert table["rlnImageName"].tolist() == particles["rlnImageName"].tolist()
    for column in ("rlnDefocusU", "rlnDefocusV", "rlnClassNumber", "rlnOpticsGroup"):
        np.testing.assert_allclose(table[column], particles[column], rtol=1e-6)
    for column in ("AnglePsi", "OriginXAngst", "OriginYAngst"):
        np.testing.assert_allclose(table[f"pyroSvaeInput{column}"], particles[f"rln{column}"], rtol=1e-6)
    assert table["rlnAnglePsi"].between(-180.0, 180.0, inclusive="left").all()  # 2-D poses: RELION's columns
    assert "pyroSvaePsiDeg" not in table and posterior_pose_note(subset) is None
    for k in range(3):
        np.testing.assert_allclose(table[f"pyroSvaeZ{k + 1}"], z_mean[order, k].numpy(), rtol=1e-6)
        np.testing.assert_allclose(table[f"pyroSvaeZStd{k + 1}"], z_std[order, k].numpy(), rtol=1e-6)
    np.testing.assert_allclose(table["pyroSvaePsiStdDeg"], np.rad2deg(0.1), rtol=1e-6)
    np.testing.assert_allclose(table["pyroSvaeOriginXStdAngst"], 0.01 * (BOX - 1) / 2 * 1.5, rtol=1e-6)
    # the posterior poses load back as theta/dx
    back = load_particles(out)
    torch.testing.assert_close(back.theta, torch.atan2(theta.sin(), theta.cos())[order], atol=1e-5, rtol=0)
    torch.testing.assert_close(back.dx, dx[order], atol=1e-5, rtol=0)
    # exporting the export again keeps the original input poses and replaces the posterior columns
    again = write_posterior_star(
        tmp_path / "again.star", back, theta_mean=torch.zeros(n), z_mean=torch.zeros(n)
    )
    table = read_star(again)
    np.testing.assert_allclose(table["pyroSvaeInputAnglePsi"], particles["rlnAnglePsi"], rtol=1e-6)
    assert "pyroSvaeZ2" not in table and table["pyroSvaeZ1"].tolist() == [0.0] * n
    assert table["rlnAnglePsi"].tolist() == [0.0] * n
    with pytest.raises(DataError, match="z_mean: expected shape"):
        write_posterior_star(tmp_path / "bad.star", back, z_mean=torch.zeros(n + 1, 2))


def test_write_posterior_star_keeps_3d_poses_and_writes_its_own_columns(tmp_path):
    _, _, particles, optics = _relion31(tmp_path)
    rng = np.random.default_rng(4)
    pose_columns = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    refined = particles.assign(
        rlnAngleRot=rng.uniform(-180, 180, 6), rlnAngleTilt=rng.uniform(0, 180, 6)
    )  # particles refined in 3D
    refined.loc[0, pose_columns] = [-179.999999, 179.999999, 123.456789, -0.000001, 999.999999]
    star = tmp_path / "refined.star"
    starfile.write({"optics": optics, "particles": refined}, star)
    data = load_particles(star)
    note = posterior_pose_note(data)
    assert note is not None and "3D poses (rlnAngleRot/rlnAngleTilt)" in note and "pyroSvaePsiDeg" in note
    subset = data.subset([3, 1, 5, 0, 2, 4])
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(6, generator=gen) * 4  # beyond [-pi, pi)
    dx = torch.randn(6, 2, generator=gen) * 0.1
    out = write_posterior_star(tmp_path / "posterior.star", subset, theta_mean=theta, dx_mean=dx)
    order = np.argsort(subset.source_index.numpy())
    table = starfile.read(out, always_dict=True)["particles"]
    original = starfile.read(star, always_dict=True)["particles"]
    for column in pose_columns:  # the input's refinement, value for value
        np.testing.assert_array_equal(table[column].to_numpy(), original[column].to_numpy())
    assert not [column for column in table.columns if column.startswith("pyroSvaeInput")]
    assert "rlnOriginX" not in table and "rlnOriginY" not in table
    psi, origin_x, origin_y = pose_to_relion(theta[order], dx[order], BOX)
    np.testing.assert_allclose(table["pyroSvaePsiDeg"], psi, rtol=1e-6, atol=1e-6)
    assert table["pyroSvaePsiDeg"].between(-180.0, 180.0, inclusive="left").all()
    np.testing.assert_allclose(table["pyroSvaeOriginXAngst"], origin_x * 1.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(table["pyroSvaeOriginYAngst"], origin_y * 1.5, rtol=1e-6, atol=1e-6)
    # exporting the export again: still the refinement's poses, the posterior columns replaced
    again = write_posterior_star(tmp_path / "again.star", load_particles(out), theta_mean=torch.zeros(6))
    table = starfile.read(again, always_dict=True)["particles"]
    for column in pose_columns:
        np.testing.assert_array_equal(table[column].to_numpy(), original[column].to_numpy())
    assert table["pyroSvaePsiDeg"].tolist() == [0.0] * 6 and "pyroSvaeOriginXAngst" not in table
    # tilt alone is a 3-D pose too; a STAR without rot and tilt is 2-D and gets RELION's columns
    tilted = load_particles(star)
    tilted.info["star"] = tilted.info["star"].drop(columns="rlnAngleRot")
    assert "(rlnAngleTilt)" in posterior_pose_note(tilted)
    assert posterior_pose_note(load_particles(tmp_path / "particles.star")) is None


def test_write_posterior_star_for_a_bare_stack(tmp_path):
    np.save(tmp_path / "s.npy", np.random.default_rng(6).normal(size=(3, 8, 8)))
    data = load_particles(tmp_path / "s.npy", pixel_size=2.0)
    (tmp_path / "results").mkdir()
    out = write_posterior_star(
        tmp_path / "results" / "post.star", data, dx_mean=torch.zeros(3, 2), dx_std=torch.full((3,), 0.1)
    )
    table = starfile.read(out)
    stack = (tmp_path / "s.npy").resolve()
    assert table["rlnImageName"].tolist() == [f"{i:06d}@{stack}" for i in (1, 2, 3)]
    assert table["pyroSvaeIndex"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(table["pyroSvaeOriginStdAngst"], 0.1 * 3.5 * 2.0, rtol=1e-6)
    assert "rlnAnglePsi" not in table
    with pytest.raises(DataError, match="missing pixel size"):
        write_posterior_star(
            tmp_path / "p.star", ImageDataset(torch.zeros(2, 1, 4, 4)), dx_mean=torch.zeros(2, 2)
        )


@pytest.mark.parametrize("layout", ["3.1", "3.0"])
def test_export_of_the_real_relion_samples_keeps_every_column_and_image_name(tmp_path, monkeypatch, layout):
    """relion_project's own files (tests/data/relion, RELION 3.1.3), and the same rows in RELION 3.0's
    single-block layout, placed in a project folder and read from it as RELION would."""
    from pathlib import Path

    source = Path(__file__).parent / "data" / "relion"
    project = tmp_path / "project"
    (project / "Extract" / "job012").mkdir(parents=True)
    (project / "Select" / "job020").mkdir(parents=True)
    (project / "Extract" / "job012" / "poses_32.mrcs").write_bytes((source / "poses_32.mrcs").read_bytes())
    blocks = starfile.read(source / "poses_32.star", always_dict=True)
    particles, optics = blocks["particles"], blocks["optics"]
    names = [f"{i + 1:06d}@Extract/job012/poses_32.mrcs" for i in range(len(particles))]
    particles = particles.assign(rlnImageName=names)
    if layout == "3.0":  # one block, optics columns on every row
        merged = particles.merge(optics, on="rlnOpticsGroup").drop(
            columns=["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImageSize", "rlnImageDimensionality"]
        )
        star_blocks = {"": merged}
    else:
        star_blocks = {"optics": optics, "particles": particles}
    star = project / "Select" / "job020" / "particles.star"
    starfile.write(star_blocks, star)
    written = starfile.read(star, always_dict=True)
    original = written.get("particles", next(iter(written.values())))
    monkeypatch.chdir(project)
    data = load_particles("Select/job020/particles.star")
    n = len(data)
    out = write_posterior_star(
        tmp_path / "elsewhere" / "posterior.star",
        data,
        theta_mean=torch.linspace(-3, 3, n),
        dx_mean=torch.zeros(n, 2),
        z_mean=torch.ones(n, 2),
    )
    table = starfile.read(out, always_dict=True)["particles"]
    assert table["rlnImageName"].tolist() == names
    for column in original.columns:  # 3-D poses (rlnAngleRot/Tilt): every input value as it was
        np.testing.assert_array_equal(table[column].to_numpy(), original[column].to_numpy())
    assert {"pyroSvaePsiDeg", "pyroSvaeOriginXAngst", "pyroSvaeZ2"} <= set(table.columns)
    back = load_particles(out)  # from the project directory
    torch.testing.assert_close(back.images, data.images, rtol=0, atol=0)


def test_read_indices_accepts_npy_and_txt_and_refuses_bad_selections(tmp_path):
    np.save(tmp_path / "a.npy", np.array([4, 0, 2], dtype=np.int32))
    assert read_indices(tmp_path / "a.npy", 5).tolist() == [4, 0, 2]
    np.save(tmp_path / "f.npy", np.array([1.0, 3.0]))
    assert read_indices(tmp_path / "f.npy", 5).tolist() == [1, 3]
    (tmp_path / "a.txt").write_text("3\n1, 0\n")
    assert read_indices(tmp_path / "a.txt", 5).tolist() == [3, 1, 0]
    cases = {
        "out.npy": (np.array([0, 5]), "index 5 is outside the 5 particles"),
        "neg.npy": (np.array([-1]), "index -1 is outside"),
        "dup.npy": (np.array([1, 2, 1]), "index 1 is selected more than once"),
        "frac.npy": (np.array([0.5]), "is not an integer"),
        "empty.npy": (np.array([], dtype=np.int64), "holds no indices"),
        "mask.npy": (np.array([True, False]), "boolean mask"),
        "grid.npy": (np.zeros((2, 2), dtype=np.int64), "expected a list of particle indices"),
    }
    for name, (values, message) in cases.items():
        np.save(tmp_path / name, values)
        with pytest.raises(DataError, match=message):
            read_indices(tmp_path / name, 5)
    (tmp_path / "words.txt").write_text("1 two\n")
    with pytest.raises(DataError, match="'two' is not a particle index"):
        read_indices(tmp_path / "words.txt", 5)
    (tmp_path / "a.pkl").write_bytes(b"x")
    with pytest.raises(DataError, match="expected .npy or .txt"):
        read_indices(tmp_path / "a.pkl", 5)


def _cryosparc_project(tmp_path, n=7, box=BOX, seed=8):
    """A cryoSPARC project in its documented layout: the extraction job's stacks under ``J5/extract/``
    and a particle ``.cs`` file of another job (``J7``), blob paths relative to the project directory."""
    rng = np.random.default_rng(seed)
    project = tmp_path / "P3"
    (project / "J5" / "extract").mkdir(parents=True)
    (project / "J7").mkdir()
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    _write_mrcs(project / "J5" / "extract" / "mic_a_particles.mrc", images[:4])
    _write_mrcs(project / "J5" / "extract" / "mic_b_particles.mrc", images[4:])
    paths = [b"J5/extract/mic_a_particles.mrc"] * 4 + [b">J5/extract/mic_b_particles.mrc"] * (n - 4)
    dtype = [
        ("uid", "<u8"),
        ("blob/path", "S40"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"),
        ("ctf/type", "S1"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"),
        ("ctf/bfactor", "<f4"),
        ("alignments2D/pose", "<f4"),
        ("alignments2D/shift", "<f4", (2,)),
    ]
    cs = np.zeros(n, dtype=dtype)
    cs["uid"] = rng.integers(1, 2**63, size=n, dtype=np.uint64)
    cs["blob/path"] = paths
    cs["blob/idx"] = [0, 1, 2, 3, 0, 1, 2][:n]
    cs["blob/shape"] = box
    cs["blob/psize_A"] = 1.5
    cs["blob/sign"] = -1
    cs["ctf/accel_kv"], cs["ctf/cs_mm"], cs["ctf/amp_contrast"] = 300, 2.7, 0.07
    cs["ctf/df1_A"] = rng.uniform(10000, 20000, n)
    cs["ctf/df2_A"] = cs["ctf/df1_A"] - 300
    cs["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    cs["ctf/phase_shift_rad"] = 0.25
    cs["alignments2D/pose"] = rng.uniform(-np.pi, np.pi, n)
    with open(project / "J7" / "J7_particles.cs", "wb") as handle:
        np.save(handle, cs)
    return project, cs, images


def test_cryosparc_cs_particles_and_posterior_round_trip(tmp_path, monkeypatch):
    from pyro_svae.data import read_cs, write_posterior_cs

    project, cs, images = _cryosparc_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    data = load_particles(project / "J7" / "J7_particles.cs")  # blob paths from the project directory
    np.testing.assert_array_equal(data.images[:, 0].numpy(), images)
    assert data.info["pixel_size"] == 1.5 and data.theta is None and data.dx is None
    ctf = data.ctf
    np.testing.assert_allclose(ctf.defocus_u.numpy(), cs["ctf/df1_A"], rtol=1e-6)
    np.testing.assert_allclose(ctf.defocus_v.numpy(), cs["ctf/df2_A"], rtol=1e-6)
    np.testing.assert_allclose(ctf.defocus_angle.numpy(), np.rad2deg(cs["ctf/df_angle_rad"]), rtol=1e-5)
    np.testing.assert_allclose(ctf.phase_shift.numpy(), np.rad2deg(0.25), rtol=1e-5)
    np.testing.assert_allclose(ctf.voltage.numpy(), 300.0)
    np.testing.assert_allclose(ctf.amplitude_contrast.numpy(), 0.07, rtol=1e-6)
    # elsewhere, with the project named
    moved = tmp_path / "copy.cs"
    moved.write_bytes((project / "J7" / "J7_particles.cs").read_bytes())
    with pytest.raises(DataError, match="not found"):
        load_particles(moved)
    assert torch.equal(load_particles(moved, project_dir=project).images, data.images)

    n = len(data)
    subset = data.subset([6, 2, 0, 4, 1, 5, 3])  # shuffled: the export goes back to the input order
    order = np.argsort(subset.source_index.numpy())
    gen = torch.Generator().manual_seed(3)
    theta, dx = torch.randn(n, generator=gen) * 4, torch.randn(n, 2, generator=gen) * 0.1
    z, z_std = torch.randn(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    out = write_posterior_cs(
        tmp_path / "out" / "posterior.cs",
        subset,
        theta_mean=theta,
        theta_std=torch.full((n,), 0.2),
        dx_mean=dx,
        dx_std=torch.full((n, 2), 0.01),
        z_mean=z,
        z_std=z_std,
    )
    written = np.load(out)
    assert written.dtype["uid"] == np.uint64 and written["uid"].tolist() == cs["uid"].tolist()
    assert {"pyro_svae/theta", "pyro_svae/theta_std", "pyro_svae/dx", "pyro_svae/z_std"} <= set(
        written.dtype.names
    )
    assert written.dtype["pyro_svae/z"].shape == (3,) and written.dtype["pyro_svae/dx"].shape == (2,)
    np.testing.assert_allclose(written["pyro_svae/z"], z[order].numpy(), rtol=1e-6)
    wrapped = torch.atan2(theta.sin(), theta.cos())[order].numpy()
    np.testing.assert_allclose(np.cos(written["pyro_svae/theta"] - wrapped), 1.0, atol=1e-6)
    assert (np.abs(written["pyro_svae/theta"]) <= np.pi).all()
    joined = {int(u): row for row, u in enumerate(written["uid"])}  # cryoSPARC joins on uid
    assert [joined[int(u)] for u in cs["uid"]] == list(range(n))
    # the STAR export of .cs particles: blob paths as RELION image names, read from the project
    star = write_posterior_star(tmp_path / "out" / "posterior.star", subset, theta_mean=theta)
    table = read_star(star)
    assert table["rlnImageName"].iloc[4] == "000001@J5/extract/mic_b_particles.mrc"
    assert table["pyroSvaeCryosparcUid"].astype(np.uint64).tolist() == cs["uid"].tolist()
    again = load_particles(star, project_dir=project)
    assert torch.equal(again.images, data.images)
    torch.testing.assert_close(again.ctf.defocus_angle, data.ctf.defocus_angle)
    # refusals
    np.save(tmp_path / "plain.npy", np.zeros(3, dtype=[("uid", "<u8")]))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.cs")
    with pytest.raises(DataError, match="no blob/path or blob/idx"):
        read_cs(tmp_path / "plain.cs")
    with pytest.raises(DataError, match="needs particles read from a .cs file"):
        write_posterior_cs(tmp_path / "x.cs", load_particles(star, project_dir=project), z_mean=z)
