"""Exports for other programs: the particles of a run as a RELION STAR file with the posterior."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ..data import (
    ImageDataset,
    write_posterior_star,
)
from .posterior import posterior_summaries


def _rebased_image_names(data: ImageDataset, folder: Path) -> ImageDataset:
    """``data`` with the ``rlnImageName`` stacks of its input STAR table re-expressed relative to
    ``folder`` (where the new STAR file goes), resolved as the reader resolved them (next to the input
    STAR file, else in the working directory), so that the written file still finds its images."""
    import pandas as pd

    table, star_path = data.info.get("star"), data.info.get("star_path")
    if not isinstance(table, pd.DataFrame) or not star_path:
        return data
    target = folder.resolve()

    def relative(path: Path) -> str:
        try:
            return os.path.relpath(path.resolve(), target)
        except ValueError:  # another drive (Windows)
            return str(path.resolve())

    stack = data.info.get("stack_path")
    if stack:  # a stack with CTF rows from a STAR file: row k is image k of the stack
        names = [f"{k + 1:06d}@{relative(Path(stack))}" for k in range(len(table))]
        rebased = table.drop(columns="rlnImageName", errors="ignore")
        rebased.insert(0, "rlnImageName", names)
        return replace(data, info={**data.info, "star": rebased})
    if "rlnImageName" not in table.columns:
        return data
    base = Path(star_path).parent
    cache: dict[str, str] = {}

    def rebase(name: str) -> str:
        index, at, stack = name.rpartition("@")
        if stack not in cache:
            found = Path(stack)
            if not found.is_absolute():
                found = next((c for c in (base / stack, Path.cwd() / stack) if c.is_file()), base / stack)
            cache[stack] = relative(found)
        return f"{index}{at}{cache[stack]}"

    rebased = table.copy()
    rebased["rlnImageName"] = [rebase(str(name)) for name in table["rlnImageName"]]
    return replace(data, info={**data.info, "star": rebased})


def write_particles_star(
    path: str | os.PathLike,
    guide,
    data: ImageDataset,
    *,
    draws: int = 100,
    batch_size: int = 500,
) -> Path:
    """Write every particle of ``data`` (loaded by :func:`load_particles`, in the input order) with its
    posterior summaries (:func:`posterior_summaries`) as a RELION STAR file (see
    :func:`pyro_svae.data.write_posterior_star`: ``rlnAnglePsi``/``rlnOriginX/YAngst`` from the posterior
    means, or ``pyroSvaePsiDeg``/``pyroSvaeOriginX/YAngst`` for an input with 3-D poses, whose pose columns
    stay as they are (:func:`pyro_svae.data.posterior_pose_note`), ``pyroSvaePsiStdDeg`` (circular),
    ``pyroSvaePsiResultant``, ``pyroSvaeOriginX/YStdAngst``, ``pyroSvaeZ<k>``, ``pyroSvaeZStd<k>``).
    ``rlnImageName`` paths are rewritten relative to the new file's folder, so it finds the input stacks.
    """
    summary = posterior_summaries(guide, data, draws=draws, batch_size=batch_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = _rebased_image_names(data, Path(path).parent)
    return write_posterior_star(
        path,
        data,
        theta_mean=summary.get("theta_mean"),
        theta_std=summary.get("theta_std"),
        theta_resultant=summary.get("theta_resultant"),
        dx_mean=summary.get("dx_mean"),
        dx_std=summary.get("dx_std"),
        z_mean=summary.get("z_mean"),
        z_std=summary.get("z_std"),
    )
