"""examples/quickstart.ipynb runs from top to bottom in a kernel of the test venv, as a user would (on fewer images)."""

import shutil

import pytest

import nbformat
from nbclient import NotebookClient

from conftest import CIFAR10_HEAD, REPO


SMALLER = [("data.train_limit=3000", "data.train_limit=1000"), ("analysis.tsne.samples=1000", "analysis.tsne.samples=300")]


@pytest.mark.slow
def test_quickstart_notebook_executes_every_cell(tmp_path, monkeypatch):
    # a copy beside a copy of configs/, so the notebook's relative paths hold and its runs/ stay in tmp_path
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "examples").mkdir()
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    # fewer images than a user trains on, as papermill would inject them: every cell still runs
    (train,) = [cell for cell in notebook.cells if "cifarlab.fit(" in cell.source]
    for old, new in SMALLER:
        assert old in train.source, old
        train.source = train.source.replace(old, new)
    monkeypatch.setenv("CIFARLAB_CIFAR10_HEAD", str(CIFAR10_HEAD))
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path / "examples")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "data: " in text and "validation accuracy per epoch: [(1, " in text
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("test accuracy" in p and "data:image/png;base64," in p for p in pages)  # the Run's summary and curves
    assert any("epoch 1  loss" in p and "val_acc" in p for p in pages)  # the notebook progress display
    assert any("epoch 1  loss" in p and "weights: best)" in p for p in pages)  # ... ending with the tested weights
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the predictions figure and the t-SNE panel
    runs = list((tmp_path / "examples" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "plots" / "tsne_fc1.png").is_file()
