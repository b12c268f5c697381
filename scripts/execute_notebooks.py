"""Execute chapters in place so they are committed with real outputs (run this on the GPU).

    python scripts/execute_notebooks.py                       # every book/*.ipynb
    python scripts/execute_notebooks.py book/01_softmax.ipynb
    python scripts/execute_notebooks.py --out $OUT book/05_attention.ipynb book/07_transformer.ipynb

--out DIR copies each notebook there the moment it finishes (and the benchmark
results file with it), so a run cut short by a time limit still returns the
chapters that completed.

Cells run with the working directory set to book/, as a reader's Jupyter would.
The Colab install cell is a no-op outside Colab. A notebook that fails keeps its
old outputs and the script exits non-zero after trying the others.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TT_RECORD_BENCH", "1")  # chapters executed here record their benchmark rows


def execute(path: Path, timeout: int = 1200) -> bool:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.time()
    try:
        client.execute()
    except Exception as err:  # report and keep going: one broken chapter should not hide the others
        print(f"FAILED {path.name} after {time.time() - start:.0f}s: {type(err).__name__}: {str(err)[-3000:]}")
        return False
    nbformat.write(nb, path)
    print(f"executed {path.name} in {time.time() - start:.0f}s")
    return True


def main() -> int:
    args = sys.argv[1:]
    out = None
    if "--out" in args:
        i = args.index("--out")
        out = Path(args[i + 1])
        del args[i:i + 2]
    paths = [Path(p) for p in args] or sorted((ROOT / "book").glob("*.ipynb"))
    results = []
    for p in paths:
        results.append(execute(p.resolve()))
        if out is not None and results[-1]:
            shutil.copy(p, out / p.name)
            for f in (ROOT / "benchmarks" / "results").glob("*.jsonl"):
                shutil.copy(f, out / f.name)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
