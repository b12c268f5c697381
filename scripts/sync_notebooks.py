"""Keep every chapter's Colab badge and install cell in step with `_config.yml`'s repository URL.

    python scripts/sync_notebooks.py            # rewrite book/*.ipynb in place
    python scripts/sync_notebooks.py --check    # exit 1 if any notebook is out of step (CI)

Cell 0 of a chapter is its title (markdown) and ends with the Colab badge line;
cell 1 is the install cell, tagged `nbval-skip`, that only runs in Colab. Both
are derived from the one URL in `_config.yml`, so moving the repository is a
one-line change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BADGE_PREFIX = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"


def repository() -> tuple[str, str]:
    """(url, branch) from _config.yml, read without a YAML dependency."""
    url, branch, section = None, "main", None
    for line in (ROOT / "_config.yml").read_text().splitlines():
        if line and not line.startswith(" "):
            section = line.split(":")[0]
        elif section == "repository":
            key, _, value = line.strip().partition(":")
            if key == "url":
                url = value.strip()
            if key == "branch":
                branch = value.strip()
    if not url:
        raise SystemExit("_config.yml has no repository.url")
    return url, branch


def badge(url: str, branch: str, path: str) -> str:
    github = url.removeprefix("https://github.com/")
    return f"{BADGE_PREFIX}(https://colab.research.google.com/github/{github}/blob/{branch}/{path})"


def install_source(url: str) -> str:
    return (
        "# Colab only: install the package this book builds (skipped everywhere else).\n"
        "import subprocess, sys\n"
        "if \"google.colab\" in sys.modules:\n"
        f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"triton-transformer @ git+{url}\"], check=True)\n"
    )


def synced(nb: dict, path: str) -> dict:
    url, branch = repository()
    cells = nb["cells"]
    title = cells[0]
    assert title["cell_type"] == "markdown", f"{path}: cell 0 must be the markdown title"
    lines = "".join(title["source"]).rstrip("\n").split("\n")
    lines = [line for line in lines if not line.startswith(BADGE_PREFIX)]
    title["source"] = "\n".join(lines + ["", badge(url, branch, path)]).replace("\n\n\n", "\n\n")
    if len(cells) > 1 and cells[1].get("id") == "colab-install":
        install = cells[1]  # keep what an execution recorded (its count), rewrite what we own
    else:
        install = {"cell_type": "code", "execution_count": None, "id": "colab-install", "metadata": {},
                   "outputs": []}
        cells.insert(1, install)
    install["source"] = install_source(url)
    install["metadata"]["tags"] = ["nbval-skip"]
    return nb


def _normal(nb: dict) -> list:
    """The first two cells' sources and tags, with sources joined (Jupyter stores them as lists of lines)."""
    def text(src):
        return "".join(src) if isinstance(src, list) else src
    return [(text(c["source"]), c.get("metadata", {}).get("tags")) for c in nb["cells"][:2]]


def main() -> int:
    check = "--check" in sys.argv
    paths = [Path(p) for p in sys.argv[1:] if not p.startswith("--")] or sorted((ROOT / "book").glob("*.ipynb"))
    stale = []
    for p in paths:
        rel = p.resolve().relative_to(ROOT).as_posix()
        before = p.read_text()
        nb = synced(json.loads(before), rel)
        after = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if check:
            if _normal(json.loads(before)) != _normal(json.loads(after)):
                stale.append(rel)
        elif before != after:
            p.write_text(after)
            print(f"synced {rel}")
    if stale:
        print("out of step with _config.yml (run python scripts/sync_notebooks.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
