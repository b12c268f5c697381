"""Execute chapters in place so they are committed with real outputs (run this on the GPU).

    python scripts/execute_notebooks.py                       # every book/*.ipynb
    python scripts/execute_notebooks.py book/01_softmax.ipynb
    python scripts/execute_notebooks.py --out $OUT --budget 540 book/05_attention.ipynb book/07_transformer.ipynb

--out DIR copies each notebook there the moment it finishes (and the benchmark
results file with it), so a run cut short by a time limit still returns the
chapters that completed. --budget SECONDS bounds the whole run: no cell may run
past it (the kernel is shut down, the chapter counts as failed), so the script
always ends in time to hand back what finished. Every cell that takes more than
10 s is named with its time: what to make cheaper when a chapter is slow.

Cells run with the working directory set to book/, as a reader's Jupyter would.
The Colab install cell is a no-op outside Colab. A notebook that fails keeps its
old outputs and the script exits non-zero after trying the others.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TT_RECORD_BENCH", "1")  # chapters executed here record their benchmark rows


def execute(path: Path, deadline: float, cell_timeout: int = 1200) -> bool:
    """Run every cell of `path` in a fresh kernel, none past `deadline` (time.time()); write it if all ran."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=cell_timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    try:
        with client.setup_kernel():  # shuts the kernel down however the loop ends
            for index, cell in enumerate(nb.cells):
                left = deadline - time.time()
                if left < 1:
                    raise TimeoutError(f"budget spent before cell {index}")
                client.timeout = int(min(cell_timeout, left))
                t = time.time()
                client.execute_cell(cell, index)
                if time.time() - t > 10:
                    print(f"  {path.name} cell {index}: {time.time() - t:.0f}s", flush=True)
    except Exception as err:  # report and keep going: one broken chapter should not hide the others
        print(f"FAILED {path.name} after {time.time() - start:.0f}s: {type(err).__name__}: {str(err)[-3000:]}")
        return False
    nbformat.write(nb, path)
    print(f"executed {path.name} in {time.time() - start:.0f}s", flush=True)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every book/*.ipynb")
    parser.add_argument("--out", type=Path, help="copy each finished notebook (and the results files) here")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole run")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    paths = args.notebooks or sorted((ROOT / "book").glob("*.ipynb"))
    results = []
    for p in paths:
        results.append(execute(p.resolve(), deadline))
        if args.out is not None and results[-1]:
            shutil.copy(p, args.out / p.name)
            for f in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
                shutil.copy(f, args.out / f.name)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
