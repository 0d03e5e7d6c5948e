"""Every notebook in notebooks/ runs top to bottom (nbclient, the ``python3`` kernel of this interpreter)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (pip install 'tokenflow-video[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (pip install 'tokenflow-video[dev]')")
pytest.importorskip("ipykernel", reason="ipykernel not installed (pip install 'tokenflow-video[dev]')")


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs_and_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), "clear outputs before committing"
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    km = client.create_kernel_manager()
    # jupyter_client starts the kernel spec's "python" with sys.executable: this interpreter (the venv)
    assert km.format_kernel_cmd()[0] == sys.executable, km.format_kernel_cmd()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
