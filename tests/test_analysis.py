"""Latent analysis: the library (:mod:`pyro_svae.analysis`) and ``pyro-svae analyze``."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import nbformat
import numpy as np
import pytest
import starfile
import torch
from PIL import Image

from pyro_svae import analysis
from pyro_svae.cli import main
from pyro_svae.data import load_particles, write_class_cs, write_class_star

TINY = ["--hidden-dim", "16", "--eval-particles", "2", "--posterior-draws", "3", "--no-progress"]


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [10, 0, 0, 0], [0, 10, 0, 0]], dtype=np.float64)
    truth = rng.integers(0, 3, 300)
    return centres[truth] + rng.normal(0, 0.5, (300, 4)), truth


def test_kmeans_recovers_separated_clusters_with_purity_one():
    z, truth = _blobs()
    result = analysis.kmeans(z, 3, seed=0)
    assert analysis.purity(result.labels, truth) == 1.0
    assert sorted(result.sizes.tolist()) == sorted(np.bincount(truth).tolist())
    # the particle nearest each centre belongs to that centre's cluster
    assert (result.labels[result.nearest] == np.arange(3)).all()
    # more clusters than truth classes are still pure; one cluster for three classes is not
    assert analysis.purity(analysis.kmeans(z, 6, seed=0).labels, truth) == 1.0
    one = analysis.purity(np.zeros(300, dtype=int), truth)
    assert one == pytest.approx(np.bincount(truth).max() / 300)
    with pytest.raises(ValueError, match="clusters"):
        analysis.kmeans(z[:2], 3)


def test_binned_continuous_truth_and_contingency_table():
    values = np.linspace(0.0, 1.0, 100)
    bins, edges = analysis.bin_truth(values, 4)
    assert np.bincount(bins).tolist() == [25, 25, 25, 25] and edges[0] == 0.0 and edges[-1] == 1.0
    clusters = (values > 0.5).astype(int)  # two clusters, each spanning two bins
    table, classes = analysis.cluster_truth_table(clusters, bins)
    assert table.tolist() == [[25, 25, 0, 0], [0, 0, 25, 25]] and classes.tolist() == [0, 1, 2, 3]
    assert analysis.purity(clusters, bins) == 0.5
    assert analysis.purity(bins, bins) == 1.0


def test_pca_and_trajectory_follow_the_main_axis():
    rng = np.random.default_rng(1)
    t = rng.uniform(-2, 2, 500)
    direction = np.array([3.0, 4.0, 0.0]) / 5.0
    z = 1.0 + t[:, None] * direction + rng.normal(0, 0.01, (500, 3))
    pcs = analysis.pca(z)
    assert pcs.coords.shape == (500, 3) and pcs.explained_variance_ratio[0] > 0.99
    np.testing.assert_allclose(pcs.components[0], direction, atol=1e-3)  # sign: largest component > 0
    path, values = analysis.pc_trajectory(pcs, 0, steps=7)
    assert path.shape == (7, 3) and np.all(np.diff(values) > 0)
    low, high = np.percentile(pcs.coords[:, 0], [5, 95])
    assert values[0] == pytest.approx(low, rel=1e-5) and values[-1] == pytest.approx(high, rel=1e-5)
    # every point on the line through the mean along the axis
    offsets = path - pcs.mean
    np.testing.assert_allclose(offsets, values[:, None] * direction[None], atol=2e-3)
    with pytest.raises(ValueError, match="component"):
        analysis.pc_trajectory(pcs, 3)


def test_point_density_is_highest_in_the_crowd():
    rng = np.random.default_rng(2)
    points = np.concatenate([rng.normal(0, 0.1, (200, 2)), rng.uniform(-5, 5, (20, 2))])
    density = analysis.point_density(points, bins=32)
    assert density[:200].mean() > 10 * density[200:].mean()


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis-sim")
    argv = ["simulate-particles", "--out", str(root), "--n", "40", "--box", "16", "--seed", "3"]
    assert main(argv) == 0
    return root / "particles.star"


def test_class_star_and_cs_subsets_keep_the_input_rows(particles, tmp_path):
    data = load_particles(particles)
    original = starfile.read(particles, always_dict=True)
    classes = np.arange(40) % 3 + 1
    sub = data.subset(np.arange(40)[::-1].copy())  # any order: rows come back in input order
    path = write_class_star(tmp_path / "all.star", sub, classes[::-1].copy())
    table = starfile.read(path, always_dict=True)
    assert "optics" in table and table["particles"]["rlnImageName"].tolist() == (
        original["particles"]["rlnImageName"].tolist()
    )
    assert table["particles"]["rlnClassNumber"].tolist() == classes.tolist()
    picked = write_class_star(tmp_path / "two.star", data, classes, select=classes == 2)
    rows = starfile.read(picked, always_dict=True)["particles"]
    assert rows["rlnImageName"].tolist() == original["particles"]["rlnImageName"][classes == 2].tolist()
    # a .cs input: every input field kept, pyro_svae/class added
    cs = np.zeros(40, dtype=[("uid", "<u8"), ("blob/idx", "<u4")])
    cs["uid"], cs["blob/idx"] = np.arange(40) + 1000, np.arange(40)
    data.info["cs"] = cs
    written = np.load(write_class_cs(tmp_path / "two.cs", data, classes, select=classes == 2))
    assert written["uid"].tolist() == (np.flatnonzero(classes == 2) + 1000).tolist()
    assert set(written["pyro_svae/class"].tolist()) == {2} and "blob/idx" in written.dtype.names


@pytest.fixture(scope="module")
def particle_run(particles, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analysis-run")
    assert main(["train", "--particles", str(particles), "--out", str(root / "run"), *TINY]) == 0
    return root / "run"


def test_decode_upright_and_trajectory_gif(particle_run, tmp_path):
    from pyro_svae import plots, runs

    _, _, model, _, _ = runs.load_trained(particle_run)
    z = torch.zeros(3, model.z_dim)
    images = analysis.decode_upright(model, z)
    assert images.shape == (3, *model.image_shape)
    path = plots.traversal_animation(
        model,
        tmp_path / "t.gif",
        latents=(np.linspace(-1, 1, 4)[:, None].repeat(model.z_dim, 1), [0, 1, 2, 3], "x"),
    )
    assert Image.open(path).n_frames == 4


def test_analyze_writes_every_output_and_a_runnable_notebook(capsys, particle_run, particles):
    code = main(["analyze", str(particle_run), "-k", "3", "--steps", "4", "--seed", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "purity against the true conformation" in out
    folder = particle_run / "analyze"
    arrays = ["z.npy", "pca.npy", "umap.npy", "kmeans_labels.npy", "centers.npy", "rows.npy"]
    figures = [
        f"{view}_{kind}.png" for view in ("pca", "umap") for kind in ("density", "clusters", "conformation")
    ]
    figures += ["cluster_centers.png", "cluster_members.png", "pc1_trajectory.png", "pc2_trajectory.png"]
    trajectories = [f"pc{i}_trajectory.{ext}" for i in (1, 2) for ext in ("gif", "mrcs")]
    clusters = [f"cluster_{k}.{ext}" for k in range(3) for ext in ("ind.npy", "star")]
    expected = [*arrays, *figures, *trajectories, *clusters, "particles_clusters.star"]
    expected += ["index.html", "analysis.ipynb", "analysis.json"]
    assert not [name for name in expected if not (folder / name).is_file()]
    z = np.load(folder / "z.npy")
    labels = np.load(folder / "kmeans_labels.npy")
    assert z.shape == (40, 2) and labels.shape == (40,) and np.load(folder / "umap.npy").shape == (40, 2)
    assert np.load(folder / "centers.npy").shape == (3, 2)
    with mrcfile.open(folder / "pc1_trajectory.mrcs") as mrc:
        assert mrc.data.shape == (4, 16, 16)
    # z is the run's posterior mean, in input order (as particles.star of the run)
    trained = starfile.read(particle_run / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(z[:, 0], trained["pyroSvaeZ1"], rtol=1e-4, atol=1e-5)

    original = starfile.read(particles, always_dict=True)["particles"]
    every = starfile.read(folder / "particles_clusters.star", always_dict=True)["particles"]
    assert every["rlnImageName"].tolist() == original["rlnImageName"].tolist()
    assert every["rlnClassNumber"].tolist() == (labels + 1).tolist()
    assert set(original.columns) <= set(every.columns)
    for k in range(3):
        selection = np.load(folder / f"cluster_{k}.ind.npy")
        assert selection.tolist() == np.flatnonzero(labels == k).tolist()
        subset = starfile.read(folder / f"cluster_{k}.star", always_dict=True)["particles"]
        assert subset["rlnImageName"].tolist() == original["rlnImageName"].iloc[selection].tolist()
        assert set(subset["rlnClassNumber"]) == {k + 1}

    summary = json.loads((folder / "analysis.json").read_text())
    assert summary["cluster_sizes"] == np.bincount(labels, minlength=3).tolist()
    assert 0 < summary["truth"]["conformation"]["purity"] <= 1
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    assert page.count("data:image/gif;base64,") == 2 and "<table>" in page and 'src="' in page
    assert 'src="cluster' not in page  # nothing linked: self-contained

    from nbclient import NotebookClient

    notebook = nbformat.read(folder / "analysis.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(folder)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "clusters:" in printed and "purity" in printed

    # an existing analysis is kept unless --overwrite, which also drops clusters of an earlier -k
    assert main(["analyze", str(particle_run), "-k", "2", "--skip-umap"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    code = main(["analyze", str(particle_run), "-k", "2", "--skip-umap", "--pc", "1", "--overwrite"])
    assert code == 0, capsys.readouterr().err
    assert not (folder / "cluster_2.star").exists() and not (folder / "umap.npy").exists()
    assert not (folder / "pc2_trajectory.gif").exists() and (folder / "pc1_trajectory.gif").exists()


def test_analyze_a_selection_into_another_folder(capsys, particle_run, particles, tmp_path):
    keep = tmp_path / "keep.npy"
    np.save(keep, np.arange(5, 25))
    out = tmp_path / "sel"
    argv = ["analyze", str(particle_run), "--ind", str(keep), "-k", "2", "--skip-umap", "--pc", "1"]
    code = main([*argv, "--steps", "3", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert np.load(out / "rows.npy").tolist() == list(range(5, 25))
    selections = np.concatenate([np.load(out / f"cluster_{k}.ind.npy") for k in range(2)])
    assert sorted(selections.tolist()) == list(range(5, 25))  # indices into the input STAR
    table = starfile.read(out / "particles_clusters.star", always_dict=True)["particles"]
    original = starfile.read(particles, always_dict=True)["particles"]
    assert table["rlnImageName"].tolist() == original["rlnImageName"].iloc[5:25].tolist()
    assert main(["analyze", str(particle_run), "-k", "41", "-o", str(tmp_path / "x")]) == 2
    assert "more clusters" in capsys.readouterr().err
