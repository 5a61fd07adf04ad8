"""Re-evaluate a saved run on its test data or on a given image file.

Reads only the run folder (config.json, checkpoint.pt) and the data it names. Writes summary.json (test
ELBO, importance-weighted bound, pose and content metrics), posterior.nc and figures/ into
``RUN/evaluation-<data>/`` (or ``--out``) and prints the main numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyro

from .. import runs
from ..data import BUILTIN, load_images
from ..infer import as_dataset
from ..runtime import resolve_device
from ._common import (
    UsageError,
    add_output_args,
    positive_int,
)

__all__ = ["add_args", "main"]

OUTPUTS = (*runs.EVALUATION_FILES, "figures")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder written by 'pyro-svae train'")
    parser.add_argument(
        "--data",
        metavar="NAME|FILE",
        help="evaluate on this image file (all its images) or built-in data set (its test split) "
        "instead of the run's test split",
    )
    parser.add_argument("--labels", metavar="FILE", help="class labels of --data (.npy or IDX)")
    parser.add_argument(
        "-k",
        "--num-particles",
        type=positive_int,
        metavar="K",
        help="posterior samples per image for the ELBO and the importance-weighted bound "
        "(default: the run's --eval-particles)",
    )
    parser.add_argument(
        "--posterior-draws",
        type=positive_int,
        metavar="S",
        help="posterior draws per image saved in posterior.nc (default: the run's)",
    )
    add_output_args(parser, "RUN/evaluation-<data>")


def main(args: argparse.Namespace) -> int:
    if args.labels is not None and args.data is None:
        raise UsageError("--labels needs --data")
    device = resolve_device(args.device)
    folder, config, model, guide, state = runs.load_trained(args.run, device=device)
    train = None
    if args.data is None:
        train, data = runs.load_data(config["data"])
        name = "test"
    elif args.data in BUILTIN:
        spec = runs.data_spec(args.data, seed=int(config.get("data", {}).get("seed", 0)))
        train, data = runs.load_data(spec)
        name = args.data
    else:
        data = load_images(args.data, args.labels)
        name = Path(args.data).name.split(".")[0] or "data"
    data = as_dataset(data, model.image_shape, name=str(args.data or "test data"))
    runs.check_images(data, None, config["model"].get("likelihood", "bernoulli"))
    training = config.get("training", {})
    particles = args.num_particles or int(training.get("eval_particles", 16))
    draws = args.posterior_draws or int(training.get("posterior_draws", 100))
    out = runs.prepare_output_folder(
        args.out or folder.root / f"evaluation-{name}", OUTPUTS, overwrite=args.overwrite
    )

    pyro.set_rng_seed(args.seed)
    report, means = runs.final_report(
        model,
        guide,
        data,
        train=train,
        num_particles=particles,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    samples = runs.sample_posterior(guide, data, draws=draws, batch_size=max(args.batch_size, 100))
    posterior = runs.posterior_inference_data(
        samples, data, attrs={"run": str(folder.root), "evaluated_on": str(args.data or "test split")}
    )
    runs.write_posterior(out / "posterior.nc", posterior)
    figures = runs.write_figures(out / "figures", model=model, test=data, means=means, report=report)
    summary = {
        "run": str(folder.root),
        "data": str(args.data) if args.data else "the run's test split",
        "epoch": int(state["epoch"]),
        "test": report,
        **runs.environment(device),
        "figures": [str(path.relative_to(out)) for path in figures],
    }
    runs.write_json(out / "summary.json", summary)
    line = (
        f"{name}: {len(data)} images, ELBO {report['elbo']:.2f}, importance-weighted bound "
        f"(K={particles}) {report['iw_elbo']:.2f} nats per image"
    )
    if "theta_circ_corr" in report:
        line += f", theta circular corr {report['theta_circ_corr']:.3f}"
        line += f" (Fisher-Lee {report['theta_circ_corr_fisher_lee']:.3f})"
    print(line)
    print(f"results in {out}/")
    return 0
