"""Run folders: layout, config -> model, metrics.csv, data specs, posterior NetCDF, figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pyro_svae import AmortizedGuide, SpatialVAE, fit, runs
from pyro_svae.checkpoint import CheckpointError
from pyro_svae.coords import transform_images
from pyro_svae.data import DataError, ImageDataset, mnist_digits


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
    folder.figures.mkdir()
    (folder.figures / "x.png").write_bytes(b"png")
    (folder.root / "notes.txt").write_text("keep")
    with pytest.raises(runs.RunError, match="already holds a run .*config.json.*--overwrite"):
        runs.prepare_run_folder(folder.root)
    assert folder.config.is_file()
    runs.prepare_run_folder(folder.root, overwrite=True)
    assert not folder.config.exists() and not folder.figures.exists()
    assert (folder.root / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(runs.RunError, match="not a folder"):
        runs.prepare_run_folder(tmp_path / "file")


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
        (1, {}, "need at least 2"),
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


def test_environment_names_device_and_versions():
    info = runs.environment("cpu")
    assert info["device"] == "cpu" and {"torch", "pyro", "pyro_svae"} <= set(info["versions"])
