"""Exports for other programs: the particles of a run as a RELION STAR file with the posterior."""

from __future__ import annotations

import os
from pathlib import Path

from ..data import (
    ImageDataset,
    write_posterior_star,
)
from .posterior import posterior_summaries


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
    Every input column is kept and ``rlnImageName`` is written exactly as the input STAR gives it: RELION
    resolves it against its project directory, so the new file is read from the same project directory
    as the input STAR (a stack's particles get the stack's absolute path).
    """
    summary = posterior_summaries(guide, data, draws=draws, batch_size=batch_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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
