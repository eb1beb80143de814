#!/usr/bin/env bash
# Sets up .venv with pinned versions and runs the test suite (CPU, 8 fake devices).
#   bash scripts/test.sh [--fast] [pytest args...]
# --fast leaves out the end-to-end and multi-process tests (pytest -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
ARGS=()
if [ "${1:-}" = "--fast" ]; then
  shift
  ARGS=(-m "not slow")
fi
python -m pytest -q -ra --durations=15 tests ${ARGS[@]+"${ARGS[@]}"} "$@"
