"""Draw docs/figures/rotated_mnist.png (the README figure) from a finished run of ``pyro-svae train``.

Usage: ``python docs/figures/make_readme_figure.py RUN [OUT.png]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_svae import plots, runs
from pyro_svae.infer import posterior_means


@torch.no_grad()
def main(run: str, out: str = str(Path(__file__).with_name("rotated_mnist.png"))) -> None:
    _, config, model, guide, _ = runs.load_trained(run)
    _, test = runs.load_data(config["data"])
    manifold, _ = plots.decode_manifold(model, steps=12)
    count = 8
    pick = torch.arange(count) * (len(test) // count)
    data = test.subset(pick)
    means = posterior_means(guide, data)
    reconstruction = model.decode(means["z"], means.get("theta"), means.get("dx"))
    zero = {k: torch.zeros_like(v) for k, v in means.items() if k in ("theta", "dx")}
    upright = model.decode(means["z"], zero.get("theta"), zero.get("dx"))

    figure = Figure(figsize=(9.6, 3.9), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=[1.0, 1.25])
    ax = left.subplots()
    flat = manifold.reshape(-1, *manifold.shape[2:])
    ax.imshow(plots.tile_images(flat, 12, pad=0), cmap="gray", vmin=0, vmax=1)
    ax.set_title(r"decoded over a grid of $z$ at $\theta=0$, $\Delta x=0$", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    axes = right.subplots(3, 1)
    rows = [("test digit", data.images), ("reconstruction", reconstruction), ("content, upright", upright)]
    for ax, (label, images) in zip(axes, rows, strict=True):
        canvas = np.nan_to_num(plots.tile_images(images, count), nan=1.0)
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=9)
    right.suptitle("inferred pose, then content at pose zero", fontsize=10)
    figure.savefig(out, dpi=80)
    print(f"{out}: {Path(out).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
