"""The teaching notebooks in notebooks/: they run, they check their own claims, and they follow the house layout.

Every notebooks/*.ipynb is executed from a fresh kernel in its fast mode (NOTEBOOK_FAST=1: fewer steps, samples and
sequence lengths, the same code), as a reader's Jupyter would run it: working directory notebooks/, kernel "python3"
(the interpreter running pytest, through ipykernel). The notebooks assert their own quantitative claims in their
cells, and their exercise solutions (cells tagged `solution`) assert their answers, so a notebook whose text and
numbers disagree fails here with the cell's traceback. While it runs, every figure it shows is checked: each panel
that has axes (not a diagram drawn with `axis("off")`) has both axis labels (a shared axis counts once), a legend
when it has more than one labelled line, and, when its y label speaks of accuracy or of completions correct, a y
range inside [0, 1] (an accuracy is a fraction, whatever interval is drawn around it). Nothing is written back:
the committed notebooks keep the outputs of their full-size run. TMPDIR points the kernel's run folders
(tempfile.mkdtemp in the notebooks) into pytest's tmp_path, which pytest cleans up.

Without executing anything, each committed notebook must also have: a first cell that links the paper and the
README's glossary; an "Exercises" heading, then a "Solutions" heading, then at least one solution cell, every one
of them tagged `solution` and collapsed (`"jupyter": {"source_hidden": true}`); and the outputs of one top-to-bottom
run (every code cell executed, in order, no errors, at least one figure).
"""
import glob
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install -r requirements.txt (nbclient, nbformat, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -r requirements.txt (nbclient, nbformat, ipykernel)")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
PAPER = "https://arxiv.org/abs/2512.21852"
GLOSSARY = "README.md#glossary"

# Run first in the kernel: checks every figure when it is shown (plt.show, or the inline backend's end-of-cell flush)
FIGURE_CHECK = '''
import functools as _functools
import matplotlib.pyplot as _plt
import matplotlib_inline.backend_inline as _inline
_FIGURE_PROBLEMS, _FIGURES_SEEN = [], []


def _check_open_figures():
    for _num in _plt.get_fignums():
        _fig = _plt.figure(_num)
        if getattr(_fig, "_hygiene_checked", False):
            continue
        _fig._hygiene_checked = True
        _FIGURES_SEEN.append(_num)
        for _ax in _fig.axes:
            if _ax.get_label() == "<colorbar>" or not _ax.axison:      # a colour bar, or a diagram drawn axis-off
                continue
            _where = f"figure {len(_FIGURES_SEEN)}, panel {_ax.get_title()[:50]!r}"
            for _axis in ("x", "y"):
                _siblings = (_ax.get_shared_x_axes() if _axis == "x" else _ax.get_shared_y_axes()).get_siblings(_ax)
                if not any((_a.get_xlabel() if _axis == "x" else _a.get_ylabel()) for _a in _siblings):
                    _FIGURE_PROBLEMS.append(f"{_where}: no {_axis} label")
            _ylabels = " ".join(_a.get_ylabel() for _a in _ax.get_shared_y_axes().get_siblings(_ax)).lower()
            _bottom, _top = _ax.get_ylim()
            if ("accuracy" in _ylabels or "correct" in _ylabels) and not (-1e-9 <= _bottom and _top <= 1 + 1e-9):
                _FIGURE_PROBLEMS.append(f"{_where}: an accuracy axis beyond [0, 1]: {_bottom:.2f} to {_top:.2f}")
            _names = _ax.get_legend_handles_labels()[1]
            if len(_names) > 1 and _ax.get_legend() is None:
                _FIGURE_PROBLEMS.append(f"{_where}: {len(_names)} labelled lines and no legend")


def _checked(_show):
    @_functools.wraps(_show)                         # keeps the inline backend's show._draw_called and _to_draw
    def _show_checked(*args, **kwargs):
        _check_open_figures()
        return _show(*args, **kwargs)
    return _show_checked


_plt.show, _inline.show = _checked(_plt.show), _checked(_inline.show)
'''
FIGURE_REPORT = '''
_check_open_figures()
assert _FIGURES_SEEN, "the notebook showed no figure"
assert not _FIGURE_PROBLEMS, "figure hygiene: " + "; ".join(_FIGURE_PROBLEMS)
'''


def headings(nb):
    """(cell index, heading text) of every markdown heading line."""
    return [(i, line.lstrip("#").strip()) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
            for line in c.source.splitlines() if re.match(r"#{1,6}\s", line)]


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 4, f"expected the teaching notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_layout_and_committed_outputs(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and PAPER in first.source and GLOSSARY in first.source, \
        "the first cell links the paper and the README's glossary"
    exercises = [i for i, h in headings(nb) if h.lower().startswith("exercises")]
    solutions = [i for i, h in headings(nb) if h.lower().startswith("solutions")]
    assert exercises and solutions and exercises[0] < solutions[0], "an Exercises heading, then a Solutions heading"
    tagged = [i for i, c in enumerate(nb.cells) if "solution" in c.metadata.get("tags", [])]
    assert any(nb.cells[i].cell_type == "code" for i in tagged), "at least one solution code cell (tag: solution)"
    assert min(tagged) > solutions[0], "solution cells come after the Solutions heading"
    assert all(nb.cells[i].metadata.get("jupyter", {}).get("source_hidden") for i in tagged), "solutions collapsed"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        "committed with the outputs of one top-to-bottom run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], "committed with its figures"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_fast_mode(path, monkeypatch, tmp_path, request):
    nb = nbformat.read(path, as_version=4)
    if any("real_model" in c.source for c in nb.cells if c.cell_type == "code"):
        request.getfixturevalue("smollm2")            # the real model, converted once; $KL_RL_CACHE tells the kernel
    monkeypatch.setenv("NOTEBOOK_FAST", "1")          # the kernel inherits the environment
    monkeypatch.setenv("TMPDIR", str(tmp_path))       # the notebooks' run folders land in tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb.cells = [nbformat.v4.new_code_cell(FIGURE_CHECK)] + nb.cells + [nbformat.v4.new_code_cell(FIGURE_REPORT)]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()                                  # raises CellExecutionError (with the traceback) on any error
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], f"{os.path.basename(path)} produced no figure"
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", []) and c.cell_type == "code"]
    assert solutions and all(c.execution_count for c in solutions), "the solution cells ran"
