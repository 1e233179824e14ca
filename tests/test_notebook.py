"""The quickstart notebook runs top to bottom at a tiny size (a real Flower simulation)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from fedaug_flwr.results import read_summary

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.simulation
def test_quickstart_notebook_runs_at_a_tiny_size(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAUG_NOTEBOOK_TINY", "1")  # the kernel inherits this environment
    monkeypatch.setenv("FEDAUG_NOTEBOOK_OUTPUT", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=400,
        kernel_name="python3",
        resources={"metadata": {"path": NOTEBOOK.parent}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails

    summary = read_summary(tmp_path / "run")
    assert summary is not None
    assert summary["config"]["num-synthetic"] == 40  # the notebook's tiny run config, not a default
    assert summary["config"]["cvae-rounds"] == 1 and summary["data"]["num-clients"] == 3
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    # label distributions, CVAE samples, per-round curves, imputation example
    assert len(images) == 4
    for name in ("label_distributions.png", "cvae_samples.png", "imputation_example.png"):
        assert (tmp_path / "run" / name).stat().st_size > 5_000
