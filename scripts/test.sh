#!/usr/bin/env bash
# Sets up .venv with pinned versions and runs the test suite (CPU, 8 fake devices).
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -ra --durations=15 tests "$@"
