"""Compare guides and inference algorithms under one budget: one table per data set / prior.

Headline (tutorial 03's budget: 1,000 digits, 8 epochs, 2 x 64): the best importance-weighted bound is the
CNN encoder's, -214.05, against -220.24 for the MLP guide with ``Trace_ELBO``. See tutorial 03.

Each (guide, objective) pair is trained from the same initial weights on the same mini-batches for the same
number of epochs, then evaluated on the same test images: ELBO per image, importance-weighted bound with
the same K for all, theta recovery, seconds per epoch (see :mod:`pyro_svae.compare`).

    python benchmarks/compare_inference.py                      # both tables at the default budget
    python benchmarks/compare_inference.py --table paper        # rotated MNIST, the paper's N(0, pi/4) prior
    python benchmarks/compare_inference.py --table circular     # uniform rotations, circular-uniform prior
    python benchmarks/compare_inference.py --epochs 2 --train-size 300 --hidden-dim 32   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pyro_svae import SpatialVAE, priors
from pyro_svae.compare import circular_contenders, compare_inference, default_contenders, format_table
from pyro_svae.data import rotated_mnist

TABLES = {
    "paper": {
        "title": "rotated MNIST (theta ~ N(0, pi/4)), prior theta ~ N(0, pi/4)",
        "rotation": "normal",
        "prior": lambda: priors.normal_theta(math.pi / 4),
        "contenders": default_contenders,
    },
    "circular": {
        "title": "uniformly rotated MNIST (theta ~ U[-pi, pi)), prior theta ~ CircularUniform",
        "rotation": "uniform",
        "prior": priors.circular_uniform_theta,
        "contenders": lambda particles: circular_contenders(),
    },
}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--table", choices=[*TABLES, "all"], default="all")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--hidden-dim", type=int, default=64, help="decoder and encoder width (2 layers)")
    parser.add_argument("--z-dim", type=int, default=2)
    parser.add_argument(
        "--particles", type=int, default=8, help="K of the IWAE objective and of every IW bound"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--only", nargs="*", default=None, help="contender names (substrings) to keep")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(TABLES) if args.table == "all" else [args.table]
    results = []
    for name in names:
        spec = TABLES[name]
        train, test = rotated_mnist(rotation=spec["rotation"], test_size=args.test_size, seed=args.seed)
        train = train.subset(range(min(args.train_size, len(train))))
        contenders = spec["contenders"](args.particles)
        if args.only:
            contenders = [c for c in contenders if any(s in c.name for s in args.only)]

        def make_model(spec=spec, shape=train.image_shape):
            return SpatialVAE(
                shape,
                args.z_dim,
                translate=False,
                theta_prior=spec["prior"](),
                hidden_dim=args.hidden_dim,
            )

        print(f"\n## {spec['title']}")
        print(
            f"budget: {len(train)} train / {len(test)} test images, {args.epochs} epochs, "
            f"batch {args.batch_size}, Adam lr {args.learning_rate}, {args.hidden_dim}x2 MLPs, "
            f"z_dim {args.z_dim}, rotation only (no dx), seed {args.seed}, "
            f"{torch.get_num_threads()} thread(s); IW bound with K = {args.particles}\n",
            flush=True,
        )
        started = time.perf_counter()
        rows = compare_inference(
            contenders,
            train,
            test,
            make_model=make_model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            num_particles=args.particles,
            hidden_dim=args.hidden_dim,
            seed=args.seed,
            device="cpu",
            on_result=lambda row: print(
                f"  done: {row['contender']} ({row['sec_per_epoch']:.1f} s/epoch)", flush=True
            ),
        )
        print()
        print(format_table(rows))
        print(f"\n({time.perf_counter() - started:.0f} s in all)", flush=True)
        for row in rows:
            row.pop("model"), row.pop("guide")
            results.append({"table": name, **row})
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args())
