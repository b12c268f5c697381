#!/usr/bin/env bash
# Build the HTML book from a fresh clone: sets up .venv, fetches MathJax, builds with warnings as errors.
# Output: _build/html/index.html. The notebooks are not re-executed: they carry outputs from a GPU run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/fetch_mathjax.sh
rm -rf _build/html _build/.doctrees
.venv/bin/jupyter-book build . --warningiserror --keep-going
echo "book: $(pwd)/_build/html/index.html"
