"""The notebooks of notebooks/.

- Always (cheap, from the stored files): each notebook is stored executed, top to
  bottom, with its plots, no errors, modest size, and typed cells (jaxtyping's IPython
  extension with beartype).
- With BIOFLAX_EQX_NOTEBOOKS=1 (its own step of `make test`, since a kernel per notebook
  takes a while): each notebook runs top to bottom in a fresh kernel (nbclient), in
  small-data mode (BIOFLAX_EQX_NOTEBOOK_SMALL=1), offline, on the shared MNIST files.
"""

import json
import os
import pathlib
import time

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Stored outputs are PNGs at a modest dpi: keep the repository light.
MAX_BYTES = 1_000_000
TYPECHECK_MAGICS = ("%load_ext jaxtyping", "%jaxtyping.typechecker beartype.beartype")


def _ids(path: pathlib.Path) -> str:
    return path.stem


def _source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _has_png(cells: list[dict]) -> bool:
    return any(
        "image/png" in output.get("data", {})
        for cell in cells
        for output in cell.get("outputs", [])
    )


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_stored_notebook_is_executed_with_plots(path: pathlib.Path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} B"
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cells = _code_cells(notebook)
    counts = [cell["execution_count"] for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name} is not stored run top to bottom in one kernel: {counts}"
    )
    errors = [
        output
        for cell in cells
        for output in cell["outputs"]
        if output["output_type"] == "error"
    ]
    assert not errors, f"{path.name} stores an error: {errors[0].get('ename')}"
    assert _has_png(cells), f"{path.name} stores no plot"
    assert notebook["cells"][0]["cell_type"] == "markdown"
    assert _source(notebook["cells"][0]).startswith("# "), "the first cell is a title"
    code = "".join(map(_source, cells))
    assert "BIOFLAX_EQX_NOTEBOOK_SMALL" in code, "no small-data mode for the tests"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_typechecked(path: pathlib.Path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    first_code = _source(_code_cells(notebook)[0]).splitlines()
    assert [line.strip() for line in first_code[:2]] == list(TYPECHECK_MAGICS)


@pytest.fixture
def small_mode(monkeypatch: pytest.MonkeyPatch, mnist_dir: pathlib.Path) -> None:
    """The environment the kernels inherit: small data, CPU, the shared MNIST."""
    if os.environ.get("BIOFLAX_EQX_NOTEBOOKS") != "1":
        pytest.skip("set BIOFLAX_EQX_NOTEBOOKS=1 to execute the notebooks")
    monkeypatch.setenv("BIOFLAX_EQX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("BIOFLAX_EQX_DATA", str(mnist_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # Use the platformdirs locations now (and silence jupyter_core's notice).
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_top_to_bottom(path: pathlib.Path, small_mode: None):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the traceback, on any error
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    cells = _code_cells(notebook)
    assert all(cell["execution_count"] for cell in cells)
    assert _has_png(cells), f"{path.name} made no plot in small mode"
