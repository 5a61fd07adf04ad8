"""Decode new images from a saved run: content z from the prior, pose fixed or from its prior.

Reads only the run folder. Writes ``samples.npz`` (``images`` (N, C, H, W), ``z``, ``theta``, ``dx``)
and ``samples.png`` into ``RUN/samples/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import pyro
import torch

from .. import runs
from ..checkpoint import atomic_write
from ..plots import image_grid_figure
from ..runtime import resolve_device
from ._common import UsageError, add_device_arg, non_negative_int, positive_int

__all__ = ["add_args", "main"]

OUTPUTS = runs.SAMPLE_FILES


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder written by 'pyro-svae train'")
    parser.add_argument(
        "-n",
        "--num-images",
        type=positive_int,
        default=64,
        metavar="N",
        help="images to generate (default: 64)",
    )
    parser.add_argument(
        "--theta",
        type=float,
        metavar="RADIANS",
        help="rotation of every image, counter-clockwise (default: 0)",
    )
    parser.add_argument(
        "--dx",
        type=float,
        nargs=2,
        metavar=("X", "Y"),
        help="translation of every image in grid units, the image spanning [-1, 1] (default: 0 0)",
    )
    parser.add_argument(
        "--pose-from-prior",
        action="store_true",
        help="draw each image's rotation and translation from the model's priors",
    )
    parser.add_argument(
        "--columns",
        type=positive_int,
        default=8,
        metavar="N",
        help="images per row in samples.png (default: 8)",
    )
    add_device_arg(parser)
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, metavar="N", help="random seed (default: 0)"
    )
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder (default: RUN/samples)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier samples in --out")


def _check_pose_options(args: argparse.Namespace, model) -> None:
    if args.pose_from_prior and (args.theta is not None or args.dx is not None):
        raise UsageError("--pose-from-prior draws the pose, so --theta and --dx cannot apply")
    if args.theta is not None and not model.rotate:
        raise UsageError("--theta: the run's model has no rotation (trained with --no-rotate or --vanilla)")
    if args.dx is not None and not model.translate:
        raise UsageError(
            "--dx: the run's model has no translation (trained with --no-translate or --vanilla)"
        )
    values = [args.theta] if args.theta is not None else []
    values += list(args.dx or [])
    if not all(np.isfinite(values)):
        raise UsageError("--theta and --dx must be finite numbers")


@torch.no_grad()
def main(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    folder, _, model, _, _ = runs.load_trained(args.run, device=device)
    _check_pose_options(args, model)
    out = runs.prepare_output_folder(args.out or folder.root / "samples", OUTPUTS, overwrite=args.overwrite)

    pyro.set_rng_seed(args.seed)
    n = args.num_images
    z = model.z_prior().sample((n,))
    theta = dx = None
    if model.rotate:
        if args.pose_from_prior:
            theta = model.theta_prior().sample((n,))
        else:
            theta = z.new_full((n,), args.theta or 0.0)
    if model.translate:
        if args.pose_from_prior:
            dx = model.dx_prior().sample((n,))
        else:
            dx = z.new_tensor(args.dx or (0.0, 0.0)).expand(n, 2)
    images = model.decode(z, theta, dx).float().cpu().numpy()

    arrays = {"images": images, "z": z.cpu().numpy()}
    if theta is not None:
        arrays["theta"] = theta.cpu().numpy()
    if dx is not None:
        arrays["dx"] = dx.cpu().numpy()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(out / "samples.npz", lambda tmp: open(tmp, "wb").write(buffer.getvalue()))
    pose = "pose from the prior" if args.pose_from_prior else "fixed pose"
    figure = image_grid_figure(images, columns=args.columns, title=f"{n} samples, {pose}")
    atomic_write(out / "samples.png", lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    print(f"{n} images ({pose}) in {out}/samples.npz and samples.png")
    return 0
