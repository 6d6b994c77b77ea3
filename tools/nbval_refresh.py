"""Rewrite the stored reference output of every `# NBVAL_CHECK_OUTPUT` cell: the only outputs a source notebook keeps.

    .venv/bin/python tools/nbval_refresh.py                           # = make nbval-refresh: every numbered notebook
    .venv/bin/python tools/nbval_refresh.py notebooks/01_data.ipynb   # one notebook

nbval compares a marked cell only against a stored output (a stripped cell checks nothing), so run this whenever a
ci-tier result changes on purpose, and read the diff: a changed number is a changed result. The notebook runs at its
ci defaults in a kernel of this interpreter with cwd notebooks/, as `make test` runs it; other cells stay stripped.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbval.plugin import coalesce_streams, find_comment_markers, find_metadata_tags

ROOT = Path(__file__).resolve().parent.parent
# the environment `make test` gives nbval (Makefile and tests/conftest.py)
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def is_checked(cell) -> bool:
    """nbval's own reading of the cell's markers (comment or tag), so the two never disagree."""
    if cell.cell_type != "code":
        return False
    options = dict(find_metadata_tags(cell.metadata))
    options.update(find_comment_markers(cell.source))
    return options.get("check") is True


def refresh(path: Path) -> int:
    """Execute `path` and store the outputs of its checked cells; returns how many cells were refreshed."""
    source = nbformat.read(path, as_version=4)
    checked = [i for i, c in enumerate(source.cells) if is_checked(c)]
    if not checked:
        return 0
    run = nbformat.read(path, as_version=4)
    NotebookClient(run, kernel_name="python3", timeout=1800, record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    for i in checked:
        outputs = coalesce_streams(run.cells[i].outputs)
        if not outputs:
            raise SystemExit(f"{path.name} cell {i} is marked NBVAL_CHECK_OUTPUT but prints nothing: nothing to check")
        source.cells[i].outputs = outputs
        # nbval skips a cell whose execution_count is None, so the reference keeps the executed one
        source.cells[i].execution_count = run.cells[i].execution_count
    nbformat.write(source, path)
    return len(checked)


def main(argv: list[str]) -> int:
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    paths = [Path(p).resolve() for p in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"[nbval-refresh] {path.relative_to(ROOT)}: {refresh(path)} checked cell(s) refreshed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
