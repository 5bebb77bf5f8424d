"""The example notebooks run from top to bottom on small subsets (so they never rot)."""

import os
from pathlib import Path

import pytest
from helpers import shared_cifar

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))


@pytest.mark.skipif(shared_cifar() is None, reason="CIFAR-10 not present (set XPNET_DATA_DIR)")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_notebook_runs(path, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("XPNET_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XPNET_DATA_DIR", str(shared_cifar()))
    monkeypatch.setenv("XPNET_BACKEND", os.environ.get("XPNET_NOTEBOOK_BACKEND", "numpy"))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" or "image/png" in o.get("data", {}) for o in outputs)


def test_there_are_notebooks():
    assert {p.name for p in EXAMPLES} >= {
        "two_layer_net.ipynb",
        "fully_connected_nets.ipynb",
        "convolutional_networks.ipynb",
        "fast_cifar10.ipynb",
    }
