#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies and this project into it.
# Sourced by quickstart.sh and test.sh; safe to rerun (pip skips what is already there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
source "$ROOT/.venv/bin/activate"
STAMP="$ROOT/.venv/.installed-$(cat "$ROOT/requirements-lock.txt" "$ROOT/requirements-parity.txt" "$ROOT/setup.py" \
  | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  python -m pip install --quiet --upgrade pip
  # torch first, on its own, so the CPU build is the one installed and nothing later pulls a CUDA wheel.
  python -m pip install --quiet torch==2.13.0
  python -m pip install --quiet -r "$ROOT/requirements-lock.txt"
  # transformers & co. for the HF parity tests (tests/test_hf.py; they skip, saying why, without them).
  python -m pip install --quiet -r "$ROOT/requirements-parity.txt"
  python -m pip install --quiet --no-deps -e "$ROOT"
  touch "$STAMP"
fi
