#!/usr/bin/env bash
# Set up a fresh CPU machine: a virtual environment in .venv with the book's and tests' needs.
# Sourced by scripts/build_book.sh and scripts/test.sh; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned: the CPU wheel of 2.13.0 (on this machine's disk); a bare `torch` would pull CUDA.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt
.venv/bin/pip install -q --no-deps -e .
.venv/bin/python -m ipykernel install --sys-prefix --name python3 >/dev/null
