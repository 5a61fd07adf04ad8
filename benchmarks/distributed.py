"""Seconds per epoch of data-parallel training: 1 process against 2 processes (``torchrun``, gloo, CPU).

Headline (the 2-core CPU): 6.35 s per epoch for 2 processes x 1 thread, 6.42 for 1 x 2 threads, 10.15
for 1 x 1. Full account: docs/distributed.md.

Each configuration is a real ``torchrun --nproc-per-node P`` launch of this file in ``--worker`` mode
with ``OMP_NUM_THREADS=T`` per process: spatial-VAE as ``pyro-svae train`` builds it by default (2 x 128
tanh, z_dim 2, rotation and translation) on the built-in rotated MNIST (4,000 training images), batches
of 25 (the global batch: 2 processes take 12 / 13 images each), ``fit(..., distributed=True)``. The
first epoch of each launch is a warm-up; the configurations are launched in turn, ``--rounds`` times
(so that other load on the machine spreads over all of them), and the median of the timed epochs of
each is reported.

    python benchmarks/distributed.py                  # 1x2 threads, 2x1 threads, 1x1 thread
    python benchmarks/distributed.py --rounds 3 --epochs 3 --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CONFIGS = ((1, 2), (2, 1), (1, 1))  # (processes, threads per process)


def worker(args: argparse.Namespace) -> None:
    import pyro
    import torch

    from pyro_svae.data import rotated_mnist
    from pyro_svae.guides import AmortizedGuide
    from pyro_svae.infer import fit
    from pyro_svae.model import SpatialVAE

    train, _ = rotated_mnist()
    if args.train_size:
        train = train.subset(torch.arange(args.train_size))
    pyro.set_rng_seed(0)
    model = SpatialVAE(train.image_shape, z_dim=2, hidden_dim=128)
    guide = AmortizedGuide(model, hidden_dim=128)
    history = fit(
        model,
        guide,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=2e-3,
        device="cpu",
        progress=False,
        distributed=True,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = history.values("seconds", "train")
        elbo = history.values("elbo", "train")
        print(json.dumps({"n": len(train), "seconds": seconds, "elbo": elbo}))


def launch(processes: int, threads: int, args: argparse.Namespace) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun) if torchrun.exists() else "torchrun",
        "--standalone",
        f"--nproc-per-node={processes}",
        __file__,
        "--worker",
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--train-size={args.train_size}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    line = [row for row in done.stdout.splitlines() if row.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per launch, the first a warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="launches of each configuration")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--train-size", type=int, default=0, help="first N training images (0: all)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is a warm-up)")
    size = f"first {args.train_size}" if args.train_size else "4000"
    timed = args.rounds * (args.epochs - 1)
    print(f"rotated MNIST ({size} images), 2x128, batch {args.batch_size}, {timed} timed epochs each")
    seconds: dict[tuple[int, int], list[float]] = {config: [] for config in CONFIGS}
    elbo: dict[tuple[int, int], float] = {}
    for _ in range(args.rounds):
        for processes, threads in CONFIGS:
            result = launch(processes, threads, args)
            seconds[processes, threads] += result["seconds"][1:]
            elbo[processes, threads] = result["elbo"][-1]
    print(f"{'processes x threads':>20} | {'s/epoch (median)':>16} | {'train ELBO last':>15} | epochs (s)")
    for (processes, threads), values in seconds.items():
        label = f"{processes} x {threads}"
        epochs = ", ".join(f"{s:.2f}" for s in values)
        median = statistics.median(values)
        print(f"{label:>20} | {median:16.2f} | {elbo[processes, threads]:15.2f} | {epochs}", flush=True)


if __name__ == "__main__":
    main()
