#!/usr/bin/env bash
# Install what zsqpipe needs on a fresh machine (idempotent; fast when everything is present):
#  - Debian's dataset-fashion-mnist (the embedded default data set) when apt is available;
#  - the package with its dev extras (pip install -e ".[dev]"), re-run when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"; else SUDO="none"; fi
  fi
  if command -v apt-get >/dev/null && [ "$SUDO" != "none" ]; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: note: cannot install Debian's dataset-fashion-mnist here (no apt-get or no root);" \
         "copy the four Fashion-MNIST IDX files into ./data (see README) instead" >&2
  fi
fi

stamp=.setup-stamp
# where `python3 -m zsqpipe` resolves outside this folder (Snakemake jobs run in their workdir): an editable
# install of another checkout (a moved or copied repository) must be replaced by this one
installed_pkg=$(cd / && "$PY" -c "import os, zsqpipe; print(os.path.dirname(os.path.realpath(zsqpipe.__file__)))" 2>/dev/null || true)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c "import zsqpipe, snakemake, mlflow, onnxruntime" 2>/dev/null \
   || [ "$installed_pkg" != "$(pwd -P)/zsqpipe" ] || ! command -v zsqpipe >/dev/null; then
  echo "setup: pip install -e .[dev] (torch/torchvision come from the local wheel cache where present)"
  if ! "$PY" -m pip install -q -e ".[dev]"; then
    echo "setup: error: 'pip install -e .[dev]' failed with $PY. On a system Python that refuses pip" \
         "(PEP 668), create an environment first: python3 -m venv .venv && . .venv/bin/activate," \
         "or conda env create -f environment.yml" >&2
    exit 1
  fi
  touch "$stamp"
fi
