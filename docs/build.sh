#!/usr/bin/env bash
# Build the course site:  bash docs/build.sh OUT
#
# Writes OUT/index.html, one page per notebook in notebooks/ (executed: every figure, table and
# printed result), the course map, the results, the classroom model's card, the API reference
# and how to run the lessons. Full mode by default (the classroom model on a machine without a
# GPU); IMPUS_LITE_SMOKE=1 builds fast. Offline: nothing is downloaded, and no page loads
# anything from the network (MathJax and the badges are served from the site itself).
#
# Toolchain: Sphinx with myst-nb, themed with sphinx-book-theme. Why: it is pure Python and
# installs from PyPI with the rest of requirements.txt; it renders .ipynb files with their
# outputs and Markdown pages (MyST) in one site; the API reference comes from the docstrings
# through Sphinx's own autodoc; it is what the field's teaching and library sites run on
# (Jupyter Book 1.x is this same stack, POT's gallery is Sphinx), and GitHub Pages serves its
# output as it is. The notebooks are executed by docs/prepare.py with nbclient, exactly as
# tests/test_notebooks.py executes them, and handed to Sphinx already executed: executed copies
# that the notebook test left in IMPUS_LITE_EXECUTED_DIR are reused, so CI runs each notebook
# once for the test and the site together.
#
# Measured (December 2026, a 2-core AMD EPYC (Zen 5), OMP_NUM_THREADS=1, the machine shared at
# times with test runs): a full build, every notebook executed in full mode on the classroom
# model with its solutions and then Sphinx, took 36.5 minutes (2,188 s; the evaluation lesson and the
# neighbours lesson the longest at 531 s and 420 s, before each was split in two (08-09, 10-11);
# 61 MB of site). A smoke build took 4 min 40 s from nothing and about 20 s
# when it reuses the notebooks that the notebook test executed (as in CI).
set -euo pipefail
OUT=${1:?usage: bash docs/build.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The Sphinx source and doctrees of this OUT (two builds into two folders do not meet).
WORK="$ROOT/build/site-work/$(printf '%s' "$OUT" | cksum | cut -d' ' -f1)"
SOURCE="$WORK/source"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

"$PYTHON" "$ROOT/docs/prepare.py" "$SOURCE"
"$PYTHON" -m sphinx -b html -q -E -d "$WORK/doctrees" "$SOURCE" "$OUT"
touch "$OUT/.nojekyll"   # GitHub Pages: serve _static/ and _images/ as they are
test -s "$OUT/index.html"
echo "site: $OUT/index.html"
