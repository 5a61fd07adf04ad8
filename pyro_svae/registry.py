"""Registries of priors and encoders by name, so that a run folder can rebuild them.

A prior or an encoder registered here records, on every object it makes, its registry name and the keyword
arguments it was made with (:func:`spec_of`): ``{"name": "von_mises_theta", "kwargs": {"loc": 0.0,
"concentration": 2.0}}``. :class:`~pyro_svae.configs.ModelConfig` and
:class:`~pyro_svae.configs.GuideConfig` store that spec in ``config.json``, and :func:`build_prior` /
:func:`build_encoder` make the object again from it. Users register their own::

    @register_prior("my_theta")
    class MyThetaPrior(torch.nn.Module):
        def __init__(self, width: float = 1.0): ...
        def forward(self): return dist.Normal(0.0, self.width)

    SpatialVAE((28, 28), theta_prior=MyThetaPrior(width=0.5))   # runs.load_trained rebuilds it

A prior is a class (a module whose ``forward()`` returns the distribution) or a function returning a
distribution; an encoder is a module class whose first positional arguments come from the model
(``context``: the image shape, and for the rotation-equivariant encoder the number of rotation bins) and
whose keyword arguments are recorded. Keyword values must be JSON-safe (numbers, strings, booleans,
``None``, lists and dicts of them; tuples are stored as lists).

This module imports no Pyro and no torch: the modules that define priors and encoders import it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = [
    "build_encoder",
    "build_prior",
    "check_spec",
    "encoder_names",
    "prior_names",
    "register_encoder",
    "register_prior",
    "spec_of",
]

T = TypeVar("T")

_SPEC_ATTR = "_registry_spec"
_PRIORS: dict[str, Callable[..., Any]] = {}
_ENCODERS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {}


def _json_safe(value: Any, where: str) -> Any:
    """``value`` as JSON can hold it (tuples as lists, 0-d tensors and numpy scalars as numbers)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number, which config.json cannot hold")
        return value
    if isinstance(value, list | tuple):
        return [_json_safe(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v, where) for k, v in value.items()}
    item = getattr(value, "item", None)  # a 0-d tensor or a numpy scalar
    if callable(item) and getattr(value, "ndim", None) == 0:
        return _json_safe(item(), where)
    raise ValueError(
        f"{where}: the keyword value {value!r} ({type(value).__name__}) cannot be stored in config.json; "
        "registered priors and encoders take numbers, strings, booleans, None and lists of them"
    )


def _recorded_kwargs(
    signature: inspect.Signature, args: tuple, kwargs: dict, *, skip: int, where: str
) -> dict[str, Any]:
    """The arguments of a call by name, defaults filled in, less the first ``skip`` (self, context)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    names = list(signature.parameters)[skip:]
    recorded: dict[str, Any] = {}
    for name in names:
        parameter = signature.parameters[name]
        value = bound.arguments.get(name)
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            recorded.update(value or {})
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{where}: positional *args cannot be recorded; pass keywords")
        else:
            recorded[name] = value
    return _json_safe(recorded, where)


def _recording(obj: T, name: str, *, skip: int = 0) -> T:
    """``obj`` (a class or a function) made to record ``{"name", "kwargs"}`` on what it makes."""
    if inspect.isclass(obj):
        cls = obj
        original = cls.__init__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if type(self) is cls:  # an unregistered subclass is not this registry entry
                where = f"{cls.__name__} (registered as {name!r})"
                spec = {
                    "name": name,
                    "kwargs": _recorded_kwargs(signature, (self, *args), kwargs, skip=1 + skip, where=where),
                }
                object.__setattr__(self, _SPEC_ATTR, spec)

        cls.__init__ = __init__
        return cls
    if not callable(obj):
        raise TypeError(f"register a class or a function, got {type(obj).__name__}")
    function = obj
    signature = inspect.signature(function)

    @functools.wraps(function)
    def make(*args, **kwargs):
        result = function(*args, **kwargs)
        where = f"{function.__name__} (registered as {name!r})"
        spec = {"name": name, "kwargs": _recorded_kwargs(signature, args, kwargs, skip=skip, where=where)}
        try:
            object.__setattr__(result, _SPEC_ATTR, spec)
        except (AttributeError, TypeError):
            pass  # an object without a __dict__ cannot carry its spec: it is not rebuilt
        return result

    return make  # type: ignore[return-value]


def _check_name(name: str, table: Mapping[str, Any], what: str, obj: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {what} is registered under a non-empty string name, got {name!r}")
    if name in table:
        existing = table[name][0] if isinstance(table[name], tuple) else table[name]
        if getattr(existing, "__qualname__", None) != getattr(obj, "__qualname__", None) or getattr(
            existing, "__module__", None
        ) != getattr(obj, "__module__", None):
            raise ValueError(f"a {what} named {name!r} is registered already ({existing!r})")


def register_prior(name: str) -> Callable[[T], T]:
    """Decorator: register a prior class (a module returning a distribution) or a function returning a
    distribution under ``name``. What it makes records its name and keyword arguments (:func:`spec_of`)
    and :func:`build_prior` makes it again. Registering the same definition twice (a module reloaded)
    replaces it; another one under a taken name raises ``ValueError``."""

    def decorate(obj: T) -> T:
        _check_name(name, _PRIORS, "prior", obj)
        recording = _recording(obj, name)
        _PRIORS[name] = recording
        return recording

    return decorate


def register_encoder(name: str, *, context: tuple[str, ...] = ("image_shape",)) -> Callable[[T], T]:
    """Decorator: register an encoder class under ``name``. Its first positional arguments, named by
    ``context``, come from the model when it is built (``image_shape``; ``bins`` for an encoder that needs
    the number of rotation bins); its keyword arguments are recorded (:func:`spec_of`)."""

    def decorate(cls: T) -> T:
        if not inspect.isclass(cls):
            raise TypeError(f"register_encoder decorates a class, got {type(cls).__name__}")
        _check_name(name, _ENCODERS, "encoder", cls)
        recording = _recording(cls, name, skip=len(context))
        _ENCODERS[name] = (recording, tuple(context))
        return recording

    return decorate


def _ensure_builtins() -> None:
    """Import the modules that register the built-in priors and encoders."""
    from . import encoders, priors  # noqa: F401

    if "equivariant" not in _ENCODERS:  # pose_search sits above the registry's users: registered here
        from .pose_search import RotationEquivariantEncoder

        register_encoder("equivariant", context=("image_shape", "bins"))(RotationEquivariantEncoder)


def prior_names() -> list[str]:
    _ensure_builtins()
    return sorted(_PRIORS)


def encoder_names() -> list[str]:
    _ensure_builtins()
    return sorted(_ENCODERS)


def encoder_entry(name: str) -> tuple[Any, tuple[str, ...]]:
    """The registered encoder class of ``name`` and the context arguments it takes from the model."""
    _ensure_builtins()
    return _ENCODERS[name]


def spec_of(obj: Any) -> dict[str, Any] | None:
    """The ``{"name", "kwargs"}`` a registered prior or encoder was made with, else ``None``. A prior module
    wrapping a distribution (:class:`~pyro_svae.priors.DistributionPrior`) answers for its distribution."""
    spec = getattr(obj, "__dict__", {}).get(_SPEC_ATTR)
    if spec is None and hasattr(obj, "distribution"):
        spec = getattr(obj.distribution, "__dict__", {}).get(_SPEC_ATTR)
    if spec is None:
        return None
    return {"name": spec["name"], "kwargs": dict(spec["kwargs"])}


def check_spec(spec: Any, what: str) -> dict[str, Any]:
    """``spec`` as ``{"name": str, "kwargs": dict}``, or ``ValueError`` saying what was found."""
    if (
        not isinstance(spec, Mapping)
        or not isinstance(spec.get("name"), str)
        or set(spec) - {"name", "kwargs"}
    ):
        raise ValueError(f"{what} must be a spec {{'name': str, 'kwargs': {{...}}}}, got {spec!r}")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{what}: 'kwargs' must be a mapping, got {kwargs!r}")
    return {"name": spec["name"], "kwargs": _json_safe(dict(kwargs), what)}


def _registered(table: dict[str, Any], name: str, kind: str) -> Any:
    """What ``table`` (the priors or the encoders) holds under ``name``, the built-ins registered first."""
    _ensure_builtins()
    if name not in table:
        raise ValueError(
            f"no {kind} registered as {name!r} (registered: {', '.join(sorted(table))}); "
            f"import the module that registers it with pyro_svae.registry.register_{kind} first"
        )
    return table[name]


def build_prior(spec: Mapping[str, Any]) -> Any:
    """The prior (a module or a distribution) that ``spec`` names, made with its keyword arguments."""
    spec = check_spec(spec, "a prior")
    return _registered(_PRIORS, spec["name"], "prior")(**spec["kwargs"])


def build_encoder(spec: Mapping[str, Any], **context: Any) -> Any:
    """The encoder that ``spec`` names, made with the model's ``context`` (``image_shape``, ``bins``)
    and the spec's keyword arguments."""
    spec = check_spec(spec, "an encoder")
    cls, needs = _registered(_ENCODERS, spec["name"], "encoder")
    missing = [key for key in needs if context.get(key) is None]
    if missing:
        raise ValueError(f"the {spec['name']!r} encoder needs {', '.join(missing)} from the model")
    return cls(*(context[key] for key in needs), **spec["kwargs"])
