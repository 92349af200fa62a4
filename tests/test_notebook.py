"""notebooks/scaling.ipynb runs top to bottom over a results folder, and is committed cleared or executed whole."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.synthetic import make_comm, make_sweep

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "scaling.ipynb"
REFERENCE = ROOT / "results" / "reference"


def execute(env: dict, monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits this environment and starts in notebooks/, as Jupyter would run it.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}},
                   ).execute()
    return nb


def outputs_text(nb) -> str:
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebook_is_committed_cleared_or_run_top_to_bottom():
    """Outputs, when committed (executed over the reference so it reads in any viewer), come from one run of every
    cell in order, with no error among them."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    if all(c.outputs == [] and n is None for c, n in zip(code, counts)):
        return
    assert counts == list(range(1, len(code) + 1)), "run every cell top to bottom in a fresh kernel before a commit"
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"], "a committed cell failed"


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
def test_notebook_runs_over_a_results_folder(tmp_path, monkeypatch):
    sweep, comm = make_sweep(tmp_path / "sweep"), make_comm(tmp_path / "comm")
    nb = execute({"ALURE_RESULTS": sweep, "ALURE_COMM": comm}, monkeypatch)
    text = outputs_text(nb)
    assert str(sweep) in text and "alpha-beta-gamma fit" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 5  # efficiency, memory, breakdown, measured vs predicted, crossover + extrapolation


@pytest.mark.slow  # seconds of subprocesses and analysis: not for the quick loop
@pytest.mark.skipif(not (REFERENCE / "points").is_dir(), reason="no committed reference results in results/reference/")
def test_notebook_runs_over_the_committed_reference_by_default(monkeypatch):
    monkeypatch.delenv("ALURE_RESULTS", raising=False)
    monkeypatch.delenv("ALURE_COMM", raising=False)
    nb = execute({}, monkeypatch)
    assert "results/reference" in outputs_text(nb)
