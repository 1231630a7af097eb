"""The teaching notebooks in notebooks/ run top to bottom and draw their figures.

Each notebook is executed from a fresh kernel in its fast mode (NOTEBOOK_FAST=1: fewer steps, samples and
sequence lengths, the same code), as a reader's Jupyter would run it: working directory notebooks/, kernel
"python3" (the interpreter running pytest, through ipykernel). A cell that raises fails the test with the
cell's traceback; a notebook that draws no figure (no image/png output) fails too. Nothing is written back:
the committed notebooks keep the outputs of their full-size run. TMPDIR points the kernel's run folders
(tempfile.mkdtemp in the notebooks) into pytest's tmp_path, which pytest cleans up.
"""
import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements.txt (nbclient, nbformat, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements.txt (nbclient, nbformat, ipykernel)")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 4, f"expected the four teaching notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_fast_mode(path, monkeypatch, tmp_path):
    monkeypatch.setenv("NOTEBOOK_FAST", "1")          # the kernel inherits the environment
    monkeypatch.setenv("TMPDIR", str(tmp_path))       # the notebooks' run folders land in tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()                                  # raises CellExecutionError (with the traceback) on any error
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{os.path.basename(path)} produced no figure"
