"""The self-contained HTML report and the Jupyter notebook of ``pyro-svae analyze`` (returned as text and
as a notebook object; the caller writes them)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["html_report", "analysis_notebook"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; color: #222; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; text-align: center; }
figure img { max-width: 520px; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; font-size: 0.9em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _embed(path: Path) -> str:
    mime = {".png": "image/png", ".gif": "image/gif"}[path.suffix.lower()]
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(path.name)}">'


def html_report(
    title: str,
    summary: Mapping[str, Any],
    figures: Sequence[tuple[str, Path]],
    files: Sequence[str],
) -> str:
    """An HTML page with every figure embedded (base64 PNG/GIF: the page needs no other file), a table of
    cluster sizes (and the share of each cluster's most common truth class, per known truth), the
    purities, and the list of ``files``. ``figures`` are ``(caption, path)``; ``summary`` as
    ``analysis.json``."""
    sizes = summary["cluster_sizes"]
    truths = summary.get("truth", {})
    head = "".join(f"<th>{html.escape(name)} majority</th>" for name in truths)
    rows = []
    for k, size in enumerate(sizes):
        cells = "".join(
            f"<td>{html.escape(str(t['majority'][k]))} ({t['majority_share'][k]:.2f})</td>"
            for t in truths.values()
        )
        rows.append(f"<tr><td>{k}</td><td>{k + 1}</td><td>{size}</td>{cells}</tr>")
    purity = "".join(
        f"<li>{html.escape(name)}{' (' + html.escape(t['binning']) + ')' if t.get('binning') else ''}: "
        f"purity <b>{t['purity']:.3f}</b></li>"
        for name, t in truths.items()
    )
    variance = ", ".join(f"{v:.3f}" for v in summary.get("explained_variance_ratio", []))
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{summary['n']} images, z_dim {summary['z_dim']}, k-means with {len(sizes)} clusters "
        f"(seed {summary['seed']}). Explained variance ratio of the principal components: {variance}.</p>",
        "<h2>Clusters</h2>",
        f"<table><tr><th>cluster</th><th>rlnClassNumber</th><th>images</th>{head}</tr>",
        *rows,
        "</table>",
    ]
    if purity:
        parts += [
            "<p>Purity against the known truth (the fraction of images whose cluster's most common "
            "truth class is their own):</p>",
            f"<ul>{purity}</ul>",
        ]
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        parts.append(f"<figure>{_embed(path)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Files</h2><ul>")
    parts += [f"<li><code>{html.escape(name)}</code></li>" for name in files]
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def analysis_notebook(*, run: str, has_umap: bool, truths: Sequence[str]):
    """A notebook (``nbformat`` v4) that loads ``z.npy``, ``pca.npy``, ``umap.npy``, ``kmeans_labels.npy``
    and ``analysis.json`` from its own folder, re-plots them, and shows how to save a new selection."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    cells = [
        new_markdown_cell(
            "# Latent analysis of a pyro_svae run\n\n"
            f"Written by `pyro-svae analyze` for the run `{run}`. Run it from its own folder: it reads "
            "`z.npy` (posterior means, input order), `pca.npy`, `umap.npy`, `kmeans_labels.npy`, "
            "`centers.npy` and `analysis.json` there."
        ),
        new_code_cell(
            "import json\n"
            "from pathlib import Path\n\n"
            "import matplotlib.pyplot as plt\n"
            "import numpy as np\n\n"
            "here = Path('.')\n"
            "z = np.load(here / 'z.npy')\n"
            "pc = np.load(here / 'pca.npy')\n"
            "labels = np.load(here / 'kmeans_labels.npy')\n"
            "centers = np.load(here / 'centers.npy')\n"
            "summary = json.loads((here / 'analysis.json').read_text())\n"
            f"umap_xy = np.load(here / 'umap.npy') if {has_umap!r} else None\n"
            "print(z.shape, 'clusters:', summary['cluster_sizes'])"
        ),
        new_markdown_cell("## Principal components, coloured by k-means cluster"),
        new_code_cell(
            "def scatter(xy, colour, title, ax):\n"
            "    xy = xy if xy.shape[1] > 1 else np.column_stack([xy[:, 0], np.zeros(len(xy))])\n"
            "    art = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=4, cmap='tab10' if colour is labels "
            "else 'viridis')\n"
            "    ax.set_title(title)\n"
            "    return art\n\n"
            "panels = [('PCA', pc)] + ([('UMAP', umap_xy)] if umap_xy is not None else [])\n"
            "fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)\n"
            "for ax, (name, xy) in zip(axes[0], panels):\n"
            "    scatter(xy, labels, f'{name} by cluster', ax)\n"
            "plt.show()"
        ),
        new_markdown_cell(
            "## Known truth\n\nFor data with ground truth (simulated particles), `analysis.json` holds the "
            "purity of the clusters against it."
        ),
        new_code_cell(
            "for name, truth in summary.get('truth', {}).items():\n"
            "    print(f\"{name}: purity {truth['purity']:.3f} ({truth.get('binning') or 'discrete'})\")\n"
            f"# truths known for this run: {list(truths)!r}"
        ),
        new_markdown_cell(
            "## A new selection\n\nPick clusters (0-based) and save their particles as a selection file "
            "(0-based input rows) for `pyro-svae train --ind` or `pyro-svae encode --ind`."
        ),
        new_code_cell(
            "keep = [0]\n"
            "rows = np.load(here / 'rows.npy')  # the input row of each analysed image\n"
            "selection = np.sort(rows[np.isin(labels, keep)])\n"
            "print(len(selection), 'particles selected')\n"
            "# np.save(here / 'my_selection.ind.npy', selection)"
        ),
        new_markdown_cell(
            "## Decode new points\n\nTo decode any `z` upright, load the run:\n\n"
            "```python\n"
            "from pyro_svae import runs, analysis\n"
            f"folder, config, model, guide, _ = runs.load_trained({run!r})\n"
            "images = analysis.decode_upright(model, centers)\n"
            "```"
        ),
    ]
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.validate(notebook)
    return notebook
