"""Encode images with a saved run: the amortized posterior of every image, in input order, with names.

``--particles FILE`` (RELION ``.star``, cryoSPARC ``.cs`` or a stack; preprocessed as the run's training
particles were: the same inversion, Fourier crop and normalization) writes ``particles.star``: every
input row and column, ``rlnImageName`` exactly as given (RELION resolves it against its project
directory: read the file from the same project directory as the input), plus the posterior (see
``pyro-svae train``); a ``.cs`` input also gets ``particles.cs`` (``uid`` plus ``pyro_svae/...`` fields
that cryoSPARC joins on ``uid``). ``--data FILE|DIR`` (an image file or a folder of cut-outs) writes
``catalogue.csv``: one row per image with its file, its position in that file, the posterior angle and
shift, scale and z with their standard deviations. Without either, the run's own data (all images, not
only the test split). Both write ``posterior.nc`` (ArviZ: posterior draws per image, in the same order).
Outputs go to ``RUN/encode-<name>/`` (or ``--out``); existing results are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pyro

from .. import runs
from ..checkpoint import atomic_write
from ..data import (
    DataError,
    ImageDataset,
    load_image_folder,
    load_images,
    load_particles,
    posterior_pose_note,
    write_posterior_cs,
    write_posterior_star,
)
from ..infer import as_dataset
from ..runtime import resolve_device
from ._common import (
    UsageError,
    add_input_args,
    add_output_args,
    positive_int,
)

__all__ = ["add_args", "main"]

OUTPUTS = ("particles.star", "particles.cs", "catalogue.csv", "posterior.nc")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder written by 'pyro-svae train'")
    add_input_args(parser, "encode")
    parser.add_argument(
        "--posterior-draws",
        type=positive_int,
        metavar="S",
        help="posterior draws per image in posterior.nc and for the standard deviations (default: the run's)",
    )
    add_output_args(parser, "RUN/encode-<name>")


def _stem(path: str) -> str:
    return Path(path.rstrip("/")).name.split(".")[0] or "data"


def _particles(args: argparse.Namespace, config: dict) -> ImageDataset:
    """The particles of ``--particles`` (or the run's own), preprocessed as the run's were."""
    spec = config.get("data", {})
    trained = spec.get("particles") or {}
    if not runs.is_particle_spec(spec):
        raise UsageError(f"{args.run} was not trained on particles: encode images with --data")
    if args.particles is None:
        data = runs.load_dataset(spec)  # all particles of the run, selection and preprocessing applied
        return runs.select_particles(data, args.ind) if args.ind else data
    data = load_particles(
        args.particles,
        ctf=args.ctf,
        pixel_size=args.pixel_size or trained.get("pixel_size"),
        project_dir=args.project_dir,
        stream=True,  # one pass: each batch is read from the stacks when it is encoded
    )
    return runs.prepare_particles(data, trained, ind=args.ind)


def _images(args: argparse.Namespace) -> ImageDataset:
    path = Path(args.data)
    return load_image_folder(path) if path.is_dir() else load_images(path)


def _catalogue_rows(data: ImageDataset, summary: dict) -> tuple[list[str], list[list]]:
    n = len(data)
    source = np.arange(n) if data.source_index is None else data.source_index.numpy()
    files = data.info.get("files")
    if files:  # a folder: source_index is the file's position in the listing
        names = [Path(files[i]).name for i in source]
        position = np.zeros(n, dtype=np.int64)
        seen: dict[int, int] = {}
        for row, file in enumerate(source):
            position[row] = seen.get(int(file), 0)
            seen[int(file)] = position[row] + 1
    else:
        names = [data.name] * n
        position = source
    header = ["file", "image"]
    columns: list[np.ndarray] = []

    def add(name: str, values) -> None:
        header.append(name)
        columns.append(np.asarray(values, dtype=np.float64))

    if "theta_mean" in summary:
        add("angle_deg", np.rad2deg(summary["theta_mean"].numpy()))
        add("angle_std_deg", np.rad2deg(summary["theta_std"].numpy()))
    if "dx_mean" in summary:
        for k, axis in enumerate("xy"):
            add(f"shift_{axis}", summary["dx_mean"][:, k].numpy())
        for k, axis in enumerate("xy"):
            add(f"shift_{axis}_std", summary["dx_std"][:, k].numpy())
    if "scale_mean" in summary:
        add("scale", summary["scale_mean"].numpy())
        add("scale_std", summary["scale_std"].numpy())
    if "z_mean" in summary:
        z, z_std = summary["z_mean"].numpy(), summary["z_std"].numpy()
        for k in range(z.shape[1]):
            add(f"z{k + 1}", z[:, k])
        for k in range(z.shape[1]):
            add(f"z{k + 1}_std", z_std[:, k])
    rows = [[names[i], int(position[i]), *(f"{c[i]:.9g}" for c in columns)] for i in range(n)]
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)


def main(args: argparse.Namespace) -> int:
    given = (("--ctf", args.ctf), ("--project-dir", args.project_dir), ("--pixel-size", args.pixel_size))
    particle_only = [flag for flag, value in given if value]
    if particle_only and args.particles is None:
        raise UsageError(f"{' and '.join(particle_only)} apply to --particles only")
    device = resolve_device(args.device)
    folder, config, model, guide, _ = runs.load_trained(args.run, device=device)
    particles = args.particles is not None or (args.data is None and runs.is_particle_spec(config["data"]))
    if args.ind and not particles:
        raise UsageError("--ind selects particles: give --particles (or a run trained on particles)")
    if particles:
        data = _particles(args, config)
        name = _stem(args.particles) if args.particles else "particles"
        if model.ctf and data.ctf is None:
            raise DataError(f"{data.name}: the run models the CTF but these particles carry no CTF")
    elif args.data is not None:
        data, name = _images(args), _stem(args.data)
    else:
        data, name = runs.load_dataset(config["data"]), "data"
    data = as_dataset(data, model.image_shape, name=data.name)
    runs.check_images(data, None, config["model"].get("likelihood", "bernoulli"))
    draws = args.posterior_draws or int(config.get("training", {}).get("posterior_draws", 100))
    out = runs.prepare_output_folder(
        args.out or folder.root / f"encode-{name}", OUTPUTS, overwrite=args.overwrite
    )
    pyro.set_rng_seed(args.seed)
    summary = runs.posterior_summaries(guide, data, draws=max(2, draws), batch_size=args.batch_size)
    written = []
    if particles:
        posterior = {
            key: summary.get(key)
            for key in ("theta_mean", "theta_std", "theta_resultant", "dx_mean", "dx_std", "z_mean", "z_std")
        }
        written.append(write_posterior_star(out / "particles.star", data, **posterior))
        if data.info.get("cs") is not None:
            written.append(write_posterior_cs(out / "particles.cs", data, **posterior))
    else:
        header, rows = _catalogue_rows(data, summary)
        _write_csv(out / "catalogue.csv", header, rows)
        written.append(out / "catalogue.csv")
    samples = runs.sample_posterior(guide, data, draws=draws, batch_size=args.batch_size)
    attrs = {"run": str(folder.root), "encoded": str(args.particles or args.data or "the run's data")}
    runs.write_posterior(out / "posterior.nc", runs.posterior_inference_data(samples, data, attrs=attrs))
    written.append(out / "posterior.nc")
    print(f"{name}: {len(data)} images encoded: {', '.join(path.name for path in written)} in {out}/")
    if particles:
        print("particles.star: rlnImageName as in the input; read it from the input's project directory")
        note = posterior_pose_note(data)
        if note:
            print(f"particles.star: {note}")
    return 0
