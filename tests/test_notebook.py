"""notebooks/walkthrough.ipynb runs from top to bottom on the tiny model and a 12-sample pool."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import POOL, TARGETS, write_jsonl
from trimdb.store import Store

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
# Seconds per cell. The slowest cell loads the tiny model and indexes 12 samples in about 3 s on 2 CPU cores.
CELL_TIMEOUT_S = 120
MMLU_TARGETS = [
    ("Which planet is closest to the sun? A. Venus B. Mercury C. Earth D. Mars", "The answer is B."),
    ("Which number is prime? A. 4 B. 6 C. 7 D. 9", "7 has no divisors but 1 and 7. The answer is C."),
    ("What do plants take in from the air? A. oxygen B. carbon dioxide C. helium D. neon",
     "Plants take in carbon dioxide. The answer is B."),
]


def cell_text(cell) -> str:
    """Return the stream and plain-text outputs of one executed cell."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def cell_with(notebook, snippet: str):
    return next(cell for cell in notebook.cells if cell.cell_type == "code" and snippet in cell.source)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, tiny_model_dir):
    """Run the notebook on a two-file pool and two target files, and return it with its database path."""
    folder = tmp_path_factory.mktemp("walkthrough")
    pool, targets = folder / "data" / "pool", folder / "data" / "targets"
    pool.mkdir(parents=True)
    targets.mkdir()
    write_jsonl(pool / "general.jsonl", POOL[::2])
    write_jsonl(pool / "arithmetic.jsonl", POOL[1::2], style="alpaca")
    write_jsonl(targets / "gsm8k.jsonl", TARGETS)
    write_jsonl(targets / "mmlu.jsonl", MMLU_TARGETS)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # An extra last cell reports which interpreter ran the kernel.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRIMDB_WALKTHROUGH_POOL", str(pool))
        patch.setenv("TRIMDB_WALKTHROUGH_TARGETS_DIR", str(targets))
        patch.setenv("TRIMDB_WALKTHROUGH_MODEL", str(tiny_model_dir))
        patch.setenv("TRIMDB_WALKTHROUGH_LAYERS", "2")
        client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}})
        client.execute()
    return {"notebook": notebook, "folder": folder, "db": folder / "data" / "walkthrough.duckdb"}


def test_notebook_kernel_is_current_python(executed):
    assert cell_text(executed["notebook"].cells[-1]).strip() == sys.executable


def test_notebook_indexes_pool(executed):
    with Store(executed["db"], read_only=True) as store:
        sources = store.query("SELECT name FROM sources ORDER BY name").fetchall()
        n_samples = store.query("SELECT count(*) FROM samples").fetchone()[0]
    assert sources == [("arithmetic",), ("general",)]
    assert n_samples == len(POOL)
    assert f"indexed {len(POOL)} new samples" in cell_text(cell_with(executed["notebook"], "index_corpus("))


def test_notebook_queries_both_tasks(executed):
    with Store(executed["db"], read_only=True) as store:
        tasks = store.query("SELECT task, n_scored, n_selected FROM tasks ORDER BY task").fetchall()
    # 5% of 12 samples rounds up to 1.
    assert tasks == [("gsm8k", len(POOL), 1), ("mmlu", len(POOL), 1)]
    printed = cell_text(cell_with(executed["notebook"], "query_tasks("))
    assert f"gsm8k: 1 of {len(POOL)} samples selected" in printed
    assert f"mmlu: 1 of {len(POOL)} samples selected" in printed


def test_notebook_sql_prints_top_sample(executed):
    with Store(executed["db"], read_only=True) as store:
        top_sample = store.query("SELECT sample_id FROM scored WHERE task = 'gsm8k' AND rank = 1").fetchone()[0]
    assert top_sample in cell_text(cell_with(executed["notebook"], "duckdb.connect("))


def test_notebook_plots_histogram(executed):
    outputs = cell_with(executed["notebook"], "axis.hist(").outputs
    assert any("image/png" in output.get("data", {}) for output in outputs)


def test_notebook_explain_step_runs(executed):
    from cli.main import cli

    printed = cell_text(cell_with(executed["notebook"], '"explain" in cli.commands'))
    if "explain" in cli.commands:
        assert "has no `trimdb explain`" not in printed
        assert printed.strip()
    else:
        assert "has no `trimdb explain` command" in printed


def test_notebook_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert all(cell.outputs == [] for cell in code_cells)
    assert all(cell.execution_count is None for cell in code_cells)
    assert notebook.metadata.kernelspec.name == "python3"
