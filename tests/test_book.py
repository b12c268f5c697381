"""The book's own consistency: every chapter in the table of contents, and no stale kernel source on a page."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
PACKAGE_SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "triton_transformer").rglob("*.py")))


def test_every_chapter_is_in_the_toc():
    toc = (ROOT / "_toc.yml").read_text()
    assert CHAPTERS, "no chapters found"
    for nb in CHAPTERS:
        assert f"book/{nb.stem}" in toc, f"{nb.name} is missing from _toc.yml"


def test_shown_kernel_source_matches_the_package():
    """A `show_source` output must be the package's code as it is now (else run scripts/refresh_sources.py)."""
    stale = []
    for nb_path in CHAPTERS:
        nb = json.loads(nb_path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code" or "show_source(" not in "".join(cell["source"]):
                continue
            blocks = [block for out in cell.get("outputs", [])
                      for block in re.findall(r"```python\n(.*?)\n```",
                                              "".join(out.get("data", {}).get("text/markdown", "")), flags=re.S)]
            if not blocks:  # an empty output would pass the check below without checking anything
                stale.append(f"{nb_path.name} cell {i}: no source shown (outputs missing)")
            for block in blocks:
                if block not in PACKAGE_SOURCE:
                    stale.append(f"{nb_path.name} cell {i}: {block.splitlines()[0][:60]}")
    assert not stale, "chapters show code the package no longer has:\n" + "\n".join(stale)
