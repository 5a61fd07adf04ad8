"""The tutorials run top to bottom (at smoke size) and are committed with the outputs of a full run."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = {
    "01_quickstart.ipynb",
    "02_pose_priors.ipynb",
    "03_guides_and_inference.ipynb",
    "04_pose_search.ipynb",
    "05_cryoem.ipynb",
    "06_galaxies.ipynb",
}


def _has_python3_kernel() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return False
    return True


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_tutorials_are_all_there():
    assert EXPECTED <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_carries_the_outputs_of_a_full_run(path):
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes"
    notebook = nbformat.read(path, as_version=4)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    cells = _code_cells(notebook)
    first = cells[0]
    assert "PYRO_SVAE_SMOKE" in first.source, "the first code cell must read the smoke flag"
    assert "!pip" not in "".join(cell.source for cell in cells)
    text = "".join(o.get("text", "") for o in first.outputs if o.output_type == "stream")
    assert "full run" in text, "the committed outputs must come from a full (not smoke) run"
    assert all(cell.execution_count is not None for cell in cells), "every code cell executed"
    outputs = [o for cell in cells for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3, "plots visible to a reader"
    counts = [cell.execution_count for cell in cells]
    assert counts == sorted(counts), "executed top to bottom in one session"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_at_smoke_size(path, monkeypatch):
    if not _has_python3_kernel():
        pytest.skip("no Jupyter kernel named 'python3' (python -m ipykernel install --user --name python3)")
    monkeypatch.setenv("PYRO_SVAE_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: extra threads only add contention
    before = path.read_bytes()
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(TUTORIALS)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
    first = "".join(o.get("text", "") for o in _code_cells(notebook)[0].outputs if o.output_type == "stream")
    assert "smoke run" in first
    assert all(cell.execution_count is not None for cell in _code_cells(notebook))
    assert path.read_bytes() == before, "the executed notebook must not be written back"
