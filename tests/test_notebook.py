"""experiments/quickstart.ipynb runs top to bottom (at a reduced size), so it never rots."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_quickstart_notebook_is_generated_from_its_script(monkeypatch):
    import nbformat

    mod = load_script(monkeypatch, "experiments/make_quickstart.py")
    on_disk = nbformat.read(ROOT / "experiments" / "quickstart.ipynb", as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in mod.build().cells], \
        "quickstart.ipynb is stale: run python experiments/make_quickstart.py"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("QUICKSTART_TOKENS", "8192")
    monkeypatch.setenv("QUICKSTART_OUT", str(tmp_path / "out"))
    nb = nbformat.read(ROOT / "experiments" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "out" / "rotation.png").is_file()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "before: Monday" in outputs
