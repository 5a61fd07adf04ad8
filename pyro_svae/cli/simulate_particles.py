"""Simulate cryo-EM particles with known conformation, pose and CTF, written as RELION files.

Writes ``OUT/particles.mrcs`` (the images) and ``OUT/particles.star`` (RELION 3.1: optics and particle
tables with the CTF, the true poses as ``rlnAnglePsi``/``rlnOriginX/YAngst``, and the ground truth as
``pyroSvaeTrue_*`` columns), ready for ``pyro-svae train --particles OUT/particles.star``. The structure
is the built-in two-domain hinge (its opening is the ``conformation`` factor), or ``--atomic-model``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..data import simulate_particles, write_particles
from ._common import UsageError, non_negative_int, positive_float, positive_int

__all__ = ["add_args", "main", "DEFAULTS"]

DEFAULTS = {"n": 1000, "box": 32, "pixel_size": 2.2, "snr": 1.0, "seed": 0, "shift_std": 1.5}
OUTPUTS = ("particles.star", "particles.mrcs")


def add_args(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="folder for the particle files")
    parser.add_argument(
        "-n", "--n", type=positive_int, default=d["n"], metavar="N", help=f"particles (default: {d['n']})"
    )
    parser.add_argument(
        "--box",
        type=positive_int,
        default=d["box"],
        metavar="N",
        help=f"image size, N x N pixels (at least 4; default: {d['box']})",
    )
    parser.add_argument(
        "--pixel-size",
        type=positive_float,
        default=d["pixel_size"],
        metavar="A",
        help=f"pixel size in Å (default: {d['pixel_size']})",
    )
    parser.add_argument(
        "--snr",
        type=positive_float,
        metavar="X",
        help="signal-to-noise ratio: variance of the clean (CTF-filtered) stack over that of the "
        f"white noise (default: {d['snr']})",
    )
    parser.add_argument(
        "--no-noise", action="store_true", help="write the clean images (no noise; --snr does not apply)"
    )
    parser.add_argument("--no-ctf", action="store_true", help="no CTF: the images are plain projections")
    parser.add_argument(
        "--shift-std",
        type=float,
        default=d["shift_std"],
        metavar="PX",
        help=f"standard deviation of the in-plane shifts, pixels (default: {d['shift_std']})",
    )
    parser.add_argument(
        "--atomic-model",
        metavar="FILE",
        help="simulate this structure (.pdb/.cif, all its models as a conformational path; or an .mrc "
        "map) instead of the built-in hinge",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=d["seed"],
        metavar="N",
        help=f"random seed (default: {d['seed']})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace particle files already in --out")


def main(args: argparse.Namespace) -> int:
    if args.no_noise and args.snr is not None:
        raise UsageError("--no-noise writes clean images, so --snr cannot apply")
    snr = None if args.no_noise else (DEFAULTS["snr"] if args.snr is None else args.snr)
    if not (math.isfinite(args.shift_std) and args.shift_std >= 0):
        raise UsageError(f"--shift-std must be a number of pixels >= 0, got {args.shift_std}")
    if args.box < 4:
        raise UsageError(f"--box must be at least 4 pixels, got {args.box}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    conformation = None
    if args.atomic_model is not None:
        model = Path(args.atomic_model)
        if not model.is_file():
            raise FileNotFoundError(2, "No such file or directory", str(model))
        conformation = str(model)
    data = simulate_particles(
        args.n,
        box=args.box,
        pixel_size=args.pixel_size,
        conformation=conformation,
        shift_std_pixels=args.shift_std,
        snr=snr,
        ctf=not args.no_ctf,
        seed=args.seed,
        keep_clean=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    star = write_particles(out / "particles.star", data)
    truth = ["theta", "dx"] + [f"{name}" for name in data.factors] + (["CTF"] if data.ctf is not None else [])
    noise = "no noise" if snr is None else f"SNR {snr:g}"
    source = Path(args.atomic_model).name if args.atomic_model else "the built-in hinge"
    print(
        f"{args.n} particles of {args.box}x{args.box} pixels at {args.pixel_size:g} Å ({source}, {noise}, "
        f"{'no CTF' if data.ctf is None else 'with CTF'}) in {star.with_suffix('.mrcs')} and {star}"
    )
    print(f"ground truth in {star.name}: {', '.join(truth)}")
    print(f"train on them with: pyro-svae train --particles {star}")
    return 0
