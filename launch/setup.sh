#!/usr/bin/env bash
# Installs laminar into ./.venv with its test extra and, when run as root on a Debian-like system,
# the Fashion-MNIST package that the default run reads. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_MNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing the Fashion-MNIST package (dataset-fashion-mnist)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: Fashion-MNIST is not installed; the default run needs it. Install it with:" >&2
    echo "         sudo apt-get install dataset-fashion-mnist" >&2
    echo "       (the tests do not need it)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing laminar and its dependencies into .venv (PyTorch is large: minutes the first time)"
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: done"
