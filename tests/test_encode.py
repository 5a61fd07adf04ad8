"""``pyro-svae encode``: the posterior of every image of a file, stack or folder, in input order."""

from __future__ import annotations

import csv
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from pyro_svae.cli import main
from pyro_svae.data import load_particles, mnist_digits
from pyro_svae.runs import load_posterior

TINY = ["--hidden-dim", "16", "--eval-particles", "2", "--posterior-draws", "3", "--no-progress"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def particle_run(tmp_path_factory) -> tuple[Path, Path]:
    """40 simulated 16x16 particles with CTF, and a 1-epoch run on them."""
    root = tmp_path_factory.mktemp("encode")
    assert (
        main(["simulate-particles", "--out", str(root / "sim"), "--n", "40", "--box", "16", "--seed", "3"])
        == 0
    )
    star = root / "sim" / "particles.star"
    assert main(["train", "--particles", str(star), "--out", str(root / "run"), *TINY]) == 0
    return root / "run", star


def test_encode_the_runs_own_particles_in_input_order_with_names(capsys, particle_run):
    run_dir, star = particle_run
    code, out, err = run(capsys, "encode", run_dir)
    assert code == 0, err
    assert "particles: 40 images encoded" in out and "project directory" in out
    folder = run_dir / "encode-particles"
    table = starfile.read(folder / "particles.star", always_dict=True)["particles"]
    original = starfile.read(star, always_dict=True)["particles"]
    assert table["rlnImageName"].tolist() == original["rlnImageName"].tolist()  # every particle, unchanged
    assert set(original.columns) <= set(table.columns)
    assert {"rlnAnglePsi", "pyroSvaePsiStdDeg", "pyroSvaeZ1", "pyroSvaeZStd1"} <= set(table.columns)
    # the same posterior as the run's own particles.star (same guide, same preprocessing)
    trained = starfile.read(run_dir / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(table["pyroSvaeZ1"], trained["pyroSvaeZ1"], rtol=1e-5, atol=1e-6)
    posterior = load_posterior(folder / "posterior.nc").posterior
    assert posterior["z"].shape[:3] == (1, 3, 40)
    code, _, err = run(capsys, "encode", run_dir)
    assert code == 2 and "--overwrite" in err
    keep = run_dir.parent / "keep.txt"
    keep.write_text("7 3 30\n")
    code, out, err = run(capsys, "encode", run_dir, "--ind", keep, "--out", run_dir.parent / "sel")
    assert code == 0, err
    table = starfile.read(run_dir.parent / "sel" / "particles.star", always_dict=True)["particles"]
    assert table["rlnImageName"].tolist() == original["rlnImageName"].iloc[[3, 7, 30]].tolist()


def _cryosparc_copy(root: Path, star: Path) -> tuple[Path, np.ndarray]:
    """The simulated particles as a cryoSPARC project: J2/extract/ stack and J9/J9_particles.cs."""
    data = load_particles(star, mmap=False)
    (root / "P1" / "J2" / "extract").mkdir(parents=True)
    (root / "P1" / "J9").mkdir()
    with mrcfile.new(root / "P1" / "J2" / "extract" / "stack.mrc") as mrc:
        mrc.set_data(data.images[:, 0].numpy())
    n, ctf = len(data), data.ctf
    dtype = [("uid", "<u8"), ("blob/path", "S30"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4")]
    dtype += [(f"ctf/{name}", "<f4") for name in ("accel_kv", "cs_mm", "amp_contrast", "df1_A", "df2_A")]
    dtype += [("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")]
    cs = np.zeros(n, dtype=dtype)
    cs["uid"] = np.random.default_rng(1).integers(1, 2**62, n, dtype=np.uint64)
    cs["blob/path"], cs["blob/idx"] = b"J2/extract/stack.mrc", np.arange(n)
    cs["blob/psize_A"] = ctf.pixel_size.numpy()
    cs["ctf/accel_kv"], cs["ctf/cs_mm"] = ctf.voltage.numpy(), ctf.spherical_aberration.numpy()
    cs["ctf/amp_contrast"] = ctf.amplitude_contrast.numpy()
    cs["ctf/df1_A"], cs["ctf/df2_A"] = ctf.defocus_u.numpy(), ctf.defocus_v.numpy()
    cs["ctf/df_angle_rad"] = np.deg2rad(ctf.defocus_angle.numpy())
    cs["ctf/phase_shift_rad"] = np.deg2rad(ctf.phase_shift.numpy())
    path = root / "P1" / "J9" / "J9_particles.cs"
    with open(path, "wb") as handle:
        np.save(handle, cs)
    return path, cs


def test_encode_cryosparc_particles_writes_star_and_cs(capsys, particle_run, tmp_path):
    run_dir, star = particle_run
    cs_path, cs = _cryosparc_copy(tmp_path, star)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "encode", run_dir, "--particles", cs_path, "--out", out)
    assert code == 0, err
    assert "J9_particles: 40 images encoded: particles.star, particles.cs, posterior.nc" in stdout
    written = np.load(out / "particles.cs")
    assert written["uid"].tolist() == cs["uid"].tolist()
    assert {
        "pyro_svae/theta",
        "pyro_svae/theta_std",
        "pyro_svae/dx",
        "pyro_svae/z",
        "pyro_svae/z_std",
    } <= set(written.dtype.names)
    table = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert table["rlnImageName"].tolist() == [f"{i + 1:06d}@J2/extract/stack.mrc" for i in range(40)]
    # the same images and CTF as the STAR file: the same posterior means
    trained = starfile.read(run_dir / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(written["pyro_svae/z"][:, 0], trained["pyroSvaeZ1"], rtol=1e-4, atol=1e-5)
    again = load_particles(out / "particles.star", project_dir=tmp_path / "P1")
    assert torch.equal(again.images, load_particles(star).images)


def test_encode_an_image_folder_writes_a_catalogue(capsys, tmp_path):
    images, _ = mnist_digits()
    small = images[:30, ::2, ::2].astype(np.float32)
    np.save(tmp_path / "train.npy", small)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", tmp_path / "train.npy", "--out", run_dir, *TINY)
    assert code == 0, err
    folder = tmp_path / "cutouts"
    folder.mkdir()
    np.save(folder / "b.npy", small[3:6])  # a cube: three images
    np.save(folder / "a.npy", small[0])
    code, out, err = run(capsys, "encode", run_dir, "--data", folder)
    assert code == 0, err
    with open(run_dir / "encode-cutouts" / "catalogue.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["file"], row["image"]) for row in rows] == [
        ("a.npy", "0"),
        ("b.npy", "0"),
        ("b.npy", "1"),
        ("b.npy", "2"),
    ]
    assert {"angle_deg", "angle_std_deg", "shift_x", "shift_y_std", "z1", "z2_std"} <= set(rows[0])
    assert all(-180 <= float(row["angle_deg"]) < 180 for row in rows)
    posterior = load_posterior(run_dir / "encode-cutouts" / "posterior.nc").posterior
    assert posterior["theta"].shape[2] == 4
    code, _, err = run(
        capsys, "encode", run_dir, "--data", folder, "--ind", tmp_path / "k.txt", "--overwrite"
    )
    assert code == 2 and "--ind selects particles" in err
    code, _, err = run(capsys, "encode", run_dir, "--particles", folder / "a.npy", "--overwrite")
    assert code == 2 and "not trained on particles" in err
