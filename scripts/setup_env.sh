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
STAMP="$ROOT/.venv/.installed-$(cat "$ROOT/requirements-lock.txt" "$ROOT/setup.py" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r "$ROOT/requirements-lock.txt"
  python -m pip install --quiet --no-deps -e "$ROOT"
  touch "$STAMP"
fi
