"""Both notebooks execute top to bottom, headless, on the synthetic fixture with short runs."""

import pytest

from conftest import ROOT


@pytest.mark.parametrize("name", ["01_movielens_data.ipynb", "02_train_and_inspect.ipynb"])
def test_notebook_executes(name, ml1m_dir, tmp_path, monkeypatch):
    import nbformat  # here, not at the top: its schema checks take 4 s of every worker's start
    from nbclient import NotebookClient

    monkeypatch.setenv("MOVIELENS_REPO", str(ROOT))
    monkeypatch.setenv("MOVIELENS_DATA_DIR", str(ml1m_dir))
    monkeypatch.setenv("MOVIELENS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MOVIELENS_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for cell in notebook.cells for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images and not [o for cell in notebook.cells for o in cell.get("outputs", [])
                           if o.get("output_type") == "error"]
    if name.startswith("02"):
        assert list(tmp_path.glob("models/*/best.pt")) and list(tmp_path.glob("models/*/curves.png"))
