#!/usr/bin/env bash
# Download the third-party benchmark baselines' wheels into wheels/ (git-ignored) for the offline GPU machine.
#
#   bash scripts/fetch_bench_wheels.sh            # liger-kernel + cut-cross-entropy, pure-Python wheels
#
# Run it here (where pip reaches the package index), then name the folder in the device tool's carry:
# carry: ["wheels"]. On the GPU machine every phase of scripts/gpu_run.sh installs wheels/*.whl with
# `pip install --no-deps --no-index` (logged in install.log, never fatal). Both packages are pure Python + Triton;
# their requirements (torch, triton, packaging) are already on the GPU machine, so --no-deps is on purpose.
# Versions: LIGER_VERSION (default 0.8.5: torch>=2.1.2, triton>=2.3.1) and CCE_VERSION (default 25.1.1: torch,
# triton), both checked against the GPU machine's Python 3.12 / torch 2.11 / triton 3.6. PYTHON picks the pip.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/wheels"
PY="${PYTHON:-python3}"
LIGER_VERSION="${LIGER_VERSION:-0.8.5}"
CCE_VERSION="${CCE_VERSION:-25.1.1}"

mkdir -p "$DEST"
# One version of each package only: two wheels of one name make the whole `pip install` on the GPU machine fail.
rm -f "$DEST"/liger_kernel-*.whl "$DEST"/cut_cross_entropy-*.whl

"$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  -d "$DEST" "liger-kernel==$LIGER_VERSION" "cut-cross-entropy==$CCE_VERSION"

echo "wheels in $DEST (carry them with carry: [\"wheels\"]):"
ls -l "$DEST"/*.whl
du -sh "$DEST"
