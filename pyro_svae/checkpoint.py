"""Atomic checkpoints of model, guide, optimizer and RNG state, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "current_umask",
    "save_checkpoint",
    "load_checkpoint",
    "get_rng_state",
    "set_rng_state",
    "optimizer_state",
    "set_optimizer_state",
]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""


def atomic_write(path: str | os.PathLike, write, *, suffix: str = ".tmp") -> None:
    """Call ``write(tmp_path)`` on a temporary file ``.NAME.XXXXXXXX{suffix}`` next to ``path``, then
    rename it over ``path``.

    A reader never sees a half-written file, and a crash leaves the previous file intact. The file gets
    the mode a plain ``open`` would give it (``0o666`` less the umask). ``suffix`` must end in what
    ``write`` needs to see (e.g. ``".tmp.gif"`` for a writer that picks its format by extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """This process's umask, read without changing it where ``/proc`` tells it (Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once (another thread could see 0o022 meanwhile)
    os.umask(mask)
    return mask


def get_rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and numpy RNG states as a ``weights_only``-loadable dict."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def optimizer_state(optim: pyro.optim.PyroOptim, prefixes: dict[str, str]) -> dict[str, dict]:
    """Pyro optimizer state keyed by ``role`` then parameter name relative to that role's root module.

    ``prefixes`` maps roles (``"model"``, ``"guide"``) to the root names of their ``PyroModule``s, so the
    state reloads into modules whose root names differ (a second model in the same session).
    """
    grouped: dict[str, dict] = {role: {} for role in prefixes}
    for name, state in optim.get_state().items():
        for role, prefix in prefixes.items():
            if name.startswith(prefix + "."):
                grouped[role][name[len(prefix) + 1 :]] = state
                break
        else:
            grouped.setdefault("other", {})[name] = state
    return grouped


def set_optimizer_state(
    optim: pyro.optim.PyroOptim,
    grouped: dict[str, dict],
    prefixes: dict[str, str],
    *,
    learning_rate: float | None = None,
) -> None:
    """Load what :func:`optimizer_state` saved; ``learning_rate`` replaces the rate the state recorded
    (a torch optimizer's ``param_groups``, which would otherwise win over ``optim``'s arguments)."""
    state = dict(grouped.get("other", {}))
    for role, prefix in prefixes.items():
        for name, value in grouped.get(role, {}).items():
            state[f"{prefix}.{name}"] = value
    if learning_rate is not None:
        state = {name: _with_learning_rate(value, learning_rate) for name, value in state.items()}
    optim.set_state(state)


def _with_learning_rate(state: dict, learning_rate: float) -> dict:
    """A torch optimizer's ``state_dict`` with ``lr`` set in every param group."""
    groups = [{**group, "lr": learning_rate} for group in state["param_groups"]]
    return {**state, "param_groups": groups}


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically with ``torch.save``."""
    payload = {"format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``: no pickled code is ever executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a readable pyro_svae checkpoint")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # corrupt or foreign file: torch raises many kinds
        raise CheckpointError(
            f"{path}: not a readable pyro_svae checkpoint ({_load_failure(error)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a pyro_svae checkpoint (format version mismatch)")
    return payload


def _load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line, without torch's advice to retry with
    ``weights_only=False`` (which would run whatever code the file carries)."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        return "it holds pickled Python objects; only tensors and plain data are ever loaded"
    first = text.splitlines()[0] if text else type(error).__name__
    return first if "weights_only" not in first else type(error).__name__


def load_module_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with a :class:`CheckpointError` that says what differs."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"checkpoint does not match the {what}: {detail}") from None
