"""Particle stacks at scale: peak memory and images/s, read into memory or streamed from disk.

Headline (2026-12-04, 2-core AMD EPYC, one thread): a 50,000 x 128 x 128 stack (3.1 GiB) trains one epoch
streamed at 650 images/s with a peak resident memory of 648 MiB, against 12.1 GiB to read it into memory as
before; the full table is in docs/cryoem.md ("Real data sets").

For each stack size (particles x box) the script writes a stack of noise particles (an ``.mrcs`` written
through mrcfile's memory map, chunk by chunk), then measures each configuration in a fresh process, whose
peak resident memory (``VmHWM``) is then that configuration's own:

- ``read``: one pass over the particles in random batches of 100, read and normalized (what an epoch's
  data loading costs), through ``runs.load_data`` with ``--cache-images always`` (everything read into
  memory first) or ``never`` (streamed: :class:`pyro_svae.data.ParticleImages`), or ``legacy``
  (``load_particles`` then ``preprocess_particles`` in memory, as every particle run read its data before);
- ``train``: one epoch of ``fit`` (z_dim 2, hidden 32, Gaussian likelihood, 1,024 of the pixels per image
  scored, batches of 100), streamed.

Usage::

    python benchmarks/particle_stream.py --sizes 2000x64 2000x128 50000x64 50000x128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_stack(path: Path, count: int, box: int, chunk: int = 2000) -> None:
    """``count`` noise particles of ``box x box`` (a bright disc on Gaussian noise), written in chunks."""
    import mrcfile

    rng = np.random.default_rng(0)
    offsets = np.arange(box) - (box - 1) / 2
    disc = (np.hypot(offsets[:, None], offsets[None, :]) < box / 5).astype(np.float32)
    with mrcfile.new_mmap(path, shape=(count, box, box), mrc_mode=2, overwrite=True) as mrc:
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            mrc.data[start : start + n] = disc + rng.normal(size=(n, box, box)).astype(np.float32)
        mrc.set_image_stack()
        mrc.voxel_size = 1.0


def _peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM``, which starts anew at ``exec`` (``ru_maxrss``
    would also count the parent's pages at the fork that started this process)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(stack: str, mode: str, cache: str) -> dict:
    """One configuration, in this process: seconds, images/s and the peak resident memory."""
    import torch

    from pyro_svae import AmortizedGuide, SpatialVAE, fit, runs

    started = time.perf_counter()
    if cache == "legacy":  # the whole stack read, then preprocessed, in memory (before streaming existed)
        from pyro_svae.data import load_particles, preprocess_particles

        train = preprocess_particles(load_particles(stack))
    else:
        train, _ = runs.load_data(runs.particle_spec(stack, cache=cache, test_size=100, seed=0))
    loaded = time.perf_counter() - started
    started = time.perf_counter()
    if mode == "read":
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        total = 0.0
        for index in order.split(100):
            total += float(train.images[index].sum())
        count = len(train)
    else:
        model = SpatialVAE(train.image_shape, 2, hidden_dim=32, likelihood="gaussian", pixel_subsample=1024)
        guide = AmortizedGuide(model, hidden_dim=32)
        fit(model, guide, train, epochs=1, batch_size=100, learning_rate=1e-3, progress=False)
        count = len(train)
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    return {
        "load_seconds": round(loaded, 2),
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "in_memory": isinstance(train.images, torch.Tensor),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["2000x64", "2000x128", "50000x64", "50000x128"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", default=None, help="where to write the stacks (default: a temp folder)")
    parser.add_argument(
        "--modes", nargs="+", default=["read:legacy", "read:always", "read:never", "train:never"]
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", nargs=3, metavar=("STACK", "MODE", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    folder = Path(args.folder or tempfile.mkdtemp(prefix="particle_stream_"))
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    print("| particles | box | stack on disk | mode | cache | images/s | peak RSS | loading |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        count, box = (int(part) for part in size.split("x"))
        stack = folder / f"stack_{count}x{box}.mrcs"
        if not stack.exists():
            write_stack(stack, count, box)
        for entry in args.modes:
            mode, cache = entry.split(":")
            if cache in ("always", "legacy") and count * box * box * 4 > 4 << 30:
                continue  # more than this machine's memory holds comfortably
            command = [sys.executable, __file__, "--one", str(stack), mode, cache]
            found = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row = {"particles": count, "box": box, "mode": mode, "cache": cache, **json.loads(found.stdout)}
            rows.append(row)
            print(
                f"| {count:,} | {box} | {stack.stat().st_size / 2**20:,.0f} MiB | {mode} | {cache} | "
                f"{row['images_per_s']:,.0f} | {row['peak_rss_mib']:,.0f} MiB | {row['load_seconds']} s |",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
