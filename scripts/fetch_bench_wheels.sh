#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks into wheels/ (git-ignored): the third-party benchmark
# baselines and the Hugging Face stack (transformers, accelerate and their pure-Python / cp312 dependencies) that
# the BERT tests, the end-to-end benchmarks and the convergence run need.
#
#   bash scripts/fetch_bench_wheels.sh            # ~30 MB: liger-kernel, cut-cross-entropy, transformers stack
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
# transformers 5.23 + accelerate 1.15 and their dependency closure as resolved in the CPU development venv,
# without what the GPU machine already has (torch, triton, numpy, packaging, typing-extensions, jinja2, sympy,
# networkx) and without matplotlib (plots are drawn here from the JSON/CSV results). Installed with --no-deps.
HF_STACK=(
  transformers==5.23.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface-hub==2.4.0 hf-xet==1.8.0
  accelerate==1.15.0 psutil==7.2.2 regex==2026.11.15 pyyaml==6.0.3 tqdm==4.70.1 filelock==4.2.11
  fsspec==2026.9.0 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5
  typer==0.29.2 click==8.5.1 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  shellingham==1.5.4 annotated-doc==0.0.7 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
  typing-inspection==0.4.5
)

mkdir -p "$DEST"
# One version of each package only: two wheels of one name make the whole `pip install` on the GPU machine fail.
rm -f "$DEST"/*.whl

"$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform linux_x86_64 --platform any \
  -d "$DEST" "liger-kernel==$LIGER_VERSION" "cut-cross-entropy==$CCE_VERSION" "${HF_STACK[@]}"

echo "wheels in $DEST (carry them with carry: [\"wheels\"]):"
ls -l "$DEST"/*.whl
du -sh "$DEST"
