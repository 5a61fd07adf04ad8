"""``config.json``: the model, guide, data and training settings of a run, and the run rebuilt from it."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint, load_module_state
from ..configs import V1_POSE_SEARCH_ENCODERS, GuideConfig, ModelConfig, TrainConfig
from ..guides import AmortizedGuide
from ..model import SpatialVAE
from ..pose_search import PoseSearchGuide
from .folder import RunError, RunFolder, open_run_folder, read_json

CONFIG_VERSION = 2
"""2: prior and encoder registry specs (``model.z_prior``/``theta_prior``/``dx_prior``, ``guide.encoder``),
pose-search encoders by short name; version 1 (no specs, encoder class names) is migrated on reading."""

GUIDE_KINDS = {"amortized": AmortizedGuide, "pose_search": PoseSearchGuide}


def model_config(model: SpatialVAE, guide: AmortizedGuide | PoseSearchGuide) -> dict[str, Any]:
    """The part of a config that fixes the networks (and so must match a checkpoint): the ``"model"``
    (:class:`~pyro_svae.configs.ModelConfig`) and ``"guide"`` (:class:`~pyro_svae.configs.GuideConfig`,
    whose ``kind`` says which class :func:`build_model` rebuilds) sections. ``ValueError`` for a prior or
    encoder that is not from the registries (it could not be rebuilt)."""
    return {
        "model": ModelConfig.from_model(model).to_dict(),
        "guide": GuideConfig.from_guide(guide).to_dict(),
    }


def make_config(
    model: SpatialVAE,
    guide: AmortizedGuide | PoseSearchGuide,
    *,
    data: Mapping[str, Any],
    training: Mapping[str, Any] | TrainConfig,
) -> dict[str, Any]:
    """The ``config.json`` of a run: model, guide, data and training settings."""
    from .. import __version__

    if not isinstance(training, TrainConfig):
        training = TrainConfig.from_dict(training)
    return {
        "config_version": CONFIG_VERSION,
        "pyro_svae_version": __version__,
        **model_config(model, guide),
        "data": dict(data),
        "training": training.to_dict(),
    }


def migrate_sections(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with its ``"model"`` and ``"guide"`` sections in the current format: version-1 sections
    gain the prior specs (``None``: the default priors), a guide without a ``kind`` is ``"amortized"``, and
    a pose-search guide's encoder class name becomes its short name. Current sections pass unchanged."""
    config = copy.deepcopy(dict(config))
    model, guide = config.get("model"), config.get("guide")
    # runs before the lattice summed their bins with the plain TraceEnum_ELBO; later ones fitted the
    # encoder's bins at weight 1 until it became an option
    distilled = 1.0 if isinstance(model, dict) and "bin_render" in model else 0.0
    if isinstance(model, dict):
        for key in ("z_prior", "theta_prior", "dx_prior"):
            model.setdefault(key, None)
        model.setdefault("bin_render", "exact")  # runs before the lattice rendered every bin exactly
    if isinstance(guide, dict):
        guide.setdefault("kind", "amortized")
        encoder = guide.get("encoder")
        if guide["kind"] == "pose_search" and isinstance(encoder, str):
            guide["encoder"] = V1_POSE_SEARCH_ENCODERS.get(encoder, encoder)
        if guide["kind"] == "pose_search":
            guide.setdefault("distill_bins", distilled)
    return config


def migrate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A ``config.json`` of any version this one reads, in the current version's format."""
    config = dict(config)
    if config.get("config_version") == 1:
        config = migrate_sections(config)
        training = config.get("training")
        if isinstance(training, dict):
            training.setdefault("precision", "fp32")  # runs before the precision option trained in fp32
        config["config_version"] = 2
    return config


def parse_config(config: Mapping[str, Any]) -> tuple[ModelConfig, GuideConfig]:
    """The model and guide configurations of a run's config (sections of version 1 migrated)."""
    config = migrate_sections(config)
    try:
        model_section, guide_section = config["model"], config["guide"]
    except (KeyError, TypeError):
        raise RunError("config.json has no 'model' and 'guide' sections") from None
    try:
        return ModelConfig.from_dict(model_section), GuideConfig.from_dict(guide_section)
    except (ValueError, TypeError) as error:
        raise RunError(f"config.json does not describe a model this version can build ({error})") from None


def build_model(config: Mapping[str, Any]) -> tuple[SpatialVAE, AmortizedGuide | PoseSearchGuide]:
    """A fresh (untrained) model and guide from a run's config: an :class:`AmortizedGuide` (guide kind
    ``"amortized"``, the default of configs without one) or a :class:`PoseSearchGuide`
    (``"pose_search"``); priors and encoders are rebuilt from their registry specs."""
    model_cfg, guide_cfg = parse_config(config)
    try:
        model = SpatialVAE.from_config(model_cfg)
        return model, guide_cfg.build(model)
    except (ValueError, TypeError) as error:
        raise RunError(f"config.json does not describe a model this version can build ({error})") from None


def _network_sections(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model and guide sections, as the current version writes them where they parse."""
    sections = migrate_sections({"model": config.get("model"), "guide": config.get("guide")})
    try:
        model_cfg, guide_cfg = parse_config(sections)
    except RunError:
        return json.loads(json.dumps(sections))
    return {"model": model_cfg.to_dict(), "guide": guide_cfg.to_dict()}


def check_checkpoint_config(state: Mapping[str, Any], config: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`CheckpointError` when a checkpoint was written for other networks than ``config``
    (either written by an older version: both are compared in the current format)."""
    saved = state.get("run_config")
    if saved is None:
        return
    saved, wanted = _network_sections(saved), _network_sections(config)
    if saved == wanted:
        return
    differences = []
    for part in ("model", "guide"):
        a, b = saved.get(part) or {}, wanted.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                differences.append(f"{part}.{key}: checkpoint {a.get(key)!r}, config {b.get(key)!r}")
    raise CheckpointError(f"{where} does not match the run's config.json ({'; '.join(differences[:3])})")


def read_config(folder: RunFolder) -> dict[str, Any]:
    """A run's ``config.json`` in the current format (older versions migrated), refused with
    :class:`RunError` when its ``config_version`` is missing or newer than this version of pyro_svae
    reads, or when its training section does not validate."""
    config = read_json(folder.config)
    version = config.get("config_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunError(f"{folder.config}: not a pyro_svae run config (config_version is {version!r})")
    if version > CONFIG_VERSION:
        raise RunError(
            f"{folder.config} was written by a newer pyro_svae (config version {version}; this one "
            f"reads up to {CONFIG_VERSION}): upgrade pyro_svae to read it"
        )
    config = migrate_config(config)
    try:
        TrainConfig.from_dict(config.get("training") or {})
    except ValueError as error:
        raise RunError(f"{folder.config}: {error}") from None
    return config


def load_trained(
    root: str | os.PathLike, *, device: torch.device | str = "cpu"
) -> tuple[RunFolder, dict[str, Any], SpatialVAE, AmortizedGuide, dict[str, Any]]:
    """Rebuild a saved run: ``(folder, config, model, guide, checkpoint_state)``, modules on ``device``
    in eval mode. Raises :class:`RunError`/:class:`CheckpointError` with the reason when they cannot."""
    folder = open_run_folder(root)
    config = read_config(folder)
    if not folder.checkpoint.is_file():
        raise RunError(f"{folder.root} has no checkpoint.pt (did training finish an epoch?)")
    state = load_checkpoint(folder.checkpoint, map_location=device)
    check_checkpoint_config(state, config, folder.checkpoint)
    model, guide = build_model(config)
    load_module_state(model, state["model"], "model of config.json")
    load_module_state(guide, state["guide"], "guide of config.json")
    model.to(device).eval()
    guide.to(device).eval()
    return folder, config, model, guide, state
