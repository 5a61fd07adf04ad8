"""Run folders: layout, config -> model, metrics.csv, data specs, posterior NetCDF, figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_svae import AmortizedGuide, SpatialVAE, fit, runs
from pyro_svae.checkpoint import CheckpointError, save_checkpoint
from pyro_svae.coords import transform_images
from pyro_svae.data import DataError, ImageDataset, mnist_digits

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@pytest.fixture(scope="module")
def posed() -> tuple[ImageDataset, ImageDataset]:
    """80 rotated and shifted 14x14 digits with their poses and labels (60 train, 20 test)."""
    images, labels = mnist_digits()
    pick = np.arange(0, 5000, 61)[:80]
    small = torch.from_numpy(images[pick][:, None, ::2, ::2].copy())
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(80, generator=generator) * math.pi / 4
    dx = torch.randn(80, 2, generator=generator) * 0.05
    posed = transform_images(small, theta, dx).clamp(0, 1)
    full = ImageDataset(posed, theta=theta, dx=dx, labels=labels[pick], name="posed")
    return full.subset(range(60)), full.subset(range(60, 80))


def tiny_model(image_shape=(1, 14, 14), **kwargs) -> tuple[SpatialVAE, AmortizedGuide]:
    model = SpatialVAE(image_shape, 2, hidden_dim=16, **kwargs)
    return model, AmortizedGuide(model, hidden_dim=16)


# --------------------------------------------------------------------------------------------------
# folders and files
# --------------------------------------------------------------------------------------------------
def test_prepare_run_folder_protects_an_existing_run(tmp_path):
    folder = runs.prepare_run_folder(tmp_path / "run")
    runs.write_json(folder.config, {"a": 1})
    with pytest.raises(runs.RunError, match="already holds a run .*config.json.*--overwrite"):
        runs.prepare_run_folder(folder.root)
    assert folder.config.is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(runs.RunError, match="not a folder"):
        runs.prepare_run_folder(tmp_path / "file")


def fake_run(root) -> dict[str, bytes]:
    """A run folder with the project's files (figures, evaluate's and sample's too) and the user's own
    files beside them; returns ``{relative path: bytes}`` of every file."""
    files = {
        "config.json": b"{}",
        "checkpoint.pt": b"old weights",
        "figures/manifold.png": b"png",
        "figures/mine.png": b"the user's",
        "notes.txt": b"the user's",
        "evaluation-test/summary.json": b"{}",
        "evaluation-test/figures/theta.png": b"png",
        "evaluation-test/my.csv": b"the user's",
        "samples/samples.npz": b"npz",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def files_in(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_overwrite_sets_the_run_aside_until_it_is_put_back_or_deleted(tmp_path):
    before = fake_run(tmp_path)
    mine = {name: data for name, data in before.items() if data == b"the user's"}
    folder = runs.RunFolder(tmp_path)
    folder.moving.mkdir()  # a crash halfway through moving the run aside: all of it goes back
    folder.checkpoint.rename(folder.moving / "checkpoint.pt")
    assert runs.restore_replaced(folder) and files_in(tmp_path) == before

    folder = runs.prepare_run_folder(tmp_path, overwrite=True)
    assert not folder.moving.exists() and set(files_in(folder.replaced)) == set(before) - set(mine)
    assert {name for name in files_in(tmp_path) if not name.startswith(".replaced-run/")} == set(mine)
    assert not (tmp_path / "samples").exists()  # emptied folders go, those with the user's files stay
    runs.write_json(folder.config, {"new": True})
    folder.figures.joinpath("manifold.png").write_bytes(b"new png")
    assert runs.restore_replaced(folder)  # the new run stopped before its first checkpoint
    assert files_in(tmp_path) == before

    runs.prepare_run_folder(tmp_path, overwrite=True)
    save_checkpoint(folder.checkpoint, {"epoch": 1})
    assert runs.discard_replaced(folder) and not runs.discard_replaced(folder)
    assert set(files_in(tmp_path)) == {*mine, "checkpoint.pt"}
    assert all(files_in(tmp_path)[name] == data for name, data in mine.items())


def test_orphan_temporary_files_are_removed_and_nothing_else(tmp_path):
    folder = runs.prepare_run_folder(tmp_path)
    save_checkpoint(folder.checkpoint, {"epoch": 1})
    orphans = [".checkpoint.pt.k2j4_x9a.tmp", "figures/.manifold.png.abcd1234.tmp"]
    orphans += ["figures/.traversal.gif.zz0011yy.tmp.gif", ".particles.star.123.0a1b2c3d.tmp"]
    kept = [".notes.txt.abcd1234.tmp", ".checkpoint.pt.bak", "figures/.mine.png.abcd1234.tmp"]
    for name in orphans + kept:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert runs.remove_orphans(folder) == len(orphans)
    assert sorted(files_in(tmp_path)) == sorted(["checkpoint.pt", *kept])
    assert runs.remove_orphans(folder) == 0


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(fcntl is None, reason="no fcntl: run folders are not locked")
def test_run_lock_refuses_a_second_holder_with_its_pid_and_ends_with_its_process(tmp_path):
    with runs.run_lock(tmp_path / "run", create=True) as folder:
        assert folder.lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(runs.RunError, match=f"run is in use by process {os.getpid()}"):
            with runs.run_lock(folder.root):
                pass
    with runs.run_lock(folder.root):  # released at the end of the block
        pass
    with pytest.raises(runs.RunError, match="no run folder"):
        with runs.run_lock(tmp_path / "missing"):
            pass
    assert not (tmp_path / "missing").exists()

    holder = subprocess.Popen(  # another process holds it, then dies without a word
        [sys.executable, "-c", HOLD_LOCK, str(folder.lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(runs.RunError, match=f"in use by process {holder.pid} "):
            with runs.run_lock(folder.root):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert folder.lock.read_text() == f"{holder.pid}\n"  # a stale PID does not block
    with runs.run_lock(folder.root):
        pass


def test_new_run_dir_never_reuses_a_name(tmp_path):
    first = runs.new_run_dir(tmp_path, "rotated mnist/x")
    first.mkdir()
    second = runs.new_run_dir(tmp_path, "rotated mnist/x")
    assert first != second and not second.exists()
    assert "/" not in first.name and " " not in first.name


def test_open_run_folder_needs_a_config(tmp_path):
    with pytest.raises(runs.RunError, match="no run folder"):
        runs.open_run_folder(tmp_path / "missing")
    with pytest.raises(runs.RunError, match="no config.json"):
        runs.open_run_folder(tmp_path)


def test_json_is_written_atomically_with_nan_as_null(tmp_path):
    path = tmp_path / "s.json"
    runs.write_json(path, {"x": float("nan"), "t": torch.tensor([1.0, 2.0]), "n": np.float32(0.5)})
    assert json.loads(path.read_text()) == {"x": None, "t": [1.0, 2.0], "n": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left
    path.write_text("{broken")
    with pytest.raises(runs.RunError, match="not readable JSON"):
        runs.read_json(path)


def test_metrics_csv_round_trips_without_timings(tmp_path):
    records = [
        {"epoch": 1, "split": "train", "elbo": -10.5, "reconstruction": -8.0, "kl": 2.5, "seconds": 3},
        {
            "epoch": 1,
            "split": "test",
            "elbo": -11.0,
            "reconstruction": -9.0,
            "kl": 2.0,
            "theta_circ_corr": 0.5,
        },
    ]
    path = tmp_path / "metrics.csv"
    runs.write_metrics(path, records)
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,split,elbo,reconstruction,kl,theta_circ_corr"
    rows = runs.read_metrics(path)
    assert rows[0] == {
        "epoch": 1,
        "split": "train",
        "elbo": -10.5,
        "reconstruction": -8.0,
        "kl": 2.5,
        "theta_circ_corr": None,
    }
    assert rows[1]["theta_circ_corr"] == 0.5


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def test_file_data_spec_records_the_file_and_splits_reproducibly(tmp_path):
    images = np.random.default_rng(0).random((30, 6, 6), dtype=np.float32)
    np.save(tmp_path / "x.npy", images)
    spec = runs.data_spec(str(tmp_path / "x.npy"), test_size=0.2, train_size=10)
    assert spec["file"]["path"] == str((tmp_path / "x.npy").resolve())
    assert len(spec["file"]["sha256"]) == 64
    train, test = runs.load_data(json.loads(json.dumps(spec)))
    again_train, again_test = runs.load_data(spec)
    assert (len(train), len(test)) == (10, 6)
    assert torch.equal(test.images, again_test.images) and torch.equal(train.images, again_train.images)
    rows = {tuple(row.flatten().tolist()) for row in torch.cat([train.images, test.images])}
    assert len(rows) == 16  # no image in both splits
    spec = runs.data_spec(str(tmp_path / "x.npy"), test_data=str(tmp_path / "x.npy"))
    train, test = runs.load_data(spec)
    assert len(train) == len(test) == 30


def test_builtin_data_spec_passes_its_split_through():
    spec = runs.data_spec("rotated_mnist", test_size=100, train_size=50)
    assert spec["builtin"] == "rotated_mnist"
    train, test = runs.load_data(spec)
    assert (len(train), len(test)) == (50, 100) and test.theta is not None
    with pytest.raises(ValueError, match="files only"):
        runs.data_spec("rotated_mnist", labels="labels.npy")


@pytest.mark.parametrize(
    ("count", "kwargs", "message"),
    [
        (1, {}, "need at least 3"),
        (2, {}, "need at least 3"),
        (5, {"test_size": 1}, "needs at least 2 test images"),
        (20, {"test_size": 0.05}, "needs at least 2 test images"),
        (5, {"test_size": 5}, "leaves no training images"),
    ],
)
def test_splits_that_cannot_work_are_refused(tmp_path, count, kwargs, message):
    np.save(tmp_path / "x.npy", np.zeros((count, 4, 4), np.float32))
    with pytest.raises(DataError, match=message):
        runs.load_data(runs.data_spec(str(tmp_path / "x.npy"), **kwargs))


def test_check_images_wants_square_matching_images_in_range():
    square = ImageDataset(torch.rand(3, 1, 5, 5), name="a")
    with pytest.raises(DataError, match="must be square, found 5x6"):
        runs.check_images(ImageDataset(torch.rand(3, 5, 6)), None, "bernoulli")
    with pytest.raises(DataError, match="test images are 1x4x4"):
        runs.check_images(square, ImageDataset(torch.rand(2, 4, 4)), "bernoulli")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        runs.check_images(ImageDataset(torch.rand(3, 5, 5) * 2), None, "bernoulli")
    runs.check_images(ImageDataset(torch.rand(3, 5, 5) * 2), None, "gaussian")


# --------------------------------------------------------------------------------------------------
# config, checkpoint, rebuild
# --------------------------------------------------------------------------------------------------
def test_config_rebuilds_the_same_networks():
    model, guide = tiny_model(rotate=False, likelihood="gaussian", activation="relu")
    config = json.loads(json.dumps(runs.make_config(model, guide, data={}, training={})))
    rebuilt, rebuilt_guide = runs.build_model(config)
    assert rebuilt.config == model.config and rebuilt_guide.config == guide.config
    rebuilt.load_state_dict(model.state_dict())
    rebuilt_guide.load_state_dict(guide.state_dict())
    z = torch.randn(3, 2)
    assert torch.allclose(
        rebuilt.decode(z, None, torch.zeros(3, 2)), model.decode(z, None, torch.zeros(3, 2))
    )
    with pytest.raises(runs.RunError, match="does not describe a model this version can build"):
        runs.build_model({**config, "model": {**config["model"], "colour": "red"}})


def test_checkpoint_config_mismatch_names_the_difference(tmp_path):
    model, guide = tiny_model()
    config = runs.make_config(model, guide, data={}, training={})
    state = {"run_config": runs.model_config(model, guide)}
    runs.check_checkpoint_config(state, config, tmp_path / "checkpoint.pt")
    other = json.loads(json.dumps(config))
    other["model"]["z_dim"] = 5
    with pytest.raises(CheckpointError, match="model.z_dim: checkpoint 2, config 5"):
        runs.check_checkpoint_config(state, other, tmp_path / "checkpoint.pt")


def test_load_trained_restores_the_fitted_networks(tmp_path, posed):
    train, test = posed
    model, guide = tiny_model()
    folder = runs.prepare_run_folder(tmp_path / "run")
    runs.write_json(folder.config, runs.make_config(model, guide, data={}, training={}))
    fit(
        model,
        guide,
        train,
        epochs=1,
        batch_size=30,
        progress=False,
        checkpoint=folder.checkpoint,
        device="cpu",
        extra_state={"run_config": runs.model_config(model, guide)},
    )
    _, config, loaded_model, loaded_guide, state = runs.load_trained(folder.root)
    assert state["epoch"] == 1 and config["model"]["z_dim"] == 2
    guide.eval()
    with torch.no_grad():
        expected = guide.posterior_means(test.images)
        found = loaded_guide.posterior_means(test.images)
    for site in expected:
        assert torch.allclose(expected[site], found[site])
    for version, message in [(runs.CONFIG_VERSION + 1, "newer pyro_svae"), (None, "not a pyro_svae run")]:
        runs.write_json(folder.config, {**config, "config_version": version})
        with pytest.raises(runs.RunError, match=message):
            runs.load_trained(folder.root)
    runs.write_json(folder.config, config)
    folder.checkpoint.unlink()
    with pytest.raises(runs.RunError, match="no checkpoint.pt"):
        runs.load_trained(folder.root)


# --------------------------------------------------------------------------------------------------
# posterior, report, figures
# --------------------------------------------------------------------------------------------------
def test_posterior_is_saved_as_inference_data_with_named_dimensions(tmp_path, posed):
    _, test = posed
    model, guide = tiny_model()
    torch.manual_seed(0)
    samples = runs.sample_posterior(guide, test, draws=7, batch_size=8)
    assert samples["z"].shape == (7, 20, 2)
    assert samples["theta"].shape == (7, 20) and samples["dx"].shape == (7, 20, 2)
    data = runs.posterior_inference_data(samples, test, attrs={"run": "x"})
    runs.write_posterior(tmp_path / "posterior.nc", data)
    loaded = runs.load_posterior(tmp_path / "posterior.nc")
    posterior = loaded.posterior
    assert posterior["z"].dims == ("chain", "draw", "image", "z_dim")
    assert posterior["theta"].dims == ("chain", "draw", "image")
    assert posterior["dx"].dims == ("chain", "draw", "image", "xy")
    assert list(posterior["xy"].values) == ["x", "y"]
    assert np.allclose(posterior["z"].values[0], samples["z"])
    truth = loaded.constant_data
    assert np.allclose(truth["theta_true"].values, test.theta.numpy())
    assert truth["dx_true"].dims == ("image", "xy") and "label" in truth
    assert posterior.attrs["run"] == "x" and "radians" in posterior.attrs["theta_units"]


def test_final_report_and_figures_with_ground_truth(tmp_path, posed):
    train, test = posed
    model, guide = tiny_model()
    report, means = runs.final_report(model, guide, test, train=train, num_particles=3)
    for key in (
        "elbo",
        "iw_elbo",
        "reconstruction",
        "kl",
        "theta_circ_corr",
        "theta_median_error_deg",
        "dx_corr_x",
        "knn_accuracy",
        "clustering_accuracy",
    ):
        assert key in report, key
    assert report["num_particles"] == 3 and report["num_images"] == 20
    records = [{"epoch": 1, "split": "train", "elbo": -1.0, "reconstruction": -1.0, "kl": 0.0}]
    paths = runs.write_figures(
        tmp_path / "figures", model=model, test=test, means=means, records=records, report=report
    )
    assert sorted(p.name for p in paths) == [
        "manifold.png",
        "reconstructions.png",
        "theta.png",
        "training_curves.png",
    ]
    for path in paths:
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 300_000


def test_figures_decode_at_the_inferred_scale_and_as_observed_through_the_psf(tmp_path, posed, monkeypatch):
    _, test = posed
    model = SpatialVAE(test.image_shape, 2, hidden_dim=8, scale=True, psf_fwhm=2.0, likelihood="gaussian")
    guide = AmortizedGuide(model, hidden_dim=8)
    means = {site: value.detach() for site, value in guide.posterior_means(test.images).items()}
    calls = []
    decode = model.decode

    def recording_decode(z, theta=None, dx=None, scale=None, **kwargs):
        calls.append((scale, kwargs.get("blur", False)))
        return decode(z, theta, dx, scale, **kwargs)

    monkeypatch.setattr(model, "decode", recording_decode)
    runs.write_figures(tmp_path, model=model, test=test, means=means, num_reconstructions=4)
    manifold_scale, _ = calls[0]  # the content grid at the typical inferred scale, before the PSF
    assert torch.allclose(manifold_scale, means["scale"].median().expand_as(manifold_scale))
    pick = torch.linspace(0, len(test) - 1, 4).round().long()
    for scale, blur in calls[1:]:  # reconstructions and the same content upright: each image's scale
        assert torch.equal(scale, means["scale"][pick]) and blur


def test_environment_names_device_and_versions():
    info = runs.environment("cpu")
    assert info["device"] == "cpu" and {"torch", "pyro", "pyro_svae"} <= set(info["versions"])


# --------------------------------------------------------------------------------------------------
# particles, folders, pose-search guides, posterior summaries
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def particle_files(tmp_path_factory):
    from pyro_svae.data import simulate_particles, write_particles

    folder = tmp_path_factory.mktemp("particles")
    data = simulate_particles(30, box=16, seed=1)
    write_particles(folder / "p.star", data)
    return folder / "p.star"


def test_particle_spec_rebuilds_the_same_preprocessed_split(particle_files):
    spec = runs.particle_spec(particle_files, box=12, invert=True, test_size=0.2, seed=4)
    assert runs.is_particle_spec(spec) and not runs.is_particle_spec({"builtin": "rotated_mnist"})
    assert runs.is_particle_spec({"builtin": "simulated_particles"})
    spec = json.loads(json.dumps(spec))
    assert spec["particles"]["file"]["path"] == str(particle_files.resolve())
    train, test = runs.load_data(spec)
    again_train, again_test = runs.load_data(spec)
    assert (len(train), len(test)) == (24, 6) and train.image_shape == (1, 12, 12)
    assert torch.equal(train.images, again_train.images) and torch.equal(test.images, again_test.images)
    assert train.ctf is not None and float(train.ctf.pixel_size[0]) == pytest.approx(2.2 * 16 / 12)
    full = runs.load_dataset(spec)
    assert len(full) == 30 and sorted(torch.cat([train.source_index, test.source_index]).tolist()) == list(
        range(30)
    )
    no_ctf = runs.load_dataset(runs.particle_spec(particle_files, use_ctf=False))
    assert no_ctf.ctf is None and no_ctf.image_shape == (1, 16, 16)
    with pytest.raises(DataError, match="unknown particle file format"):
        runs.particle_spec("images.tif")
    with pytest.raises(ValueError, match="carries its own CTF"):
        runs.particle_spec(particle_files, ctf=particle_files)


def test_folder_spec_records_a_digest_and_warns_when_the_folder_changes(tmp_path):
    folder = tmp_path / "cutouts"
    folder.mkdir()
    for i in range(6):
        np.save(folder / f"{i}.npy", np.full((5, 5), i / 10, np.float32))
    spec = runs.data_spec(str(folder), test_size=2)
    assert spec["file"]["folder"] and len(spec["file"]["sha256"]) == 64
    train, test = runs.load_data(spec)
    assert (len(train), len(test)) == (4, 2) and train.image_shape == (1, 5, 5)
    np.save(folder / "0.npy", np.ones((5, 5), np.float32))
    with pytest.warns(UserWarning, match="changed since the run was configured"):
        runs.load_data(spec)
    with pytest.raises(ValueError, match="folder of images, which has no labels"):
        runs.data_spec(str(folder), labels=str(folder / "0.npy"))


def test_config_rebuilds_a_pose_search_guide_and_reads_configs_without_a_guide_kind():
    from pyro_svae.pose_search import PoseSearchGuide

    model = SpatialVAE((1, 12, 12), 2, hidden_dim=8, rotation_bins=4)
    guide = PoseSearchGuide(model, "equivariant", channels=4)
    config = json.loads(json.dumps(runs.make_config(model, guide, data={}, training={})))
    assert config["guide"]["kind"] == "pose_search"
    rebuilt_model, rebuilt = runs.build_model(config)
    assert isinstance(rebuilt, PoseSearchGuide) and rebuilt.config == guide.config
    rebuilt.load_state_dict(guide.state_dict())
    images = torch.rand(3, 1, 12, 12)
    assert torch.allclose(rebuilt.raw_params(images)["bin_logits"], guide.raw_params(images)["bin_logits"])
    legacy = runs.make_config(*tiny_model(), data={}, training={})
    del legacy["guide"]["kind"]
    assert isinstance(runs.build_model(legacy)[1], AmortizedGuide)
    with pytest.raises(runs.RunError, match="guide kind"):
        runs.build_model({**config, "guide": {**config["guide"], "kind": "magic"}})


class FixedThetaGuide(torch.nn.Module):
    """A guide whose q(theta) is a given distribution per image (built from the image count)."""

    def __init__(self, make_q) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a device for the summaries
        self.make_q = make_q

    def posterior_means(self, images):
        return {"theta": self.make_q(len(images)).mean}

    def distributions(self, images):
        return {"theta": self.make_q(len(images))}


def test_posterior_summaries_are_analytic_for_normal_families_and_sampled_otherwise(posed):
    from pyro_svae.pose_search import PoseSearchGuide

    _, test = posed
    model, guide = tiny_model()
    summary = runs.posterior_summaries(guide, test, draws=4)
    q = guide.distributions(test.images)
    # a Normal of scale s < pi has circular std s: sqrt(-2 ln R) with R = exp(-s^2 / 2)
    assert torch.allclose(summary["theta_std"], q["theta"].stddev, atol=1e-6)
    assert torch.allclose(summary["theta_resultant"], torch.exp(-0.5 * q["theta"].stddev ** 2), atol=1e-6)
    assert torch.allclose(summary["dx_std"], q["dx"].stddev, atol=1e-6)
    assert summary["z_mean"].shape == (20, 2) and summary["z_std"].shape == (20, 2)
    theta = guide.posterior_means(test.images)["theta"]
    assert torch.allclose(summary["theta_mean"], torch.atan2(theta.sin(), theta.cos()), atol=1e-6)

    canonical = AmortizedGuide(model, hidden_dim=16, canonicalize="moments")  # q(theta) turned back
    summary = runs.posterior_summaries(canonical, test, draws=2)
    scale = canonical.distributions(test.images)["theta"].base_dist.scale
    assert torch.allclose(summary["theta_std"], scale, atol=1e-6)

    binned = SpatialVAE((1, 14, 14), 2, hidden_dim=8, rotation_bins=4)
    search = PoseSearchGuide(binned, "equivariant", channels=4)
    summary = runs.posterior_summaries(search, test, draws=8)
    assert summary["theta_std"].shape == (20,) and torch.all(torch.isfinite(summary["theta_std"]))
    torch.manual_seed(0)
    with torch.no_grad():
        mixture = search.distributions(test.images)["theta"].sample((20000,))
    sampled = torch.polar(torch.ones_like(mixture), mixture).mean(0).abs()  # the mixture's R, by sampling
    assert torch.allclose(summary["theta_resultant"], sampled, atol=0.03)

    kappa = torch.linspace(1.0, 20.0, 20)
    von_mises = FixedThetaGuide(lambda n: torch.distributions.VonMises(torch.zeros(n), kappa))
    summary = runs.posterior_summaries(von_mises, test, draws=2)  # analytic: no draws needed
    resultant = torch.special.i1e(kappa.double()) / torch.special.i0e(kappa.double())  # E cos(theta)
    assert torch.allclose(summary["theta_resultant"], resultant.float(), rtol=1e-5)
    assert torch.allclose(summary["theta_std"], torch.sqrt(-2 * torch.log(resultant)).float(), rtol=1e-5)

    gamma = torch.linspace(0.05, 1.0, 20)  # a wrapped Cauchy has R = exp(-gamma): estimated from draws
    cauchy = FixedThetaGuide(lambda n: torch.distributions.Cauchy(torch.zeros(n), gamma))
    torch.manual_seed(0)
    summary = runs.posterior_summaries(cauchy, test, draws=4000)
    assert torch.allclose(summary["theta_std"], torch.sqrt(2 * gamma), rtol=0.05)


def test_theta_summaries_are_circular_for_wide_and_wound_normals(posed, tmp_path):
    from pyro_svae.data import write_posterior_star

    _, test = posed
    scale = torch.tensor([0.2, 1.0, 2.0, 3.0, 5.0, 50.0, 1e4]).repeat(3)[:20]
    loc = torch.full((20,), 3 * math.pi)  # the guide's Normal mean, wound once around the circle
    guide = FixedThetaGuide(lambda n: torch.distributions.Normal(loc[:n], scale[:n]))
    summary = runs.posterior_summaries(guide, test, draws=2)
    resultant = torch.exp(-0.5 * scale.double() ** 2)
    assert torch.allclose(summary["theta_resultant"], resultant.float())
    assert torch.all((summary["theta_resultant"] >= 0) & (summary["theta_resultant"] <= 1))
    moderate = scale < math.pi  # circular std sqrt(-2 ln R) = scale there; beyond, the whole circle
    assert torch.allclose(summary["theta_std"][moderate], scale[moderate], rtol=1e-5)
    assert torch.all(summary["theta_std"][~moderate] == torch.tensor(math.pi))
    assert torch.allclose(summary["theta_mean"], torch.full((20,), -math.pi))

    out = write_posterior_star(
        tmp_path / "p.star",
        ImageDataset(test.images, name="t"),
        theta_mean=summary["theta_mean"],
        theta_std=summary["theta_std"],
        theta_resultant=summary["theta_resultant"],
    )
    import starfile

    table = starfile.read(out)
    assert table["pyroSvaePsiStdDeg"].max() <= 180.0 and table["pyroSvaePsiStdDeg"].min() > 0
    degrees = np.rad2deg(scale[moderate].numpy())
    np.testing.assert_allclose(table["pyroSvaePsiStdDeg"][moderate.numpy()], degrees, rtol=1e-5)
    assert table["pyroSvaePsiResultant"].between(0.0, 1.0).all()
    assert table["rlnAnglePsi"].between(-180.0, 180.0, inclusive="left").all()

    torch.manual_seed(0)  # posterior.nc: theta draws of a Normal centred on 3 pi, all in [-pi, pi)
    samples = runs.sample_posterior(guide, test, draws=50)
    assert samples["theta"].max() > math.pi  # the guide's own draws are not wrapped
    nc = tmp_path / "posterior.nc"
    runs.write_posterior(nc, runs.posterior_inference_data(samples, test))
    theta = runs.load_posterior(nc).posterior["theta"].values
    assert theta.min() >= -np.float32(math.pi) and theta.max() < math.pi
    near = moderate.numpy()  # the same angles (float32 draws of scale 1e4 keep no finer digits)
    np.testing.assert_allclose(np.cos(theta[0][:, near]), np.cos(samples["theta"][:, near]), atol=1e-5)


def test_particles_star_lists_every_particle_in_input_order(particle_files, tmp_path):
    import starfile

    from pyro_svae.data import load_particles

    spec = runs.particle_spec(particle_files, test_size=5)
    full = runs.load_dataset(spec)
    model = SpatialVAE(full.image_shape, 3, hidden_dim=8, likelihood="gaussian", ctf=True)
    guide = AmortizedGuide(model, hidden_dim=8)
    shuffled = full.subset(np.random.default_rng(0).permutation(30))
    path = runs.write_particles_star(tmp_path / "out" / "particles.star", guide, shuffled, draws=3)
    table = starfile.read(path, always_dict=True)["particles"]
    given = starfile.read(particle_files, always_dict=True)["particles"]["rlnImageName"]
    assert list(table["rlnImageName"]) == list(given)  # as in the input, in the input order
    with torch.no_grad():
        means = guide.posterior_means(full.images)
    assert np.allclose(table["pyroSvaeZ3"], means["z"][:, 2].numpy(), atol=1e-5)
    assert {"pyroSvaePsiStdDeg", "pyroSvaePsiResultant", "pyroSvaeOriginXStdAngst", "pyroSvaeZStd3"} <= set(
        table.columns
    )
    again = load_particles(path, project_dir=particle_files.parent)  # read from the input's project
    assert torch.equal(again.images, load_particles(particle_files).images)


def test_final_report_correlates_z_with_continuous_factors(posed):
    train, test = posed
    model, guide = tiny_model()
    test = ImageDataset(test.images, factors={"thickness": test.theta.numpy() ** 2}, name="t")
    report, _ = runs.final_report(model, guide, test, num_particles=2)
    assert 0.0 <= report["z_spearman_thickness"] <= 1.0
