#!/usr/bin/env bash
# Run every check from a fresh clone on a CPU machine (CI runs exactly this through .ci/run):
#   unit tests and every chapter under nbval (kernels in Triton's interpreter), notebooks in step
#   with _config.yml, the HTML book built with warnings as errors, and each page opened in Chromium.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Kernels run in the interpreter here; the package would set this itself, but the notebook
# kernels nbval starts must see it too before anything imports triton.
export TRITON_INTERPRET=1
.venv/bin/python scripts/sync_notebooks.py --check
.venv/bin/python -m pytest tests book --nbval-lax -p no:cacheprovider
bash scripts/build_book.sh
if ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python scripts/check_book.py
