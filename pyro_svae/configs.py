"""Typed, frozen configurations of a run: :class:`ModelConfig`, :class:`GuideConfig`, :class:`TrainConfig`.

Each validates itself once, when made (``ValueError`` saying what was expected and what was found, also
for rules between options), converts to and from JSON-safe dicts (``to_dict`` / ``from_dict``, the
``"model"``, ``"guide"`` and ``"training"`` sections of a run's ``config.json``) and builds its objects::

    cfg = ModelConfig(image_shape=(1, 28, 28), z_dim=2, theta_prior={"name": "von_mises_theta",
                      "kwargs": {"concentration": 2.0}})
    model = cfg.build()                                   # or SpatialVAE.from_config(cfg)
    guide = GuideConfig(hidden_dim=128).build(model)
    ModelConfig.from_model(model) == cfg                  # what config.json records

Priors and encoders are named by the registries of :mod:`pyro_svae.registry` (``{"name": ...,
"kwargs": {...}}``), so a prior or encoder of the user's own, registered with
:func:`~pyro_svae.registry.register_prior` / :func:`~pyro_svae.registry.register_encoder`, is rebuilt
from a run folder too. A prior left at its default (the paper's normal priors of ``theta_prior_std``,
``dx_prior_std``; ``z ~ N(0, I)``) is recorded as ``None``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from collections.abc import Iterable, Mapping
from types import SimpleNamespace
from typing import Any, ClassVar

from . import registry
from .decoders import ACTIVATIONS
from .lattice import BIN_RENDERS, resolve_bin_render
from .likelihoods import LIKELIHOODS
from .objectives import DEFAULT_DISTILL_BINS
from .runtime import PRECISIONS

__all__ = [
    "GUIDE_KINDS",
    "GuideConfig",
    "ModelConfig",
    "TrainConfig",
    "as_image_shape",
    "check_compatible",
    "check_model_options",
]

GUIDE_KINDS = ("amortized", "pose_search")
CANONICALIZATIONS = (None, "moments")
POSE_SEARCH_MODES = ("enumerate", "sample", "marginal")
SCALE_PRIOR_NAMES = ("learned", "learned_std")
#: the encoders a guide builds itself, by short name; any other is a registry spec
_GUIDE_ENCODERS = {"amortized": ("mlp",), "pose_search": ("equivariant", "mlp")}
#: class names that version-1 configs of pose-search guides record for their encoders
V1_POSE_SEARCH_ENCODERS = {"RotationEquivariantEncoder": "equivariant", "MLPEncoder": "mlp"}


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def _int(value: Any, name: str, *, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive(
    value: Any, name: str, *, optional: bool = False, expected: str = "a positive finite number"
) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _choice(value: Any, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}")


def _fields_from(cls, data: Mapping[str, Any], section: str) -> dict[str, Any]:
    """``data`` checked for keys ``cls`` does not have."""
    if not isinstance(data, Mapping):
        raise ValueError(f"the {section} section must be a mapping, got {type(data).__name__}")
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"the {section} section has unknown keys {unknown} (known: {sorted(names)})")
    return dict(data)


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The options of :class:`~pyro_svae.model.SpatialVAE` (its ``config`` keys) and its priors by
    registry spec. ``rotate`` / ``translate`` default to ``not vanilla``."""

    image_shape: tuple[int, int, int]
    z_dim: int = 2
    rotate: bool | None = None
    translate: bool | None = None
    vanilla: bool = False
    theta_prior_std: float = math.pi / 4
    dx_prior_std: float = 0.1
    rotation_bins: int | None = None
    enumerate_bins: bool = False
    bin_render: str | None = None
    scale: bool = False
    scale_prior_std: float = 0.25
    scale_prior: str | dict[str, Any] | None = None
    ctf: bool = False
    psf_fwhm: float | None = None
    pixel_subsample: int | None = None
    compile: bool = False
    coord_frequency: float = 1.0
    likelihood: str = "bernoulli"
    hidden_dim: int = 500
    num_layers: int = 2
    activation: str = "tanh"
    z_prior: dict[str, Any] | None = None
    theta_prior: dict[str, Any] | None = None
    dx_prior: dict[str, Any] | None = None

    _PRIOR_SITES: ClassVar[tuple[str, ...]] = ("z_prior", "theta_prior", "dx_prior")

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        set_("image_shape", as_image_shape(self.image_shape))
        for name in ("rotate", "translate"):
            value = getattr(self, name)
            set_(name, (not self.vanilla) if value is None else value)
        set_("bin_render", resolve_bin_render(self.bin_render, self.enumerate_bins))
        for name in self._PRIOR_SITES:
            spec = getattr(self, name)
            set_(name, None if spec is None else registry.check_spec(spec, name))
        if isinstance(self.scale_prior, Mapping):
            set_("scale_prior", registry.check_spec(self.scale_prior, "scale_prior"))
        if self.scale_prior is not None and not self.scale:  # a prior of the scale site turns it on
            set_("scale", True)
        check_model_options(self)

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe ``"model"`` section of ``config.json``."""
        out = dataclasses.asdict(self)
        out["image_shape"] = list(self.image_shape)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls(**_fields_from(cls, data, "model"))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~pyro_svae.model.SpatialVAE` (priors made from their specs)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in self._PRIOR_SITES:
            kwargs[name] = None if kwargs[name] is None else registry.build_prior(kwargs[name])
        if isinstance(self.scale_prior, dict):
            kwargs["scale_prior"] = registry.build_prior(self.scale_prior)
        return kwargs

    def build(self, *, name: str | None = None):
        """A new (untrained) :class:`~pyro_svae.model.SpatialVAE` of this configuration."""
        from .model import SpatialVAE

        return SpatialVAE(**self.model_kwargs(), name=name)

    @classmethod
    def from_model(cls, model) -> ModelConfig:
        """What rebuilds ``model``: its ``config`` and the registry specs of priors not at their default.
        ``ValueError`` for a prior that is neither the default nor registered (it could not be rebuilt)."""
        data = dict(model.config)
        defaults = {
            "z_prior": ("standard_normal_z", {"z_dim": data["z_dim"]}),
            "theta_prior": ("normal_theta", {"std": data["theta_prior_std"]}),
            "dx_prior": ("normal_dx", {"std": data["dx_prior_std"]}),
        }
        for key, default in defaults.items():
            module = getattr(model, key, None)
            data[key] = None if module is None else _prior_spec(module, key, default)
        scale_module = getattr(model, "scale_prior", None) if data.get("scale") else None
        if scale_module is not None and data.get("scale_prior") is None:
            default = ("log_normal_scale", {"std": data["scale_prior_std"]})
            data["scale_prior"] = _prior_spec(scale_module, "scale_prior", default)
        return cls.from_dict(data)


def _prior_spec(module, key: str, default: tuple[str, dict[str, Any]]) -> dict[str, Any] | None:
    spec = registry.spec_of(module)
    if spec is None:
        inner = getattr(module, "distribution", module)
        raise ValueError(
            f"the model's {key.replace('_', ' ')} ({type(inner).__name__}) is not from the prior registry, "
            "so a run folder could not rebuild it: make it with a registered factory "
            f"(pyro_svae.registry.prior_names(): {', '.join(registry.prior_names())}) or register its "
            "class with @pyro_svae.registry.register_prior(name)"
        )
    name, kwargs = default
    if spec["name"] == name and _same_numbers(spec["kwargs"], kwargs):
        return None
    return spec


def _same_numbers(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isclose(a[k], b[k], rel_tol=1e-12)) for k in a
    )


def as_image_shape(image_shape: Any) -> tuple[int, int, int]:
    """``(H, W)`` or ``(C, H, W)`` of positive integer sizes as ``(C, H, W)``."""
    iterable = isinstance(image_shape, Iterable) and not isinstance(image_shape, str | bytes)
    shape = tuple(image_shape) if iterable else ()
    if len(shape) == 2:
        shape = (1, *shape)
    try:
        if len(shape) != 3 or any(isinstance(s, bool) or operator.index(s) < 1 for s in shape):
            raise TypeError
    except TypeError:
        raise ValueError(
            f"image_shape must be (H, W) or (C, H, W) of positive sizes, got {image_shape!r}"
        ) from None
    return tuple(operator.index(s) for s in shape)


def check_model_options(options: Any, *, objects: bool = False) -> None:
    """The rules of a model's options, each here once: the value of each option and the rules between
    options. :class:`ModelConfig` checks itself with it and :class:`~pyro_svae.model.SpatialVAE` its
    arguments, so both refuse the same options with the same ``ValueError`` (the CLI reports them by flag).

    ``options``: the :class:`ModelConfig` fields by name (a mapping, or an object with them as attributes)
    with the defaults resolved: ``image_shape`` ``(C, H, W)``, ``rotate`` and ``translate`` True or False,
    ``scale`` True where a ``scale_prior`` is given. A prior counts by being given (not ``None``).
    ``objects``: the options of ``SpatialVAE``, whose ``likelihood`` may be a likelihood module and whose
    priors may be distributions or modules."""
    o = SimpleNamespace(**options) if isinstance(options, Mapping) else options
    _check_model_values(o, objects=objects)
    _check_model_rules(o)


def _check_model_values(o: Any, *, objects: bool) -> None:
    _int(o.z_dim, "z_dim")
    _positive(o.theta_prior_std, "theta_prior_std")
    _positive(o.dx_prior_std, "dx_prior_std")
    _positive(o.scale_prior_std, "scale_prior_std")
    _positive(o.coord_frequency, "coord_frequency", expected="positive and finite (about 1 / object size)")
    _positive(o.psf_fwhm, "psf_fwhm", optional=True, expected="a positive width in pixels")
    _int(o.rotation_bins, "rotation_bins", minimum=2, optional=True)
    _int(o.pixel_subsample, "pixel_subsample", optional=True)
    _int(o.hidden_dim, "hidden_dim")
    _int(o.num_layers, "num_layers")
    for name in ("vanilla", "rotate", "translate", "enumerate_bins", "scale", "ctf", "compile"):
        _bool(getattr(o, name), name)
    if isinstance(o.likelihood, str) or not objects:
        _choice(o.likelihood, "likelihood", LIKELIHOODS)
    _choice(o.activation, "activation", ACTIVATIONS)
    _choice(o.bin_render, "bin_render", BIN_RENDERS)
    if isinstance(o.scale_prior, str):
        _choice(o.scale_prior, "scale_prior given by name", SCALE_PRIOR_NAMES)


def _check_model_rules(o: Any) -> None:
    """The rules between options."""
    if o.vanilla:
        switched = [n for n in ("rotate", "translate") if getattr(o, n)]
        pose = [n for n in ("theta_prior", "dx_prior", "rotation_bins") if getattr(o, n) is not None]
        pose += ["scale"] if o.scale else []
        spatial = [n for n in ("compile", "pixel_subsample") if getattr(o, n)]
        spatial += ["coord_frequency"] if o.coord_frequency != 1.0 else []
        if switched:
            raise ValueError(
                f"vanilla=True has no pose sites: do not combine it with {' and '.join(switched)}"
            )
        if pose:
            raise ValueError(f"vanilla=True has no pose sites, so {' and '.join(pose)} cannot apply")
        if spatial:
            verb = "applies" if len(spatial) == 1 else "apply"
            raise ValueError(f"{' and '.join(spatial)} {verb} to the spatial decoder, not to the vanilla one")
    if o.rotation_bins is not None and not o.rotate:
        raise ValueError("rotation_bins searches rotations: it needs a model that rotates")
    if o.enumerate_bins and o.rotation_bins is None:
        raise ValueError("enumerate_bins=True sums over rotation bins: give rotation_bins=K as well")
    if o.bin_render != "exact" and not o.enumerate_bins:
        raise ValueError(
            f"bin_render={o.bin_render!r} poses one render at every rotation bin of a model that sums its "
            "bins out: it needs enumerate_bins=True"
        )
    if o.pixel_subsample is not None:
        _check_pixel_subsample(o)
    likelihood = LIKELIHOODS[o.likelihood] if isinstance(o.likelihood, str) else o.likelihood
    likelihood_name = o.likelihood if isinstance(o.likelihood, str) else type(o.likelihood).__name__
    filters = (
        ("ctf=True", o.ctf, "CTF-filtered particles"),
        ("psf_fwhm", o.psf_fwhm, "PSF-blurred images"),
    )
    for option, chosen, filtered in filters:
        if chosen and not getattr(likelihood, "linear_mean", False):
            raise ValueError(
                f"{option} filters the decoder's mean image, which needs a Gaussian likelihood "
                f"({', '.join(gaussian_likelihoods())}): the {likelihood_name} likelihood cannot score "
                f"{filtered}"
            )


def _check_pixel_subsample(o: Any) -> None:
    mixing = [name for name, on in (("ctf", o.ctf), ("psf_fwhm", o.psf_fwhm is not None)) if on]
    if mixing:
        raise ValueError(
            f"pixel_subsample renders pixels independently, but {' and '.join(mixing)} mix all pixels "
            "of an image: give one of them"
        )
    if o.rotation_bins is not None:
        raise ValueError(
            "rotation_bins enumerates rotation bins, which cannot nest the pixels plate of "
            "pixel_subsample: give one of them"
        )
    _, height, width = o.image_shape
    if o.pixel_subsample > height * width:
        raise ValueError(
            f"pixel_subsample {o.pixel_subsample} is more than the {height * width} pixels of a "
            f"{height}x{width} image"
        )


def gaussian_likelihoods() -> list[str]:
    """The likelihoods that score a filtered (CTF, PSF) mean image."""
    return [name for name, cls in LIKELIHOODS.items() if getattr(cls, "linear_mean", False)]


# --------------------------------------------------------------------------------------------------
# guide
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class GuideConfig:
    """An :class:`~pyro_svae.guides.AmortizedGuide` (``kind="amortized"``) or a
    :class:`~pyro_svae.pose_search.PoseSearchGuide` (``"pose_search"``).

    ``encoder``: a network the guide builds itself by short name (``"mlp"`` of ``hidden_dim`` x
    ``num_layers``; for pose search also ``"equivariant"`` of ``channels``), or an encoder registry spec
    ``{"name": "cnn", "kwargs": {...}}``. ``families`` (amortized) maps sites to family names;
    ``augment_rotation`` and ``canonicalize`` are amortized options, ``mode``, ``channels`` and
    ``copy_size`` (the equivariant encoder's copies at most this many pixels on a side) and
    ``distill_bins`` (in marginal mode, the weight of the encoder's fit to the search's bins) pose-search
    ones (``mode=None``: the one that fits the model)."""

    kind: str = "amortized"
    encoder: str | dict[str, Any] | None = None
    families: dict[str, str] | None = None
    hidden_dim: int = 500
    num_layers: int = 2
    activation: str = "tanh"
    augment_rotation: bool = False
    canonicalize: str | None = None
    mode: str | None = None
    channels: int = 32
    copy_size: int | None = None
    distill_bins: float = DEFAULT_DISTILL_BINS

    _KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "amortized": (
            "families",
            "hidden_dim",
            "num_layers",
            "activation",
            "encoder",
            "augment_rotation",
            "canonicalize",
        ),
        "pose_search": (
            "encoder",
            "mode",
            "hidden_dim",
            "num_layers",
            "activation",
            "channels",
            "copy_size",
            "distill_bins",
        ),
    }

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide kind {self.kind!r} is not one of {list(GUIDE_KINDS)}")
        own = _GUIDE_ENCODERS[self.kind]
        if self.encoder is None:
            object.__setattr__(self, "encoder", own[0])
        elif isinstance(self.encoder, Mapping):
            object.__setattr__(self, "encoder", registry.check_spec(self.encoder, "encoder"))
        elif self.encoder not in own:
            raise ValueError(
                f"a {self.kind} guide builds the encoder {' or '.join(map(repr, own))} by name; "
                f"{self.encoder!r} cannot be rebuilt from a config: give a registry spec "
                "{'name': ..., 'kwargs': {...}} (pyro_svae.registry.encoder_names())"
            )
        if self.families is not None:
            if not isinstance(self.families, Mapping) or not all(
                isinstance(v, str) for v in self.families.values()
            ):
                raise ValueError(f"families must map site names to family names, got {self.families!r}")
            object.__setattr__(self, "families", dict(self.families))
        _int(self.hidden_dim, "hidden_dim")
        _int(self.num_layers, "num_layers")
        _int(self.channels, "channels")
        _int(self.copy_size, "copy_size", minimum=4, optional=True)
        if self.distill_bins != 0:
            _positive(self.distill_bins, "distill_bins", expected="a finite weight >= 0")
        _choice(self.activation, "activation", ACTIVATIONS)
        _bool(self.augment_rotation, "augment_rotation")
        _choice(self.canonicalize, "canonicalize", CANONICALIZATIONS)
        self._check_rules()

    def _check_rules(self) -> None:
        if self.kind == "pose_search":
            given = [n for n in ("families", "canonicalize") if getattr(self, n) is not None]
            given += ["augment_rotation"] if self.augment_rotation else []
            if given:
                raise ValueError(
                    f"a pose-search guide searches all rotations itself, so {' and '.join(given)} "
                    "cannot apply"
                )
            if self.mode is not None:
                _choice(self.mode, "mode", POSE_SEARCH_MODES)
        elif self.mode is not None:
            raise ValueError("mode is a pose-search option (kind='pose_search')")
        if self.canonicalize is not None and self.augment_rotation:
            raise ValueError("canonicalize turns every image upright, so augment_rotation cannot apply")

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe ``"guide"`` section of ``config.json`` (the options of its kind)."""
        out: dict[str, Any] = {"kind": self.kind}
        for key in self._KEYS[self.kind]:
            value = getattr(self, key)
            out[key] = ({} if value is None else dict(value)) if key == "families" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GuideConfig:
        fields = _fields_from(cls, data, "guide")
        if fields.get("kind", "amortized") == "amortized" and fields.get("families") == {}:
            fields["families"] = None
        return cls(**fields)

    def _encoder_module(self, model):
        if isinstance(self.encoder, str):
            return None if self.kind == "amortized" else self.encoder
        return registry.build_encoder(self.encoder, image_shape=model.image_shape, bins=model.rotation_bins)

    def build(self, model, *, name: str | None = None):
        """A new (untrained) guide of this configuration for ``model``."""
        encoder = self._encoder_module(model)
        common = {"hidden_dim": self.hidden_dim, "num_layers": self.num_layers, "activation": self.activation}
        if self.kind == "pose_search":
            from .pose_search import PoseSearchGuide

            return PoseSearchGuide(
                model,
                encoder,
                mode=self.mode,
                channels=self.channels,
                copy_size=self.copy_size,
                distill_bins=self.distill_bins,
                name=name,
                **common,
            )
        from .guides import AmortizedGuide

        return AmortizedGuide(
            model,
            encoder,
            families=self.families,
            augment_rotation=self.augment_rotation,
            canonicalize=self.canonicalize,
            name=name,
            **common,
        )

    @classmethod
    def from_guide(cls, guide) -> GuideConfig:
        """What rebuilds ``guide``; ``ValueError`` for an encoder module that is not from the registry."""
        from .pose_search import PoseSearchGuide

        kind = "pose_search" if isinstance(guide, PoseSearchGuide) else "amortized"
        data = {"kind": kind, **guide.config}
        if kind == "amortized" and data["encoder"] != "mlp" or kind == "pose_search":
            data["encoder"] = _encoder_spec(guide.encoder, data)
        return cls.from_dict(data)


def _encoder_spec(encoder, config: Mapping[str, Any]) -> str | dict[str, Any]:
    """The short name of an encoder a pose-search guide builds itself, else the module's registry spec."""
    registry.encoder_names()  # the built-in encoders registered
    spec = registry.spec_of(encoder)
    built_by_name = {
        "equivariant": {"channels": config.get("channels"), "copy_size": config.get("copy_size")},
        "mlp": {k: config.get(k) for k in ("hidden_dim", "num_layers", "activation")},
    }
    if spec is None:
        short = V1_POSE_SEARCH_ENCODERS.get(config.get("encoder"))
        if "mode" in config and short is not None:  # a pose-search guide made before the registry knew it
            return short
        raise ValueError(
            f"the guide's encoder ({type(encoder).__name__}) is not from the encoder registry, so a run "
            "folder could not rebuild it: register its class with @pyro_svae.registry.register_encoder(name)"
        )
    if "mode" in config and spec["name"] in built_by_name:
        wanted = {**_encoder_defaults(spec["name"]), **built_by_name[spec["name"]]}
        if spec["kwargs"] == wanted:
            return spec["name"]
    return spec


def _encoder_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of a registered encoder class."""
    cls, needs = registry.encoder_entry(name)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1 + len(needs) :]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The ``"training"`` section: optimization, seed, precision and the final evaluation's sizes.
    ``learning_rate_changes`` records a resumed run's changes of rate (``after_epoch``, ``from``, ``to``)."""

    epochs: int = 20
    batch_size: int = 25
    learning_rate: float = 2e-3
    seed: int = 0
    eval_particles: int = 16
    posterior_draws: int = 100
    precision: str = "auto"
    init_output_bias: bool = False
    learning_rate_changes: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _int(self.epochs, "epochs", minimum=0)
        _int(self.batch_size, "batch_size")
        _positive(self.learning_rate, "learning_rate")
        _int(self.seed, "seed", minimum=0)
        _int(self.eval_particles, "eval_particles")
        _int(self.posterior_draws, "posterior_draws")
        _choice(self.precision, "precision", (*PRECISIONS, "auto"))
        _bool(self.init_output_bias, "init_output_bias")
        changes = tuple(dict(change) for change in self.learning_rate_changes)
        object.__setattr__(self, "learning_rate_changes", changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe ``"training"`` section (``learning_rate_changes`` only once there are some)."""
        out = dataclasses.asdict(self)
        out["learning_rate_changes"] = [dict(c) for c in self.learning_rate_changes]
        if not out["learning_rate_changes"]:
            del out["learning_rate_changes"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return cls(**_fields_from(cls, data, "training"))


def check_compatible(model: ModelConfig, training: TrainConfig) -> None:
    """Rules between sections: ``ValueError`` where the training options do not fit the model."""
    if training.init_output_bias and model.ctf:
        raise ValueError(
            "init_output_bias sets the decoder's output to the images' mean, which the CTF filters "
            "before it meets the data"
        )


registry.encoder_names()  # register the built-in encoders, the pose-search one included
