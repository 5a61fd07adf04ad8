"""Typed run configurations (``pyro_svae.configs``), the prior/encoder registries and config.json versions."""

from __future__ import annotations

import json
import math

import pyro.distributions as dist
import pytest
import torch

from pyro_svae import SpatialVAE, priors, registry, runs
from pyro_svae.checkpoint import CheckpointError
from pyro_svae.configs import GuideConfig, ModelConfig, TrainConfig, check_compatible
from pyro_svae.encoders import CNNEncoder
from pyro_svae.guides import AmortizedGuide
from pyro_svae.infer import fit
from pyro_svae.pose_search import PoseSearchGuide
from pyro_svae.runs.config import parse_config

# config.json as `pyro-svae train --data d.npy --epochs 1 --hidden-dim 8 --num-layers 1 --batch-size 10
# --eval-particles 2 --posterior-draws 2` wrote it before config version 2 (data path shortened)
V1_CONFIG = """{
  "config_version": 1,
  "pyro_svae_version": "0.1.0",
  "model": {
    "image_shape": [1, 8, 8], "z_dim": 2, "rotate": true, "translate": true, "vanilla": false,
    "theta_prior_std": 0.7853981633974483, "dx_prior_std": 0.1, "rotation_bins": null,
    "enumerate_bins": false, "scale": false, "scale_prior_std": 0.25, "scale_prior": null, "ctf": false,
    "psf_fwhm": null, "pixel_subsample": null, "compile": false, "coord_frequency": 1.0,
    "likelihood": "bernoulli", "hidden_dim": 8, "num_layers": 1, "activation": "tanh"
  },
  "guide": {
    "kind": "amortized", "families": {"z": "normal", "theta": "normal", "dx": "normal"},
    "hidden_dim": 8, "num_layers": 1, "activation": "tanh", "encoder": "mlp",
    "augment_rotation": false, "canonicalize": null
  },
  "data": {
    "train_size": null, "seed": 0,
    "file": {"path": "/tmp/d.npy",
             "sha256": "e9a434a0544fb3fe5bf89b19d7e33c92e0e222bec27472c209552c8bf6950c07"},
    "labels": null, "test_file": null, "test_labels": null, "test_size": null
  },
  "training": {
    "epochs": 1, "batch_size": 10, "learning_rate": 0.002, "seed": 0, "eval_particles": 2,
    "posterior_draws": 2, "precision": "bf16", "init_output_bias": false
  }
}"""
# the guide and model of the same command with `--pose-search 4 --likelihood gaussian`
V1_POSE_SEARCH_GUIDE = {
    "kind": "pose_search",
    "encoder": "RotationEquivariantEncoder",
    "mode": "enumerate",
    "hidden_dim": 8,
    "num_layers": 1,
    "activation": "tanh",
    "channels": 32,
}


def _v1_pose_search_config() -> dict:
    config = json.loads(V1_CONFIG)
    config["model"].update(rotation_bins=4, likelihood="gaussian")
    config["guide"] = dict(V1_POSE_SEARCH_GUIDE)
    return config


def _saved_run(tmp_path, config: dict, sections: dict, model, guide) -> runs.RunFolder:
    """A run folder holding ``config`` and a one-epoch checkpoint whose ``run_config`` is ``sections``."""
    folder = runs.prepare_run_folder(tmp_path / "run")
    runs.write_json(folder.config, config)
    images = torch.rand(20, 1, 8, 8)
    fit(model, guide, images, epochs=1, batch_size=10, progress=False, checkpoint=folder.checkpoint,
        device="cpu", extra_state={"run_config": sections})  # fmt: skip
    return folder


@pytest.mark.parametrize("kind", ["amortized", "pose_search"])
def test_a_version_1_run_folder_still_loads(tmp_path, kind):
    config = json.loads(V1_CONFIG) if kind == "amortized" else _v1_pose_search_config()
    model, guide = runs.build_model(config)
    assert isinstance(guide, AmortizedGuide if kind == "amortized" else PoseSearchGuide)
    old_sections = {"model": config["model"], "guide": config["guide"]}  # what version 1 checkpoints hold
    folder = _saved_run(tmp_path, config, old_sections, model, guide)
    _, loaded_config, loaded_model, loaded_guide, state = runs.load_trained(folder.root)
    assert loaded_config["config_version"] == runs.CONFIG_VERSION == 2
    assert loaded_config["model"]["theta_prior"] is None and loaded_model.config == model.config
    assert loaded_guide.config == guide.config and state["epoch"] == 1
    images = torch.rand(3, 1, 8, 8)
    guide.eval()
    with torch.no_grad():
        expected, found = guide.raw_params(images), loaded_guide.raw_params(images)
    assert all(torch.allclose(expected[key], found[key]) for key in expected)
    # the checkpoint still guards against a config that no longer matches it
    changed = json.loads(V1_CONFIG) if kind == "amortized" else _v1_pose_search_config()
    changed["model"]["z_dim"] = 3
    runs.write_json(folder.config, changed)
    with pytest.raises(CheckpointError, match="model.z_dim: checkpoint 2, config 3"):
        runs.load_trained(folder.root)


def test_migration_fills_version_2_keys_and_newer_versions_are_refused(tmp_path):
    migrated = runs.migrate_config(_v1_pose_search_config())
    assert migrated["config_version"] == 2 and migrated["guide"]["encoder"] == "equivariant"
    assert {"z_prior", "theta_prior", "dx_prior"} <= set(migrated["model"])
    assert migrated["model"]["bin_render"] == "exact"  # those runs rendered every bin
    assert migrated["guide"]["distill_bins"] == 0.0  # ... and fitted no encoder to them
    lattice_era = _v1_pose_search_config()  # a version-2 run of the lattice, before the weight was saved
    lattice_era["model"].update(bin_render="lattice", enumerate_bins=True)
    assert parse_config(lattice_era)[1].distill_bins == 1.0
    assert GuideConfig(kind="pose_search").distill_bins == 10.0
    with pytest.raises(ValueError, match="distill_bins must be a finite weight >= 0"):
        GuideConfig(kind="pose_search", distill_bins=-1.0)
    summing = ModelConfig(image_shape=(8, 8), rotation_bins=4, enumerate_bins=True)
    assert summing.bin_render == "lattice" and ModelConfig(image_shape=(8, 8)).bin_render == "exact"
    no_precision = json.loads(V1_CONFIG)
    del no_precision["training"]["precision"]
    assert runs.migrate_config(no_precision)["training"]["precision"] == "fp32"
    folder = runs.prepare_run_folder(tmp_path / "run")
    runs.write_json(folder.config, {**json.loads(V1_CONFIG), "config_version": 3})
    with pytest.raises(runs.RunError, match="newer pyro_svae"):
        runs.read_config(folder)
    runs.write_json(folder.config, {**json.loads(V1_CONFIG), "training": {"epochs": -1}})
    with pytest.raises(runs.RunError, match="epochs must be an integer >= 0"):
        runs.read_config(folder)


@registry.register_prior("test_shifted_theta")
class ShiftedTheta(torch.nn.Module):
    """A user's own theta prior: a normal at ``shift`` with a learned width."""

    def __init__(self, shift: float = 0.0, *, width: float = 1.0) -> None:
        super().__init__()
        self.shift = float(shift)
        self.log_width = torch.nn.Parameter(torch.tensor(math.log(width)))

    def forward(self):
        return dist.Normal(torch.tensor(self.shift), self.log_width.exp())


def test_a_registered_prior_of_the_users_own_rebuilds_from_a_run_folder(tmp_path):
    model = SpatialVAE((1, 8, 8), 2, hidden_dim=8, theta_prior=ShiftedTheta(0.3, width=0.5))
    guide = AmortizedGuide(model, hidden_dim=8)
    config = runs.make_config(model, guide, data={}, training={})
    spec = {"name": "test_shifted_theta", "kwargs": {"shift": 0.3, "width": 0.5}}
    assert config["model"]["theta_prior"] == spec and config["model"]["dx_prior"] is None
    folder = _saved_run(tmp_path, config, runs.model_config(model, guide), model, guide)
    _, _, loaded, _, _ = runs.load_trained(folder.root)
    assert isinstance(loaded.theta_prior, ShiftedTheta)
    assert torch.allclose(loaded.theta_prior.log_width, model.theta_prior.log_width)  # the trained state
    assert float(loaded.theta_prior().loc) == pytest.approx(0.3)


def test_registered_prior_factories_and_an_unregistered_prior():
    model = SpatialVAE(
        (8, 8), 2, hidden_dim=8, theta_prior=priors.symmetric_theta(2, 3.0), dx_prior=priors.laplace_dx(0.2)
    )
    cfg = ModelConfig.from_model(model)
    kwargs = {"n": 2, "concentration": 3.0, "loc": 0.0}
    assert cfg.theta_prior == {"name": "symmetric_theta", "kwargs": kwargs}
    rebuilt = cfg.build()
    assert isinstance(rebuilt.theta_prior(), torch.distributions.MixtureSameFamily)
    assert ModelConfig.from_model(rebuilt) == cfg and ModelConfig.from_model(cfg.build().double()) == cfg
    default = SpatialVAE((8, 8), 2, hidden_dim=8, theta_prior=priors.normal_theta(math.pi / 4))
    assert ModelConfig.from_model(default).theta_prior is None  # the default prior, given explicitly
    plain = SpatialVAE((8, 8), 2, hidden_dim=8, theta_prior=dist.Normal(torch.tensor(0.0), torch.tensor(0.3)))
    with pytest.raises(ValueError, match=r"theta prior \(Normal\) is not from the prior registry"):
        runs.model_config(plain, AmortizedGuide(plain, hidden_dim=8))
    with pytest.raises(ValueError, match="no prior registered as 'nope'"):
        ModelConfig(image_shape=(8, 8), theta_prior={"name": "nope"}).build()


def test_a_cnn_encoder_rebuilds_from_the_config():
    model = SpatialVAE((1, 8, 8), 2, hidden_dim=8)
    guide = AmortizedGuide(model, CNNEncoder(model.image_shape, channels=(4, 6), hidden_dim=12))
    config = json.loads(json.dumps(runs.make_config(model, guide, data={}, training={})))
    assert config["guide"]["encoder"] == {
        "name": "cnn",
        "kwargs": {"channels": [4, 6], "hidden_dim": 12, "activation": "relu"},
    }
    rebuilt_model, rebuilt = runs.build_model(config)
    rebuilt.load_state_dict(guide.state_dict())
    images = torch.rand(3, 1, 8, 8)
    assert torch.allclose(rebuilt.raw_params(images)["z"], guide.raw_params(images)["z"])
    v1 = {**config["guide"], "encoder": "CNNEncoder"}  # version 1 recorded the class name alone
    with pytest.raises(runs.RunError, match="'CNNEncoder' cannot be rebuilt from a config"):
        runs.build_model({**config, "guide": v1})


def test_an_equivariant_encoder_of_other_size_is_recorded_by_spec():
    model = SpatialVAE((1, 12, 12), 2, hidden_dim=8, rotation_bins=4)
    by_name = GuideConfig.from_guide(PoseSearchGuide(model, "equivariant", channels=4))
    assert by_name.encoder == "equivariant" and by_name.channels == 4
    own = registry.build_encoder({"name": "equivariant", "kwargs": {"channels": 4, "num_conv": 2}},
                                 image_shape=(1, 12, 12), bins=4)  # fmt: skip
    cfg = GuideConfig.from_guide(PoseSearchGuide(model, own))
    # the spec records every keyword, defaults filled in (copy_size: the copies' size, None = the image's)
    assert cfg.encoder == {"name": "equivariant", "kwargs": {"channels": 4, "num_conv": 2, "copy_size": None}}
    assert len(cfg.build(model).encoder.cnn) == 4  # two convolutions and their activations


def test_configs_round_trip_and_build_what_the_model_records():
    cfg = ModelConfig(image_shape=(10, 10), z_dim=3, hidden_dim=8, scale=True, scale_prior="learned_std")
    assert cfg.image_shape == (1, 10, 10) and cfg.rotate and cfg.translate
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    model = SpatialVAE.from_config(cfg)
    assert model.config.items() <= cfg.to_dict().items() and ModelConfig.from_model(model) == cfg
    vanilla = ModelConfig(image_shape=(10, 10), vanilla=True)
    assert not vanilla.rotate and not vanilla.translate
    guide = GuideConfig(hidden_dim=8, families={"theta": "von_mises"})
    built = guide.build(model)
    assert GuideConfig.from_guide(built).families["theta"] == "von_mises"
    assert GuideConfig.from_dict(GuideConfig.from_guide(built).to_dict()) == GuideConfig.from_guide(built)
    training = TrainConfig(epochs=3, learning_rate_changes=[{"after_epoch": 1, "from": 0.1, "to": 0.01}])
    assert TrainConfig.from_dict(json.loads(json.dumps(training.to_dict()))) == training
    assert "learning_rate_changes" not in TrainConfig().to_dict()
    with pytest.raises(dataclasses_frozen_error()):
        cfg.z_dim = 4


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ModelConfig(image_shape=(8, 8), z_dim=0), "z_dim must be an integer >= 1"),
        (lambda: ModelConfig(image_shape=(8,)), "image_shape must be"),
        (lambda: ModelConfig(image_shape=(8, 8), vanilla=True, rotate=True), "vanilla=True has no pose"),
        (lambda: ModelConfig(image_shape=(8, 8), vanilla=True, compile=True), "spatial decoder"),
        (lambda: ModelConfig(image_shape=(8,) * 2, rotate=False, rotation_bins=4), "model that rotates"),
        (lambda: ModelConfig(image_shape=(8, 8), enumerate_bins=True), "give rotation_bins=K"),
        (
            lambda: ModelConfig(image_shape=(8, 8), rotation_bins=4, bin_render="lattice"),
            "enumerate_bins=True",
        ),
        (lambda: ModelConfig(image_shape=(8, 8), bin_render="fft"), "bin_render must be one of"),
        (lambda: ModelConfig(image_shape=(8, 8), ctf=True), "ctf=True filters the decoder's mean image"),
        (
            lambda: ModelConfig(image_shape=(8, 8), likelihood="gaussian", psf_fwhm=2.0, pixel_subsample=4),
            "psf_fwhm mix all pixels",
        ),
        (lambda: ModelConfig(image_shape=(8, 8), pixel_subsample=65), "more than the 64 pixels"),
        (lambda: ModelConfig(image_shape=(8, 8), likelihood="poisson"), "likelihood must be one of"),
        (lambda: ModelConfig(image_shape=(8, 8), scale_prior="wide"), "scale_prior given by name"),
        (lambda: ModelConfig.from_dict({"image_shape": [8, 8], "colour": "red"}), "unknown keys"),
        (lambda: GuideConfig(kind="magic"), "guide kind 'magic'"),
        (lambda: GuideConfig(augment_rotation=True, canonicalize="moments"), "augment_rotation cannot"),
        (lambda: GuideConfig(kind="pose_search", canonicalize="moments"), "searches all rotations"),
        (lambda: GuideConfig(mode="enumerate"), "pose-search option"),
        (lambda: GuideConfig(encoder={"name": 3}), "must be a spec"),
        (lambda: TrainConfig(batch_size=0), "batch_size must be an integer >= 1"),
        (lambda: TrainConfig(precision="fp8"), "precision must be one of"),
        (lambda: TrainConfig(learning_rate=-1.0), "learning_rate must be a positive"),
    ],
)
def test_configs_validate_once_with_clear_messages(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_training_options_are_checked_against_the_model():
    ctf = ModelConfig(image_shape=(8, 8), likelihood="gaussian", ctf=True)
    with pytest.raises(ValueError, match="init_output_bias .* the CTF filters"):
        check_compatible(ctf, TrainConfig(init_output_bias=True))
    check_compatible(ctf, TrainConfig())
