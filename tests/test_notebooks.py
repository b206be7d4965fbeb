"""The notebooks run top to bottom from a report path (the shipped demo report by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the notebook tools come with the dev extra (pip install -e ".[dev]"); without them these tests are skipped, not
# a collection error (seen: `pytest -k cuda` on a GPU machine that had pytest but not nbformat)
nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (the dev extra brings it)")
NotebookClient = pytest.importorskip("nbclient", reason="nbclient is not installed (the dev extra brings it)").NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _kernel_name() -> str:
    """The python3 kernel; jupyter_client provides it for the running interpreter when ipykernel is installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" not in specs:
        pytest.skip(f"no python3 Jupyter kernel for {sys.executable}; install ipykernel")
    return "python3"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layerwise", "rank_planning", "students"])
def test_notebook_executes(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "outputs not stripped"
    client = NotebookClient(notebook, kernel_name=_kernel_name(), timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= {"layerwise": 7, "rank_planning": 2, "students": 3}[name]
