"""Open every page of the built book in headless Chromium and fail on what a reader would see broken.

    python scripts/check_book.py [_build/html] [--screenshots DIR]

Each page is served over HTTP on localhost (as a reader's browser would fetch it),
rendered by Chromium with JavaScript (so MathJax runs), and its rendered DOM is
checked for:

* math left unrendered: TeX delimiters (``$$``, ``\\[``, ``\\(``) in the visible
  text, or math elements with no MathJax output, or rendered math that shows a TeX command as text;
* a Python traceback or an error output of a notebook cell;
* a missing image: an ``<img>`` whose file does not exist, or a chapter whose
  notebook has image outputs that the page does not show;
* a broken internal link: an ``href`` to a page or file of the book that does not exist.

A screenshot of each chapter goes to --screenshots (default _build/screenshots,
outside git) for a person to look at.
"""

from __future__ import annotations

import argparse
import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("check_book: no Chromium found (Debian: apt-get install chromium)")


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would bury the verdicts
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def render(url: str, profile: str, screenshot: Path | None = None) -> str:
    """The DOM after JavaScript ran (MathJax included), and optionally a full-page screenshot."""
    base = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=15000"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", "--window-size=1280,6000", url],
                       capture_output=True, timeout=120)
    return dom


def visible_text(dom: str) -> str:
    body = re.sub(r"<(script|style|mjx-assistive-mml|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    # code blocks may legitimately show `$` or backslashes
    body = re.sub(r"<(pre|code)\b.*?</\1>", " ", body, flags=re.S | re.I)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def notebook_images(page: Path, site: Path) -> int:
    """How many image outputs the chapter's notebook holds (0 for markdown pages)."""
    rel = page.relative_to(site).with_suffix(".ipynb")
    nb_path = ROOT / rel
    if not nb_path.exists():
        return 0
    nb = json.loads(nb_path.read_text())
    return sum(1 for cell in nb["cells"] if cell["cell_type"] == "code"
               for out in cell.get("outputs", []) if "image/png" in out.get("data", {}))


def check_page(page: Path, site: Path, base_url: str, profile: str, shots: Path | None) -> list[str]:
    rel = page.relative_to(site).as_posix()
    shot = None
    if shots is not None and rel.startswith("book/"):
        shot = shots / (rel.replace("/", "_").removesuffix(".html") + ".png")
    dom = render(f"{base_url}/{rel}", profile, shot)
    problems = []
    if "<body" not in dom:
        return [f"{rel}: Chromium returned no page"]
    text = visible_text(dom)
    for delim in ("$$", "\\[", "\\(", "\\begin{"):
        if delim in text:
            snippet = text[text.index(delim):][:60].replace("\n", " ")
            problems.append(f"{rel}: unrendered math {snippet!r}")
            break
    # A TeX command MathJax did not process shows as its own text, backslash and all (`\_` inside `\text{}`,
    # which MathJax 3 leaves alone without its textmacros extension, or an undefined macro): the
    # screen-reader copy of each formula (its MathML) then holds a backslash.
    for mml in re.findall(r"<mjx-assistive-mml\b.*?</mjx-assistive-mml>", dom, flags=re.S):
        shown = html.unescape(re.sub(r"<[^>]+>", "", mml))
        if "\\" in shown:
            problems.append(f"{rel}: raw TeX in rendered math {shown.strip()[:60]!r}")
            break
    math_elems = len(re.findall(r'class="[^"]*\bmath\b', dom))
    if math_elems and "<mjx-container" not in dom:
        problems.append(f"{rel}: {math_elems} math elements but MathJax rendered none")
    if "Traceback (most recent call last)" in text or re.search(r'class="[^"]*\b(traceback|output error)\b', dom):
        problems.append(f"{rel}: shows a Python traceback or an error output")
    imgs = re.findall(r'<img\b[^>]*\bsrc="([^"]+)"', dom)
    for src in imgs:
        if src.startswith(("data:", "http://127.0.0.1", "https://colab.research.google.com",
                           "https://img.shields.io")):
            continue
        if src.startswith(("http://", "https://")):
            continue
        target = (page.parent / unquote(urlparse(src).path)).resolve()
        if not target.exists():
            problems.append(f"{rel}: missing image {src}")
    expected = notebook_images(page, site)
    shown = sum(1 for src in imgs if "_images/" in src or src.startswith("data:image"))
    if shown < expected:
        problems.append(f"{rel}: notebook has {expected} plot(s), page shows {shown}")
    for href in re.findall(r'<a\b[^>]*\bhref="([^"#][^"]*)"', dom):
        parsed = urlparse(href)
        if parsed.scheme or href.startswith(("mailto:", "//")):
            continue
        target = (page.parent / unquote(parsed.path)).resolve()
        if not target.exists():
            problems.append(f"{rel}: broken link {href}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", nargs="?", default=str(ROOT / "_build" / "html"))
    parser.add_argument("--screenshots", default=str(ROOT / "_build" / "screenshots"))
    args = parser.parse_args()
    site = Path(args.site).resolve()
    if not (site / "index.html").exists():
        raise SystemExit(f"check_book: no built book at {site} (run scripts/build_book.sh)")
    shots = Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    pages = sorted(p for p in site.rglob("*.html")
                   if not p.relative_to(site).as_posix().startswith(("_static", "_sources", "_images"))
                   and p.relative_to(site).as_posix() not in ("search.html", "genindex.html", "index.html"))
    # (the root index.html is only a redirect to book/intro.html)
    server, base_url = serve(site)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as profile:
        for page in pages:
            found = check_page(page, site, base_url, profile, shots)
            print(f"{'ok  ' if not found else 'FAIL'} {page.relative_to(site)}")
            problems += found
    server.shutdown()
    for p in problems:
        print("  " + p)
    print(f"{len(pages)} pages, {len(problems)} problems; screenshots in {shots}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
