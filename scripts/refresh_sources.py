"""Re-render the `show_source(...)` outputs of chapters after the package's code changed.

    python scripts/refresh_sources.py book/01_softmax.ipynb ...

A chapter shows the package's kernels with `show_source`, read from the package
when the cell runs. Those outputs are committed from a GPU run; when a kernel
changes later, they would show stale code. This executes the notebook on this
machine (CPU: the interpreter, small shapes) in a scratch copy and copies back the
outputs of the `show_source` cells only (their output is the source text,
identical on any device); every other output keeps its GPU run.
tests/test_book.py fails when a shown block no longer matches the package.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def refresh(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    scratch = copy.deepcopy(nb)
    NotebookClient(scratch, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    changed = 0
    for cell, fresh in zip(nb.cells, scratch.cells):
        if cell.cell_type == "code" and "show_source(" in cell.source and cell.outputs != fresh.outputs:
            cell.outputs = fresh.outputs
            if cell.execution_count is None:  # nbval rejects a cell with outputs and no execution count
                cell.execution_count = fresh.execution_count
            changed += 1
    if changed:
        nbformat.write(nb, path)
    print(f"{path.name}: {changed} show_source cell(s) refreshed")
    return changed


if __name__ == "__main__":
    for p in sys.argv[1:]:
        refresh(Path(p).resolve())
