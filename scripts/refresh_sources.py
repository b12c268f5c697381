"""Re-render the `show_source(...)` outputs of chapters after the package's code changed.

    python scripts/refresh_sources.py book/01_softmax.ipynb ...

A chapter shows the package's kernels with `show_source`, read from the package
when the cell runs. Those outputs are committed from a GPU run; when a kernel
changes later, they would show stale code. This executes the notebook on this
machine (CPU: the interpreter, small shapes) in a scratch copy and copies back the
outputs of the `show_source` cells only (their output is the source text,
identical on any device); every other output keeps its GPU run.
tests/test_book.py fails when a shown block no longer matches the package.

    python scripts/refresh_sources.py --cells 38,39 book/07_transformer.ipynb

also re-renders the cells at those indices: only for cells whose output does not
depend on the device, such as plots of the committed results (`live=False`) after
new rows were committed.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def refresh(path: Path, extra: set[int] = frozenset()) -> int:
    nb = nbformat.read(path, as_version=4)
    scratch = copy.deepcopy(nb)
    NotebookClient(scratch, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    changed = 0
    for index, (cell, fresh) in enumerate(zip(nb.cells, scratch.cells)):
        wanted = "show_source(" in cell.source or index in extra
        if cell.cell_type == "code" and wanted and cell.outputs != fresh.outputs:
            cell.outputs = fresh.outputs
            if cell.execution_count is None:  # nbval rejects a cell with outputs and no execution count
                cell.execution_count = fresh.execution_count
            changed += 1
    if changed:
        nbformat.write(nb, path)
    print(f"{path.name}: {changed} cell(s) refreshed")
    return changed


if __name__ == "__main__":
    args = sys.argv[1:]
    extra: set[int] = set()
    if args[:1] == ["--cells"]:
        extra = {int(i) for i in args[1].split(",")}
        args = args[2:]
    for p in args:
        refresh(Path(p).resolve(), extra)
