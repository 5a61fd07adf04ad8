"""pyro_svae: spatial-VAE as a Pyro program.

Images are functions of their pixel coordinates; pose (rotation ``theta``, translation ``dx``) is a
transform of the coordinate grid, inferred by an amortized guide alongside the content ``z``.
"""

from . import configs, coords, data, likelihoods, metrics, priors, registry
from .configs import GuideConfig, ModelConfig, TrainConfig
from .guides import AmortizedGuide
from .infer import (
    DivergenceError,
    History,
    evaluate,
    fit,
    posterior_means,
    recovery_metrics,
)
from .model import SpatialVAE
from .runtime import retain_freed_memory

__version__ = "0.1.0"

__all__ = [
    "AmortizedGuide",
    "DivergenceError",
    "GuideConfig",
    "History",
    "ModelConfig",
    "SpatialVAE",
    "TrainConfig",
    "configs",
    "coords",
    "data",
    "evaluate",
    "fit",
    "likelihoods",
    "metrics",
    "posterior_means",
    "priors",
    "recovery_metrics",
    "registry",
    "retain_freed_memory",
]
