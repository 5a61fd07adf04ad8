"""``config.json``: the model, guide, data and training settings of a run, and the run rebuilt from it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint, load_module_state
from ..guides import AmortizedGuide
from ..model import SpatialVAE
from ..pose_search import PoseSearchGuide
from .folder import RunError, RunFolder, open_run_folder, read_json

CONFIG_VERSION = 1


# --------------------------------------------------------------------------------------------------
GUIDE_KINDS = {"amortized": AmortizedGuide, "pose_search": PoseSearchGuide}
_POSE_SEARCH_ENCODERS = {"RotationEquivariantEncoder": "equivariant", "MLPEncoder": "mlp"}


def model_config(model: SpatialVAE, guide: AmortizedGuide | PoseSearchGuide) -> dict[str, Any]:
    """The part of a config that fixes the networks (and so must match a checkpoint). The guide's
    ``kind`` (``"amortized"`` or ``"pose_search"``) says which class :func:`build_model` rebuilds."""
    kind = "pose_search" if isinstance(guide, PoseSearchGuide) else "amortized"
    return json.loads(json.dumps({"model": model.config, "guide": {"kind": kind, **guide.config}}))


def make_config(
    model: SpatialVAE,
    guide: AmortizedGuide,
    *,
    data: Mapping[str, Any],
    training: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``config.json`` of a run: model, guide, data and training settings."""
    from .. import __version__

    return {
        "config_version": CONFIG_VERSION,
        "pyro_svae_version": __version__,
        **model_config(model, guide),
        "data": dict(data),
        "training": dict(training),
    }


def build_model(config: Mapping[str, Any]) -> tuple[SpatialVAE, AmortizedGuide | PoseSearchGuide]:
    """A fresh (untrained) model and guide from a run's config: an :class:`AmortizedGuide` (guide kind
    ``"amortized"``, the default of configs without one) or a :class:`PoseSearchGuide`
    (``"pose_search"``)."""
    try:
        model_kwargs = dict(config["model"])
        guide_kwargs = dict(config["guide"])
    except (KeyError, TypeError):
        raise RunError("config.json has no 'model' and 'guide' sections") from None
    kind = guide_kwargs.pop("kind", "amortized")
    if kind not in GUIDE_KINDS:
        raise RunError(f"config.json names a guide kind {kind!r}; expected one of {sorted(GUIDE_KINDS)}")
    encoder = guide_kwargs.pop("encoder", "mlp")
    if kind == "amortized" and encoder != "mlp":
        raise RunError(f"config.json names an encoder ({encoder}) that cannot be rebuilt from a config")
    if kind == "pose_search":
        if encoder not in _POSE_SEARCH_ENCODERS:
            raise RunError(f"config.json names an encoder ({encoder}) that cannot be rebuilt from a config")
        guide_kwargs["encoder"] = _POSE_SEARCH_ENCODERS[encoder]
    try:
        model = SpatialVAE(**model_kwargs)
        guide = GUIDE_KINDS[kind](model, **guide_kwargs)
    except TypeError as error:
        raise RunError(f"config.json does not describe a model this version can build ({error})") from None
    return model, guide


def check_checkpoint_config(state: Mapping[str, Any], config: Mapping[str, Any], where: Path) -> None:
    """Raise :class:`CheckpointError` when a checkpoint was written for other networks than ``config``."""
    saved = state.get("run_config")
    if saved is None:
        return
    wanted = json.loads(json.dumps({"model": config.get("model"), "guide": config.get("guide")}))
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
    """A run's ``config.json``, refused with :class:`RunError` when its ``config_version`` is missing
    or newer than this version of pyro_svae reads."""
    config = read_json(folder.config)
    version = config.get("config_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunError(f"{folder.config}: not a pyro_svae run config (config_version is {version!r})")
    if version > CONFIG_VERSION:
        raise RunError(
            f"{folder.config} was written by a newer pyro_svae (config version {version}; this one "
            f"reads up to {CONFIG_VERSION}): upgrade pyro_svae to read it"
        )
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
