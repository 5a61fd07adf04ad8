"""Analyse the content latents z of a saved run (what ``cryodrgn analyze`` gives, for 2-D images).

The posterior means z of every image (default: all the run's data, train and test, in input order; or
``--particles``/``--data`` as ``pyro-svae encode`` reads them; ``--ind`` a selection) are embedded by PCA
and UMAP (``--skip-umap``), coloured by point density and by any known truth (simulated data: labels and
continuous factors such as the conformation), and clustered by k-means (``-k``). Written to
``RUN/analyze/`` (or ``--out``):

  z.npy, pca.npy, umap.npy, kmeans_labels.npy, centers.npy   arrays, one row per image (input order)
  rows.npy                 the input row (0-based) of each image; selections index input rows
  analysis.json            cluster sizes, explained variance, purity against known truth
  *.png                    PCA/UMAP by density, by cluster and by truth; cluster centres decoded upright;
                           a montage of each cluster's particles; trajectories along the PCs
  pc<i>_trajectory.gif/.mrcs/_z.npy   z along principal component i (5th to 95th percentile), decoded
  cluster_<k>.ind.npy      each cluster's selection file (0-based input rows) for --ind
  particles_clusters.star  (particles) every particle, rlnClassNumber = cluster + 1, input columns kept,
                           rlnImageName unchanged; cluster_<k>.star the subsets (RELION Subset selection)
  particles_clusters.cs, cluster_<k>.cs   (a .cs input) the input records plus pyro_svae/class
  index.html               every figure embedded: one self-contained page
  analysis.ipynb           a notebook that loads the arrays to continue the analysis

Existing results are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pyro
import torch

from .. import analysis, runs
from ..checkpoint import atomic_write
from ..data import BUILTIN, DataError, ImageDataset, write_class_cs, write_class_star
from ..infer import as_dataset
from ..runtime import resolve_device
from ._common import (
    UsageError,
    add_input_args,
    add_output_args,
    positive_int,
)
from .encode import _images, _particles

__all__ = ["add_args", "main", "DEFAULT_CLUSTERS"]

DEFAULT_CLUSTERS = 10  # cryoDRGN uses 20 for large data sets; 10 suits the thousands of particles here
FIXED_OUTPUTS = (
    "z.npy",
    "pca.npy",
    "umap.npy",
    "kmeans_labels.npy",
    "centers.npy",
    "rows.npy",
    "analysis.json",
    "index.html",
    "analysis.ipynb",
    "particles_clusters.star",
    "particles_clusters.cs",
)
PATTERNS = ("cluster_*", "pc*_trajectory*", "*.png")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a run folder written by 'pyro-svae train'")
    add_input_args(parser, "analyse")
    parser.add_argument(
        "-k",
        "--ksample",
        type=positive_int,
        default=DEFAULT_CLUSTERS,
        metavar="K",
        help=f"k-means clusters (default: {DEFAULT_CLUSTERS})",
    )
    parser.add_argument(
        "--pc",
        type=positive_int,
        default=2,
        metavar="N",
        help="trajectories along the first N PCs (default: 2)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=10, metavar="S", help="images per trajectory (default: 10)"
    )
    parser.add_argument(
        "--truth-bins",
        type=positive_int,
        default=5,
        metavar="B",
        help="bins of a continuous known truth for the purity (default: 5)",
    )
    parser.add_argument("--skip-umap", action="store_true", help="no UMAP embedding (it takes longest)")
    add_output_args(parser, "RUN/analyze")


def _builtin(spec: dict) -> ImageDataset:
    """All images of a built-in data set: the train then the test split (as a run sees them)."""
    kwargs = {"seed": int(spec.get("seed", 0))}
    if spec.get("test_size") is not None:
        kwargs["test_size"] = int(spec["test_size"])
    train, test = BUILTIN[spec["builtin"]](**kwargs)
    parts = (train, test)

    def cat(name: str):
        values = [getattr(part, name) for part in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    if any(part.ctf is not None for part in parts):
        raise DataError(f"{spec['builtin']}: analysing a built-in set with CTF is not supported")
    factors = {key: torch.cat([part.factors[key] for part in parts]) for key in train.factors}
    return ImageDataset(
        torch.cat([part.images for part in parts]),
        theta=cat("theta"),
        dx=cat("dx"),
        labels=cat("labels"),
        scale=cat("scale"),
        factors=factors,
        source_index=torch.arange(len(train) + len(test)),
        name=str(spec["builtin"]),
    )


def _load(args: argparse.Namespace, config: dict, model) -> tuple[ImageDataset, bool]:
    spec = config["data"]
    given = (("--ctf", args.ctf), ("--project-dir", args.project_dir), ("--pixel-size", args.pixel_size))
    particle_only = [flag for flag, value in given if value]
    if particle_only and args.particles is None:
        raise UsageError(f"{' and '.join(particle_only)} apply to --particles only")
    if args.data is not None:
        if args.ind:
            raise UsageError("--ind selects particles: give --particles (or a run trained on particles)")
        return _images(args), False
    if args.particles is None and spec.get("builtin"):
        data = _builtin(spec)
        return (runs.select_particles(data, args.ind) if args.ind else data), False
    if args.particles is not None or runs.is_particle_spec(spec):
        data = _particles(args, config)
        if model.ctf and data.ctf is None:
            raise DataError(f"{data.name}: the run models the CTF but these particles carry no CTF")
        files = data.info.get("star") is not None or bool(data.info.get("stack_path"))
        return data, files
    data = runs.load_dataset(spec)
    return (runs.select_particles(data, args.ind) if args.ind else data), False


def _truths(data: ImageDataset, labels: np.ndarray, bins: int) -> dict[str, dict]:
    """Known truth per name: the values to colour by, the classes to score, purity, majorities."""
    known: dict[str, tuple[np.ndarray, bool]] = {}
    if data.labels is not None:
        known["label"] = (data.labels.numpy(), True)
    for name, values in data.factors.items():
        known[name] = (values.numpy(), False)
    out = {}
    for name, (values, discrete) in known.items():
        if discrete:
            classes, binning = values, None
        else:
            classes, edges = analysis.bin_truth(values, bins)
            binning = f"{bins} equal-width bins over [{edges[0]:.3g}, {edges[-1]:.3g}]"
        table, names = analysis.cluster_truth_table(labels, classes)
        sizes = np.maximum(table.sum(1), 1)
        out[name] = {
            "values": values,
            "discrete": discrete,
            "binning": binning,
            "purity": analysis.purity(labels, classes),
            "majority": [names[i].item() for i in table.argmax(1)],
            "majority_share": (table.max(1) / sizes).tolist(),
        }
    return out


def _save_figure(figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    return path


def _save_npy(path: Path, array) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(array))

    atomic_write(path, write)


def _write_mrcs(path: Path, images: torch.Tensor, pixel_size: float | None) -> None:
    import mrcfile

    stack = images[:, 0].numpy().astype(np.float32)

    def write(tmp: str) -> None:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(stack)
            mrc.set_image_stack()
            if pixel_size:
                mrc.voxel_size = float(pixel_size)

    atomic_write(path, write, suffix=".tmp.mrcs")


def _clear(out: Path) -> None:
    for pattern in PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def main(args: argparse.Namespace) -> int:
    """Load the run and its images, analyse their z, write arrays, figures, selections and the report."""
    device = resolve_device(args.device)
    folder, config, model, guide, _ = runs.load_trained(args.run, device=device)
    data, particle_files = _load_input(args, config, model)
    out = _output_folder(args, folder)
    result = _analyse(args, guide, data)
    _save_arrays(out, result)
    figures = _Figures(out)
    _embedding_figures(figures, result)
    _cluster_figures(figures, args, model, result)
    trajectories = _trajectories(figures, args, out, model, result)
    stars = _cluster_files(args, out, result, particle_files=particle_files)
    _write_report(args, out, folder, result, figures.entries, trajectories)
    _print_summary(args, out, result, figures.entries, trajectories, stars=stars)
    return 0


@dataclasses.dataclass(frozen=True)
class _Analysis:
    """The images analysed and what :func:`_analyse` found in their z."""

    data: ImageDataset
    z: np.ndarray
    rows: np.ndarray  # the input row of each image
    pcs: analysis.PCAResult
    clusters: analysis.KMeansResult
    embedding: np.ndarray | None  # UMAP, unless skipped
    truths: dict[str, dict]

    @property
    def labels(self) -> np.ndarray:
        return self.clusters.labels


class _Figures:
    """The figures written to ``out``, as ``(caption, path)`` in the report's order."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.entries: list[tuple[str, Path]] = []

    def save(self, caption: str, fig, name: str) -> None:
        self.entries.append((caption, _save_figure(fig, self.out / name)))

    def add(self, caption: str, path: Path) -> None:
        self.entries.append((caption, path))


def _load_input(args: argparse.Namespace, config: dict, model) -> tuple[ImageDataset, bool]:
    """The images to analyse, checked against the model (and whether they come from particle files)."""
    data, particle_files = _load(args, config, model)
    data = as_dataset(data, model.image_shape, name=data.name)
    runs.check_images(data, None, config["model"].get("likelihood", "bernoulli"))
    if args.ksample > len(data):
        raise UsageError(f"-k {args.ksample}: more clusters than the {len(data)} images")
    return data, particle_files


def _output_folder(args: argparse.Namespace, folder: runs.RunFolder) -> Path:
    """``--out`` (default ``RUN/analyze``), made ready: refused if it holds results unless ``--overwrite``,
    which clears them."""
    out = Path(args.out) if args.out else folder.root / "analyze"
    existing = out.is_dir() and any(p.is_file() for pattern in PATTERNS for p in out.glob(pattern))
    if existing and not args.overwrite:
        raise UsageError(f"{out} already holds analysis results; pass --overwrite to replace them")
    out = runs.prepare_output_folder(out, FIXED_OUTPUTS, overwrite=args.overwrite)
    if args.overwrite:
        _clear(out)
        for name in FIXED_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    return out


def _analyse(args: argparse.Namespace, guide, data: ImageDataset) -> _Analysis:
    """Posterior means z (seeded), their PCA, k-means clusters, UMAP and the known truths."""
    pyro.set_rng_seed(args.seed)
    summary = runs.posterior_summaries(guide, data, draws=2, batch_size=args.batch_size)
    if "z_mean" not in summary:
        raise UsageError(f"{args.run}: the guide has no z to analyse")
    z = summary["z_mean"].numpy().astype(np.float32)
    n = len(data)
    rows = np.arange(n) if data.source_index is None else data.source_index.numpy()
    pcs = analysis.pca(z)
    clusters = analysis.kmeans(z, args.ksample, seed=args.seed)
    embedding = None if args.skip_umap or n < 4 else analysis.umap_embedding(z, seed=args.seed)
    truths = _truths(data, clusters.labels, args.truth_bins)
    return _Analysis(data, z, rows, pcs, clusters, embedding, truths)


def _save_arrays(out: Path, result: _Analysis) -> None:
    _save_npy(out / "z.npy", result.z)
    _save_npy(out / "rows.npy", result.rows.astype(np.int64))
    _save_npy(out / "pca.npy", result.pcs.coords.astype(np.float32))
    _save_npy(out / "kmeans_labels.npy", result.labels)
    _save_npy(out / "centers.npy", result.clusters.centers)
    if result.embedding is not None:
        _save_npy(out / "umap.npy", result.embedding)


def _embedding_figures(figures: _Figures, result: _Analysis) -> None:
    """PCA (and UMAP) of z coloured by density, by cluster and by each known truth."""
    from .. import analysis_plots

    views = [("pca", "PCA", result.pcs.coords[:, :2], "PC")]
    if result.embedding is not None:
        views.append(("umap", "UMAP", result.embedding, "UMAP"))
    for key, title, points, axis in views:
        density = analysis.point_density(points)
        figures.save(
            f"{title} of z, coloured by point density",
            analysis_plots.embedding_figure(
                points, density, title=f"{title}: density", axis_label=axis, colour_label="density"
            ),
            f"{key}_density.png",
        )
        figures.save(
            f"{title} of z, coloured by k-means cluster",
            analysis_plots.clusters_figure(
                points, result.labels, title=f"{title}: k-means clusters", axis_label=axis
            ),
            f"{key}_clusters.png",
        )
        for name, truth in result.truths.items():
            figures.save(
                f"{title} of z, coloured by the true {name}",
                analysis_plots.embedding_figure(
                    points,
                    truth["values"],
                    title=f"{title}: true {name}",
                    axis_label=axis,
                    colour_label=name,
                    categorical=truth["discrete"],
                ),
                f"{key}_{name}.png",
            )


def _cluster_figures(figures: _Figures, args: argparse.Namespace, model, result: _Analysis) -> None:
    """The cluster centres decoded upright, and a montage of each cluster's members (seeded picks)."""
    from .. import analysis_plots, plots

    centres = analysis.decode_upright(model, result.clusters.centers)
    figures.save(
        "k-means cluster centres decoded upright (theta = 0, dx = 0)",
        plots.image_grid_figure(centres, columns=min(10, args.ksample), title="cluster centres 0..K-1"),
        "cluster_centers.png",
    )
    rng = np.random.default_rng(args.seed)
    members = []
    for k in range(args.ksample):
        index = np.flatnonzero(result.labels == k)
        pick = np.sort(rng.choice(index, size=min(8, len(index)), replace=False)) if len(index) else index
        members.append(result.data.images[torch.as_tensor(pick, dtype=torch.long)])
    figures.save(
        "each cluster: its centre decoded upright (framed) and member particles as given",
        analysis_plots.cluster_montage_figure(centres, members, sizes=result.clusters.sizes),
        "cluster_members.png",
    )


def _trajectories(
    figures: _Figures, args: argparse.Namespace, out: Path, model, result: _Analysis
) -> list[str]:
    """z along each of the first ``--pc`` PCs decoded upright: ``_z.npy``, ``.mrcs``, ``.gif``, ``.png``;
    returns their stems."""
    from .. import analysis_plots, plots

    data = result.data
    pixel_size = data.info.get("pixel_size")
    if pixel_size is None and data.ctf is not None:
        pixel_size = float(data.ctf.pixel_size[0])
    stems = []
    for component in range(min(args.pc, result.z.shape[1])):
        path_z, t = analysis.pc_trajectory(result.pcs, component, steps=max(2, args.steps))
        images = analysis.decode_upright(model, path_z)
        stem = f"pc{component + 1}_trajectory"
        _save_npy(out / f"{stem}_z.npy", path_z)
        _write_mrcs(out / f"{stem}.mrcs", images, pixel_size)
        plots.traversal_animation(model, out / f"{stem}.gif", latents=(path_z, t, f"PC {component + 1}"))
        figures.save(
            f"z along PC {component + 1} (5th to 95th percentile), decoded upright",
            analysis_plots.trajectory_figure(images, t, title=f"PC {component + 1} trajectory"),
            f"{stem}.png",
        )
        figures.add(f"PC {component + 1} trajectory (animation)", out / f"{stem}.gif")
        stems.append(stem)
    return stems


def _cluster_files(
    args: argparse.Namespace, out: Path, result: _Analysis, *, particle_files: bool
) -> list[str]:
    """Each cluster's selection (``cluster_<k>.ind.npy``); for particle files also the STAR (and .cs)
    files with the clusters as classes. Returns the names of the STAR/.cs files written."""
    labels, data = result.labels, result.data
    for k in range(args.ksample):
        _save_npy(out / f"cluster_{k}.ind.npy", np.sort(result.rows[labels == k]).astype(np.int64))
    classes = labels + 1
    stars = []
    if particle_files:
        stars.append(write_class_star(out / "particles_clusters.star", data, classes).name)
        for k in range(args.ksample):
            stars.append(write_class_star(out / f"cluster_{k}.star", data, classes, select=labels == k).name)
        if data.info.get("cs") is not None:
            stars.append(write_class_cs(out / "particles_clusters.cs", data, classes).name)
            for k in range(args.ksample):
                stars.append(write_class_cs(out / f"cluster_{k}.cs", data, classes, select=labels == k).name)
    return stars


def _write_report(
    args: argparse.Namespace,
    out: Path,
    folder: runs.RunFolder,
    result: _Analysis,
    figures: list[tuple[str, Path]],
    trajectories: list[str],
) -> None:
    """``analysis.json``, ``analysis.ipynb`` and ``index.html`` (every figure embedded)."""
    import nbformat

    from ..analysis_report import analysis_notebook, html_report

    report = {
        "run": str(folder.root),
        "data": result.data.name,
        "n": len(result.data),
        "z_dim": result.z.shape[1],
        "seed": args.seed,
        "k": args.ksample,
        "cluster_sizes": result.clusters.sizes.tolist(),
        "explained_variance_ratio": result.pcs.explained_variance_ratio.tolist(),
        "umap": result.embedding is not None,
        "truth": {name: {k: v for k, v in t.items() if k != "values"} for name, t in result.truths.items()},
        "figures": [path.name for _, path in figures],
        "trajectories": trajectories,
    }
    runs.write_json(out / "analysis.json", report)
    notebook = analysis_notebook(
        run=str(folder.root), has_umap=result.embedding is not None, truths=list(result.truths)
    )
    atomic_write(out / "analysis.ipynb", lambda tmp: nbformat.write(notebook, tmp))
    files = sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith("."))
    files = sorted({*files, "index.html"})
    page = html_report(f"pyro-svae analyze: {folder.root.name} ({result.data.name})", report, figures, files)
    atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


def _print_summary(
    args: argparse.Namespace,
    out: Path,
    result: _Analysis,
    figures: list[tuple[str, Path]],
    trajectories: list[str],
    *,
    stars: list[str],
) -> None:
    data, z_dim, sizes = result.data, result.z.shape[1], result.clusters.sizes.tolist()
    print(f"{data.name}: {len(data)} images, z_dim {z_dim}, {args.ksample} clusters of {sizes}")
    for name, truth in result.truths.items():
        how = f" ({truth['binning']})" if truth["binning"] else ""
        print(f"purity against the true {name}{how}: {truth['purity']:.3f}")
    print(f"{len(figures)} figures, {len(trajectories)} trajectories; open {out / 'index.html'}")
    if stars:
        print("particles_clusters.star: rlnClassNumber = cluster + 1; rlnImageName as in the input")
