#!/usr/bin/env bash
# Put MathJax 3 into _static/mathjax so the built book renders math without a CDN
# (readers offline, CI machines without internet). _config.yml points mathjax_path at it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -f _static/mathjax/tex-chtml.js ] && exit 0
tmp=$(mktemp -d)
(cd "$tmp" && npm pack --silent mathjax@3.2.2 >/dev/null && tar xzf mathjax-3.2.2.tgz)
mkdir -p _static
rm -rf _static/mathjax && mv "$tmp/package/es5" _static/mathjax
rm -rf "$tmp"
